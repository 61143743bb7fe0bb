"""README.md stays true: every setting is documented in its table."""

from pathlib import Path

from app.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = []
    for name in Settings.model_fields:
        variable = "DATABASE_URL" if name == "database_url" else f"ASYNCINFER_{name.upper()}"
        if variable not in README:
            missing.append(variable)
    assert missing == []
