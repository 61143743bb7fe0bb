"""Where a URL may send us: refuse private, loopback and link-local targets.

Checked twice: when a request names a webhook (a clear 4xx) and again right
before each delivery, because DNS can change in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


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


async def check_target(url: str, allow_private: bool) -> None:
    """Raise TargetRefused unless `url` is http(s) and resolves only to public addresses."""
    host, port = check_url_shape(url)
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise TargetRefused(f"host {host!r} does not resolve: {error.strerror}") from None
    for *_, sockaddr in infos:
        reason = forbidden_reason(sockaddr[0])
        if reason:
            raise TargetRefused(f"host {host!r} resolves to {sockaddr[0]}, a {reason} address")
