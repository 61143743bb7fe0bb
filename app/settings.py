"""Process settings, read once from the environment (and an optional `.env`).

`DATABASE_URL` is the one variable without the `ASYNCINFER_` prefix because
every Postgres tool already knows it. When it is unset, asyncinfer starts an
embedded PostgreSQL of its own in `ASYNCINFER_DATA_DIR` (see app/db/embedded.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "asyncinfer"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASYNCINFER_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "ASYNCINFER_DATABASE_URL"),
        description="PostgreSQL URL. Unset: start the embedded PostgreSQL.",
    )
    data_dir: Path = Field(default_factory=_default_data_dir, description="Embedded PostgreSQL data and local outputs.")

    # HTTP API
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_batch_items: int = Field(default=10_000, ge=1)
    db_pool_size: int = Field(default=10, ge=1)
    admin_key: str | None = Field(
        default=None, min_length=16, description="Accepted as an admin API key in addition to stored keys (bootstrap)."
    )
    max_batch_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Body limit of a bulk submit.")
    max_metadata_bytes: int = Field(default=16 * 1024, ge=2, description="Largest `metadata` object, as JSON.")
    db_timeout_seconds: float = Field(default=5.0, gt=0, description="Wait for a DB connection, then answer 503.")
    db_lock_timeout_ms: int = Field(
        default=500, ge=1, description="API statements wait at most this on a row lock (then 503 Retry-After)."
    )
    db_statement_timeout_ms: int = Field(
        default=30_000, ge=1, description="API statements run at most this long (then 503 Retry-After)."
    )
    retry_after_seconds: int = Field(default=2, ge=1, description="Retry-After sent with 429 and 503 answers.")
    predict_timeout_seconds: float = Field(default=60.0, gt=0, description="Real-time predict: default wait.")
    predict_max_timeout_seconds: float = Field(default=600.0, gt=0, description="Largest ?timeout_seconds= allowed.")
    submit_coalesce_max_items: int = Field(default=500, ge=1, description="Most single submits joined in one insert.")
    submit_coalesce_inflight: int = Field(
        default=1, ge=1, description="Inserts in flight per (model, key) before new submits wait and coalesce."
    )
    api_key_cache_seconds: float = Field(default=10.0, ge=0, description="How long a looked-up API key is cached.")

    # Queue behaviour
    lease_seconds: float = Field(default=30.0, gt=0, description="Lease on a running request; renewed every lease/3.")
    maintenance_interval_seconds: float = Field(default=1.0, gt=0, description="Reaper / expiry / reconcile tick.")
    poll_interval_seconds: float = Field(default=1.0, gt=0, description="Jittered fallback poll of idle workers.")
    request_retention_hours: float = Field(default=168, gt=0, description="Finished requests are deleted after this.")
    output_retention_hours: float = Field(default=168, gt=0, description="Stored outputs are dropped after this.")

    # Workers (see worker/config.py for the per-model settings in the models file)
    models_file: Path | None = Field(default=None, description="TOML file declaring models; default: worker/models.toml.")
    worker_shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM: time in-flight requests get to finish before they are handed back."
    )
    worker_finish_window_ms: float = Field(
        default=1.0, ge=0, description="Outcomes collected this long (and while a finish is in flight) per finish call."
    )
    worker_log_capture_bytes: int = Field(
        default=16 * 1024, ge=0, description="Model log/print output kept per request attempt in its events; 0: off."
    )
    listen_health_check_seconds: float = Field(
        default=5.0, gt=0, description="How often an idle LISTEN connection is checked (pg_listening_channels())."
    )

    # Webhooks and object storage (the dispatcher)
    allow_private_webhooks: bool = Field(default=False, description="Allow webhook targets on private/loopback nets.")
    webhook_retry_schedule_seconds: list[float] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000],
        description="Delays between webhook attempts (JSON list); after the last one the delivery FAILED.",
    )
    webhook_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_timeout_seconds: float = Field(default=30.0, gt=0, description="Read/write timeout of one webhook call.")
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0, description="Response body read at most.")
    dispatcher_batch_size: int = Field(default=100, ge=1)
    dispatcher_concurrency: int = Field(default=64, ge=1, description="Deliveries in flight per dispatcher.")
    delivery_lease_seconds: float = Field(default=60.0, gt=0, description="A claimed delivery is due again after this.")
    output_inline_limit_bytes: int = Field(
        default=1024 * 1024, ge=0, description="Outputs larger than this live only in object storage once written."
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL/AWS).")
    s3_region: str | None = None
    s3_allow_http: bool = Field(default=False, description="Allow a plain-http S3 endpoint (local test servers).")

    log_json: bool = False
    log_level: str = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
