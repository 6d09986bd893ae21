"""SSRF guard for webhook URLs: a tenant-supplied URL must not make churnguard call into its own
network (loopback, private ranges, link-local, cloud metadata endpoints).

Checked twice: when a subscription is created (the host name is resolved and every address it
resolves to must be public), and again at connect time by the delivery worker's resolver, so a
name that later resolves elsewhere (DNS rebinding) is refused before any byte is sent.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused even when local URLs are allowed, because reaching
# them from a server hands out its cloud credentials (AWS/GCP/Azure/OpenStack, AWS IPv6, ECS
# task metadata, Alibaba Cloud).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)


class UnsafeUrl(ValueError):
    """The URL may not be used as a webhook target; the message says why."""


def address_problem(ip: IPAddress, allow_local: bool) -> str | None:
    """Why this address must not be called, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if allow_local:
        return None
    for kind, flag in (
        ("a loopback", ip.is_loopback),
        ("an unspecified", ip.is_unspecified),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a reserved", ip.is_reserved),  # before private: Python counts 240/4 as both
        ("a private", ip.is_private),
    ):
        if flag:
            return f"{ip} is {kind} address"
    if not ip.is_global:  # shared address space (100.64/10) and other special-purpose ranges
        return f"{ip} is not a public address"
    return None


Resolve = Callable[[str, int], Iterable[str]]


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class UrlPolicy:
    allow_local: bool = False
    resolve: Resolve = system_resolve

    def check(self, url: str) -> str:
        """Return the URL when it may be a webhook target; raise UnsafeUrl naming the reason.
        Resolves the host name (blocking: call it from a thread or a sync route)."""
        parts = urlsplit(url)
        allowed_schemes = ("https", "http") if self.allow_local else ("https",)
        if parts.scheme not in allowed_schemes:
            raise UnsafeUrl(
                "must use https"
                if not self.allow_local
                else f"scheme {parts.scheme!r} is not http or https"
            )
        host = parts.hostname
        if not host:
            raise UnsafeUrl("has no host")
        if parts.username or parts.password:
            raise UnsafeUrl("must not carry credentials")
        literal = ip_literal(host)
        if literal is not None:
            self.check_address(literal, host)
            return url
        try:
            addresses = list(self.resolve(host, parts.port or 443))
        except (OSError, UnicodeError) as exc:
            if self.allow_local:  # development: the connect-time check still guards metadata
                return url
            raise UnsafeUrl(f"host {host!r} does not resolve ({exc})") from None
        if not addresses and not self.allow_local:
            raise UnsafeUrl(f"host {host!r} does not resolve")
        for address in addresses:
            self.check_address(ipaddress.ip_address(address), host)
        return url

    def check_address(self, ip: IPAddress, host: str) -> None:
        problem = address_problem(ip, self.allow_local)
        if problem is not None:
            shown = host if ip_literal(host) is not None else f"{host!r} resolves to {ip}"
            raise UnsafeUrl(f"refused: {shown}; {problem.split(' is ', 1)[1]}")


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
