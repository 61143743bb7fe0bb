"""Object storage writes through obstore: `s3://bucket/key` (any
S3-compatible store) and `file:///path`. An output_url ending in `/` is a
prefix: the object is `<prefix><request_id>.json`."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit
from uuid import UUID

import obstore
from obstore.store import LocalStore, ObjectStore, S3Store

from app.settings import Settings

STORAGE_SCHEMES = ("s3", "file")


def object_url(output_url: str, request_id: UUID | str) -> str:
    return f"{output_url}{request_id}.json" if output_url.endswith("/") else output_url


def check_storage_url(url: str) -> None:
    """Raise ValueError unless the URL is one we can write."""
    parts = urlsplit(url)
    if parts.scheme not in STORAGE_SCHEMES:
        raise ValueError(f"scheme must be s3 or file, got {parts.scheme or 'none'!r}")
    if parts.scheme == "s3" and not parts.netloc:
        raise ValueError("s3 URL needs a bucket: s3://bucket/key")
    if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise ValueError("file URL must be absolute: file:///path")


class ObjectWriter:
    """Writes objects, reusing one store per bucket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stores: dict[str, ObjectStore] = {}

    def _store(self, scheme: str, bucket: str) -> ObjectStore:
        key = f"{scheme}://{bucket}"
        store = self._stores.get(key)
        if store is None:
            if scheme == "s3":
                config: dict[str, object] = {}
                if self.settings.s3_endpoint_url:
                    config["endpoint"] = self.settings.s3_endpoint_url
                if self.settings.s3_region:
                    config["region"] = self.settings.s3_region
                client = {"allow_http": True} if self.settings.s3_allow_http else None
                # Few quick in-call retries: the outbox schedule does the patient retrying.
                retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=30)}
                store = S3Store(bucket, config=config or None, client_options=client, retry_config=retry)
            else:
                store = LocalStore("/")
            self._stores[key] = store
        return store

    async def write(self, url: str, data: bytes) -> None:
        check_storage_url(url)
        parts = urlsplit(url)
        if parts.scheme == "s3":
            await obstore.put_async(self._store("s3", parts.netloc), parts.path.lstrip("/"), data)
        else:
            from pathlib import Path

            Path(parts.path).parent.mkdir(parents=True, exist_ok=True)
            await obstore.put_async(self._store("file", ""), parts.path.lstrip("/"), data)
