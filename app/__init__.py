"""asyncinfer: Postgres-centric asynchronous inference."""

__version__ = "0.1.0"
