"""Where a URL may send us: refuse private, loopback and link-local targets.

Checked when a request names a webhook (a clear 4xx), again right before
each delivery, and at the connect itself (GuardedNetworkBackend), on the very
DNS answer the connection uses: DNS can change between any two lookups.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx


class TargetRefused(ValueError):
    """The URL is malformed or points somewhere we must not call."""


def check_url_shape(url: str, schemes: tuple[str, ...] = ("http", "https")) -> tuple[str, int]:
    """Parse a webhook URL; returns (host, port) or raises TargetRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"not a valid URL: {error}") from None
    if parts.scheme not in schemes:
        raise TargetRefused(f"scheme must be one of {', '.join(schemes)}, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise TargetRefused("URL has no host")
    if parts.username or parts.password:
        raise TargetRefused("credentials in the URL are not allowed")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def forbidden_reason(address: str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for label, hit in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("unspecified", ip.is_unspecified),
    ):
        if hit:
            return label
    if not ip.is_global:  # shared address space (100.64/10, cloud metadata), benchmarking nets, ...
        return "non-global"
    return None


async def public_addresses(host: str, port: int, timeout: float | None = None) -> list[str]:
    """The addresses `host` resolves to, or TargetRefused when it does not
    resolve or any of them is not public."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except socket.gaierror as error:
        raise TargetRefused(f"host {host!r} does not resolve: {error.strerror}") from None
    except TimeoutError:
        raise TargetRefused(f"host {host!r} does not resolve: no answer in {timeout} s") from None
    addresses = [sockaddr[0] for *_, sockaddr in infos]
    for address in addresses:
        reason = forbidden_reason(address)
        if reason:
            raise TargetRefused(f"host {host!r} resolves to {address}, a {reason} address")
    return addresses


async def check_target(url: str, allow_private: bool) -> None:
    """Raise TargetRefused unless `url` is http(s) and resolves only to public addresses."""
    host, port = check_url_shape(url)
    if not allow_private:
        await public_addresses(host, port)


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """The webhook client's network backend: the check and the connect use
    the same DNS answer. It resolves the host itself, refuses the
    connection when any address is not public, and connects to a checked
    address, so DNS that answers public to the check and private to the
    connect (rebinding) cannot reach a private address. TLS still verifies
    and sends SNI for the URL's host name (httpcore takes it from the URL)."""

    def __init__(self, allow_private: bool, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.allow_private = allow_private
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        if self.allow_private:
            return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            addresses = await public_addresses(host, port, timeout)
        except TargetRefused as error:
            raise httpcore.ConnectError(f"refused: {error}") from None
        last: Exception | None = None
        for address in dict.fromkeys(addresses):  # each checked address in turn, as a resolver-driven connect would
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as error:
                last = error
        raise last or httpcore.ConnectError(f"host {host!r}: no address to connect to")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_transport(allow_private: bool, **transport_options: Any) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through GuardedNetworkBackend.
    (httpx does not take a network backend; its pool is httpcore's, which does.)"""
    transport = httpx.AsyncHTTPTransport(**transport_options)
    transport._pool._network_backend = GuardedNetworkBackend(allow_private)  # noqa: SLF001 - see docstring
    return transport
