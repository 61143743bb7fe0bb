"""HTTP client side of the `asyncinfer` CLI (submit, status, cancel, queue, models)."""
