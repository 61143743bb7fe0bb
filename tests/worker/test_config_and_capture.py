"""The models file, model loading rules and log capture, in process (fast)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from worker import capture
from worker.config import (
    DEFAULT_MODELS_FILE,
    ConfigError,
    load_model_configs,
    load_pipelines,
    models_file,
    parse_pipelines,
    parse_model_configs,
    select_models,
)
from worker.loader import construct
from worker.main import worker_command


def test_shipped_models_file_declares_the_shipped_models() -> None:
    configs = load_model_configs()
    assert set(configs) == {"echo", "sleep", "torch-mlp", "minilm", "sentence-classifier"}
    for config in configs.values():
        assert config.class_path.startswith("worker.models.")
    assert configs["torch-mlp"].requires == ("torch",)
    assert configs["minilm"].max_batch_size > 1
    # the shipped pipeline chains shipped models only
    pipelines = load_pipelines()
    assert [s["model"] for s in pipelines["classify-sentences"]] == ["minilm", "sentence-classifier"]
    assert configs["sentence-classifier"].load_options["input_dim"] == 384  # MiniLM's embedding size


def test_pipelines_in_the_models_file_are_checked() -> None:
    text = """
        [models.a]
        class = "pkg.mod:A"
        [pipelines.p]
        steps = [{ model = "a" }, { model = "a", fan_out = "$.xs", input = { x = "$" } }]
    """
    assert parse_pipelines(text) == {"p": [{"model": "a"}, {"model": "a", "fan_out": "$.xs", "input": {"x": "$"}}]}
    assert set(parse_model_configs(text)) == {"a"}
    for bad, message in [
        ('[pipelines.p]\nsteps = []', "non-empty list"),
        ('[pipelines.p]\nsteps = [{ modle = "a" }]', "unknown: modle"),
        ('[pipelines.p]\nstages = [{ model = "a" }]', "exactly one key"),
        ('[pipelines."bad name"]\nsteps = [{ model = "a" }]', "must match"),
        ('[pipeline.p]\nsteps = [{ model = "a" }]', "unknown top-level key(s) pipeline"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_pipelines(bad)


def test_parse_defaults_and_overrides() -> None:
    configs = parse_model_configs("""
        [models.a]
        class = "pkg.mod:A"

        [models.b]
        class = "pkg.mod:B"
        capacity = 3
        concurrency = 5
        max_batch_size = 16
        max_batch_wait_ms = 2.5
        execution_timeout_seconds = 9
        device = "cuda:1"
        requires = ["numpy"]
        enabled = false
        [models.b.load_options]
        size = "large"
    """)
    a, b = configs["a"], configs["b"]
    assert (a.capacity, a.concurrency, a.max_batch_size, a.max_batch_wait_ms, a.execution_timeout_seconds,
            a.device, a.load_options, a.enabled) == (1, None, 32, 5.0, 600.0, "auto", {}, True)
    assert (b.capacity, b.concurrency, b.max_batch_size, b.max_batch_wait_ms, b.execution_timeout_seconds,
            b.device, b.load_options, b.requires, b.enabled) == (
        3, 5, 16, 2.5, 9.0, "cuda:1", {"size": "large"}, ("numpy",), False)
    assert a.effective_concurrency(batching=True) == 64
    assert a.effective_concurrency(batching=False) == 1
    assert b.effective_concurrency(batching=True) == 5
    assert b.effective_concurrency(batching=True, override=2) == 2


@pytest.mark.parametrize(("text", "message"), [
    ('[models.a]\nclas = "x:Y"', "unknown key(s) clas"),
    ('[models.a]\nclass = "no_colon"', "class must be"),
    ('[models."bad name"]\nclass = "x:Y"', "model name must match"),
    ('[models.a]\nclass = "x:Y"\ncapacity = -1', "capacity must be >= 0"),
    ('[models.a]\nclass = "x:Y"\nmax_batch_size = 0', "max_batch_size must be >= 1"),
    ('[models.a]\nclass = "x:Y"\nexecution_timeout_seconds = 0', "execution_timeout_seconds must be > 0"),
    ('[models.a]\nclass = "x:Y"\ncapacity = true', "capacity must be an integer"),
    ('[models.a]\nclass = "x:Y"\ndevice = "tpu"', "device must be"),
    ('[model.a]\nclass = "x:Y"', "unknown top-level key(s) model"),
    ("[models.a", "not valid TOML"),
])
def test_parse_errors_name_the_model_and_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="models.toml") as raised:
        parse_model_configs(text, "models.toml")
    assert message in str(raised.value)


def test_select_models_and_file_resolution(tmp_path: Path) -> None:
    configs = parse_model_configs("""
        [models.a]
        class = "pkg.mod:A"
        [models.off]
        class = "pkg.mod:B"
        enabled = false
        [models.needs]
        class = "pkg.mod:C"
        requires = ["surely_not_installed_module_xyz"]
    """)
    chosen, notes = select_models(configs, None)
    assert [c.name for c in chosen] == ["a"]
    assert any("surely_not_installed_module_xyz" in n for n in notes) and any("disabled" in n for n in notes)
    assert [c.name for c in select_models(configs, ["needs", "a"])[0]] == ["needs", "a"]
    with pytest.raises(ConfigError, match="unknown model"):
        select_models(configs, ["nope"])
    assert models_file(None, None) == DEFAULT_MODELS_FILE
    assert models_file(None, tmp_path / "s.toml") == tmp_path / "s.toml"
    assert models_file("cli.toml", tmp_path / "s.toml") == Path("cli.toml")


def test_worker_command_rejects_a_bad_file_before_touching_the_database(tmp_path: Path, capsys) -> None:
    import argparse

    from app.settings import Settings

    bad = tmp_path / "bad.toml"
    bad.write_text('[models.a]\nclass = "x:Y"\nwhat = 1\n')
    args = argparse.Namespace(models=None, concurrency=None, config=str(bad))
    assert worker_command(args, Settings(database_url="postgresql://nobody@127.0.0.1:1/none")) == 2
    assert "unknown key(s) what" in capsys.readouterr().err


def test_construct_passes_device_and_load_options_only_where_accepted() -> None:
    configs = parse_model_configs("""
        [models.echo]
        class = "worker.models.echo:Echo"
        [models.sleep]
        class = "worker.models.sleep:Sleep"
        [models.sleep.load_options]
        max_seconds = 5
        [models.batch-only]
        class = "tests.worker.sample_models:BatchRecorder"
        max_batch_size = 1
    """)
    echo = construct(configs["echo"])
    assert echo.device is None and echo.batching and not echo.predict_async
    sleep = construct(configs["sleep"])
    assert sleep.predict_async and not sleep.batching and sleep.instance.max_seconds == 5
    assert construct(configs["batch-only"]).batching  # no predict: batches of one
    one = parse_model_configs('[models.e]\nclass = "worker.models.echo:Echo"\nmax_batch_size = 1')["e"]
    assert not construct(one).batching  # batches of one with a predict: per-request calls


def test_capture_collects_logs_and_prints_bounded() -> None:
    capture.install()
    try:
        cap = capture.Capture(limit=300)
        token = capture.current.set(cap)
        try:
            logging.getLogger("some.model").warning("hello %s", "there")
            logging.getLogger("asyncinfer.worker").warning("our own line: never captured")
            print("partial", end="")
            print(" line")
            sys.stderr.write("to stderr\n")
            for n in range(50):
                print(f"line {n}")
        finally:
            capture.current.reset(token)
        print("not captured: no current capture")
        lines = cap.close()
    finally:
        capture.uninstall()
    assert lines[:3] == ["WARNING some.model: hello there", "stdout: partial line", "stderr: to stderr"]
    assert lines[-1] == capture.TRUNCATED
    assert sum(len(line) for line in lines[:-1]) <= 300
    assert not any("never captured" in line or "not captured" in line for line in lines)
