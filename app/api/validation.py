"""Turning request bytes into validated values, or a 4xx naming field and rule.

Order of checks for a JSON body: content type (415), UTF-8, NUL characters
(PostgreSQL text and jsonb cannot hold U+0000), then one msgspec decode
that checks syntax, types, ranges and unknown fields together. Nesting
deeper than the interpreter's recursion limit (roughly 900 levels) is
refused as "nested too deeply". Then the checks msgspec cannot do: URLs
(webhook targets must be public unless allowed), metadata shape and size.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from typing import Any, TypeVar

import msgspec

from app.api.errors import ApiError, invalid
from app.api.schemas import RULES, AsyncPredictBody
from app.delivery.storage import check_storage_url
from app.delivery.targets import TargetRefused, check_url_shape, forbidden_reason

T = TypeVar("T")

_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# A number Python cannot hold (beyond a double, or an integer of more than
# 4300 digits) would reach PostgreSQL intact but fail the worker's decode.
# Only bodies with a long digit run or a 3-digit exponent are decoded to check.
_BIG_NUMBER = re.compile(rb"\d{300}|[eE][+-]?\d{3}")
_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_QUOTED = re.compile(r"`([^`]*)`")


def check_json_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, f"content-type: must be application/json, got {media or 'none'!r}",
                       [("content-type", "must be application/json")])


def check_text(body: bytes) -> None:
    if not body:
        raise invalid("body", "must be a JSON document; the body is empty")
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise invalid("body", f"must be valid UTF-8 (bad byte at offset {error.start})") from None
    if b"\\u0000" in body and _NUL.search(body):
        raise invalid("body", "must not contain \\u0000 (NUL cannot be stored in PostgreSQL text or jsonb)")


def _field_path(path: str) -> str:
    return path[1:] if path.startswith(".") else path


def _leaf(path: str) -> str:
    leaf = re.split(r"[.\[]", path)[-1] if path else ""
    return leaf.rstrip("]")


def _from_validation_error(message: str) -> ApiError:
    path = ""
    m = _PATH.search(message)
    if m:
        path = _field_path(m.group("path"))
        message = message[: m.start()]
    quoted = _QUOTED.findall(message)
    if message.startswith("Object missing required field") and quoted:
        field = f"{path}.{quoted[0]}" if path else quoted[0]
        return invalid(field, "is required")
    if message.startswith("Object contains unknown field") and quoted:
        field = f"{path}.{quoted[0]}" if path else quoted[0]
        return invalid(field, "unknown field")
    if not path:
        return invalid("body", "must be a JSON object" if "got `array`" in message or "got `" in message
                       else message)
    if re.fullmatch(r".*\[\d+\]", path):  # an array element of the wrong type
        return invalid(path, "must be a JSON object")
    rule = RULES.get(_leaf(path), message)
    error = invalid(path, rule)
    error.detail = f"{path}: {rule} ({message.strip()})"
    return error


def decode(body: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body into `type_`, or raise a 400 naming the field."""
    check_text(body)
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as error:
        raise _from_validation_error(str(error)) from None
    except msgspec.DecodeError as error:
        raise invalid("body", f"must be valid JSON ({error})") from None
    except RecursionError:
        raise invalid("body", "is nested too deeply") from None


def decode_any_json(body: bytes) -> msgspec.Raw:
    """Any JSON document except null, kept raw (the real-time predict body)."""
    check_text(body)
    try:
        raw = msgspec.json.decode(body, type=msgspec.Raw)  # syntax checked, value kept as bytes
    except msgspec.DecodeError as error:
        raise invalid("body", f"must be valid JSON ({error})") from None
    except RecursionError:
        raise invalid("body", "is nested too deeply") from None
    if bytes(raw) == b"null":
        raise invalid("model_input", "must not be null")
    return raw


# -- URLs ----------------------------------------------------------------------


class UrlChecker:
    """Webhook and storage URL rules, with a small cache of host verdicts so
    a bulk submit naming one webhook host resolves it once, not per item."""

    def __init__(self, allow_private: bool, ttl_seconds: float = 60.0, max_entries: int = 10_000) -> None:
        self.allow_private = allow_private
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._hosts: dict[tuple[str, int], tuple[float, str | None]] = {}

    async def webhook(self, url: str, field: str) -> None:
        try:
            host, port = check_url_shape(url)
        except TargetRefused as error:
            raise invalid(field, f"must be an http(s) URL: {error}") from None
        if self.allow_private:
            return
        reason = await self._host_verdict(host, port)
        if reason:
            raise invalid(field, f"must not point at a private, loopback or link-local address ({reason})")

    async def _host_verdict(self, host: str, port: int) -> str | None:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            kind = forbidden_reason(str(literal))
            return f"{host} is a {kind} address" if kind else None
        now = time.monotonic()
        cached = self._hosts.get((host, port))
        if cached and cached[0] > now:
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            verdict = None
            for *_, sockaddr in infos:
                kind = forbidden_reason(sockaddr[0])
                if kind:
                    verdict = f"{host} resolves to {sockaddr[0]}, a {kind} address"
                    break
        except (socket.gaierror, UnicodeError) as error:
            verdict = f"host {host!r} does not resolve ({getattr(error, 'strerror', None) or error})"
        if len(self._hosts) >= self.max_entries:
            self._hosts.clear()
        self._hosts[(host, port)] = (now + self.ttl, verdict)
        return verdict

    @staticmethod
    def storage(url: str, field: str) -> None:
        try:
            check_storage_url(url)
        except ValueError as error:
            raise invalid(field, f"must be an s3:// or file:// URL: {error}") from None


async def check_item(item: AsyncPredictBody, urls: UrlChecker, max_metadata_bytes: int, prefix: str = "") -> None:
    """The rules msgspec cannot express, for one async_predict body."""
    if item.model_input is None or bytes(item.model_input) == b"null":
        raise invalid(prefix + "model_input", "must not be null")
    check_numbers(bytes(item.model_input), prefix + "model_input")
    metadata = item.metadata
    if metadata is not msgspec.UNSET:
        raw = bytes(metadata)
        if raw != b"null":
            if raw[:1] != b"{":
                raise invalid(prefix + "metadata", RULES["metadata"])
            if len(raw) > max_metadata_bytes:
                raise invalid(prefix + "metadata", f"must be at most {max_metadata_bytes} bytes of JSON")
            check_numbers(raw, prefix + "metadata")
    if item.webhook_endpoint is not None:
        await urls.webhook(item.webhook_endpoint, prefix + "webhook_endpoint")
    if item.output_url is not None:
        urls.storage(item.output_url, prefix + "output_url")


def check_numbers(raw: bytes, field: str) -> None:
    """Refuse a JSON value holding a number a worker could not decode."""
    if _BIG_NUMBER.search(raw) is None:
        return
    try:
        msgspec.json.decode(raw)
    except msgspec.ValidationError:
        raise invalid(field, "numbers must fit a double (about 1.8e308) and integers 4300 digits") from None


def query_float(value: Any, field: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(field, f"must be a number between {low:g} and {high:g}") from None
    if not (low <= number <= high):
        raise invalid(field, f"must be a number between {low:g} and {high:g}")
    return number


def query_int(value: Any, field: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(field, f"must be an integer between {low} and {high}") from None
    if not (low <= number <= high):
        raise invalid(field, f"must be an integer between {low} and {high}")
    return number
