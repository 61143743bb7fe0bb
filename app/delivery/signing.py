"""Webhook signatures: Baseten's header and Standard Webhooks, several secrets.

Secrets look like `whsec_<base64>` (the Standard Webhooks form). The
Standard Webhooks signature keys HMAC with the base64-decoded part; the
Baseten-style header keys it with the whole secret string, as receivers
written for that service do (`hmac.new(secret.encode(), body, sha256)`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def baseten_signature(body: bytes, secrets: Sequence[str]) -> str:
    """`v1=<hex>` per secret, comma-separated (rotation: any one may match)."""
    return ",".join("v1=" + hmac.new(s.encode(), body, hashlib.sha256).hexdigest() for s in secrets)


def standard_webhooks_signature(message_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """`v1,<base64>` per secret, space-separated, over `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    parts = []
    for secret in secrets:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
        parts.append("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode())
    return " ".join(parts)


def signed_headers(message_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
    }
    if secrets:
        headers["webhook-signature"] = standard_webhooks_signature(message_id, timestamp, body, secrets)
        headers["x-baseten-signature"] = baseten_signature(body, secrets)
    return headers
