"""Where a webhook may send: http(s) URLs whose host resolves to public addresses only, unless the
operator allows a host name, address or network (`DISTILL_WEBHOOK_ALLOW_HOSTS`).

Checked when a webhook is created and again before every attempt (a name may resolve elsewhere later).
Between that check and the connection the name is resolved once more by the HTTP client, so a DNS server
that answers differently within that moment is not caught; redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
MAX_URL_LENGTH = 2048


class DestinationRefused(ValueError):
    """The URL is malformed or points at an address webhooks may not reach."""


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DestinationRefused(f"the URL's host {host!r} cannot be resolved") from exc
    return [str(info[4][0]) for info in infos]


def _kind(address: IPAddress) -> str | None:
    """What makes `address` unfit for a webhook (None for a public address)."""
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "reserved"
    return None


def _allowed(host: str, addresses: list[IPAddress], allow: Sequence[str]) -> tuple[bool, list[IPAddress]]:
    """Whether the host name itself is allowed, and which addresses are not covered by an allowed entry."""
    names: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    if host.lower().rstrip(".") in names:
        return True, []
    return False, [a for a in addresses if not any(a in network for network in networks)]


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 scope (`fe80::1%eth0`) is not part of it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_url(url: str, allow: Sequence[str] = (), *, resolve: Resolver = _resolve) -> str:
    """`url` when webhooks may send to it, else DestinationRefused with the reason."""
    if len(url) > MAX_URL_LENGTH:
        raise DestinationRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        raise DestinationRefused("the URL holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DestinationRefused(f"the URL is malformed: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise DestinationRefused("the URL must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise DestinationRefused("the URL has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [_address(host)]
    except ValueError:
        allowed_by_name, _ = _allowed(host, [], allow)
        if allowed_by_name:
            return url
        addresses = [_address(text) for text in dict.fromkeys(resolve(host, port))]
    allowed_by_name, uncovered = _allowed(host, addresses, allow)
    if allowed_by_name:
        return url
    for address in uncovered:
        kind = _kind(address)
        if kind is not None:
            shown = host if host == str(address) else f"{host} ({address})"
            raise DestinationRefused(
                f"the URL's host {shown} is a {kind} address; webhooks are sent to public addresses only "
                "unless DISTILL_WEBHOOK_ALLOW_HOSTS allows it"
            )
    return url
