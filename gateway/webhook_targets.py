"""Where a webhook may be POSTed: the address policy (no private, loopback, link-local, metadata
or other non-public address unless allow-listed) and an HTTP transport that enforces it.

The policy is checked twice. At submit, on the URL's literal address or on what its host name
resolves to now: a quick 422 for the obvious cases. Then at every connection, on the address the
transport actually connects to, resolved by the transport itself: a name that resolved to a
public address at submit and to 169.254.169.254 later (DNS rebinding) is refused there, as the
TCP connection goes to exactly the address that was checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import httpcore
import httpx

from shared.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

RESOLVE_TIMEOUT_S = 2.0
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(httpcore.ConnectError):
    """The connection's address is not an allowed webhook target (final: never retried)."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address hiding in an IPv4-mapped or NAT64 IPv6 address, else `ip`."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


class TargetPolicy:
    """Which webhook targets are allowed: public unicast addresses, plus `allow` entries (CIDR
    ranges or exact host names) for trusted internal receivers."""

    def __init__(self, allow: Iterable[str] = (), resolver: Resolver = resolve) -> None:
        self.networks: list[Network] = []
        self.hosts: set[str] = set()
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self.hosts.add(entry.strip().lower().rstrip("."))
        self.resolver = resolver

    def address_refused(self, address: str) -> str | None:
        """Why `address` may not be a target, or None when it may."""
        ip = _unwrap(ipaddress.ip_address(address.split("%", 1)[0]))
        if any(ip in net for net in self.networks):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address (cloud metadata lives there)"
        if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return "not a unicast address"
        if not ip.is_global:
            return "a private or otherwise non-public address"
        return None

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`: each one allowed, else AddressRefused."""
        name = host.lower().rstrip(".")
        try:
            literal = [str(ipaddress.ip_address(name.strip("[]")))]
        except ValueError:
            literal = []
        if not literal and name in self.hosts:
            return await self._resolve(host, port)
        if not literal and (name == "localhost" or name.endswith(".localhost")):
            raise AddressRefused(f"webhook host {host!r} is loopback")
        found = literal or await self._resolve(host, port)
        for address in found:
            reason = self.address_refused(address)
            if reason is not None:
                raise AddressRefused(f"webhook host {host!r} resolves to {address}, {reason}")
        return found

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                found = await self.resolver(host, port)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve webhook host {host!r}: {exc}") from exc
        if not found:
            raise httpcore.ConnectError(f"webhook host {host!r} has no address")
        return found

    async def check_url(self, url: str) -> None:
        """The submit-time check: InvalidInput (422) naming why the URL is refused."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise InvalidInput(f"webhook: not a valid URL: {exc}", field="webhook") from None
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidInput("webhook: must be an http:// or https:// URL with a host",
                               field="webhook")
        try:
            await self.addresses(host, port or (443 if parts.scheme == "https" else 80))
        except httpcore.ConnectError as exc:
            raise InvalidInput(f"webhook: {exc}", field="webhook") from None


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, resolving names itself."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.addresses(host, port)
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address,
                                                    socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"no address for {host!r}")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("webhooks never go to a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_client(policy: TargetPolicy, *, timeout_s: float, max_connections: int,
                   headers: dict[str, str]) -> httpx.AsyncClient:
    """An HTTP client whose every connection passes `policy`. No proxies from the environment
    (the check must see the receiver's address, not a proxy's), no redirects."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx takes no network backend; its pool is rebuilt with one (public httpcore API).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=max_connections,
        network_backend=_GuardedBackend(policy))
    return httpx.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=False,
                             trust_env=False, headers=headers)


def refused(exc: BaseException) -> bool:
    """Whether an httpx error came from the address policy (so retrying cannot help)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
