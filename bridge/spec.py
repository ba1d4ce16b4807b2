"""What a peer's `Bridge` value means, sans-IO: which carrier, which server, how many bytes it adds.

    ss://...               Shadowsocks UDP (any method bridge.shadowsocks supports), SIP002 URI
    udp2tcp://HOST:PORT    udp-over-tcp, Mullvad's framing

One parser for every place a bridge is written: a config file's `Bridge =` (tunnel/config.py,
tunnel/quick.py), the UAPI extension key `wgpy_bridge=` (tunnel/uapi.py) and `wgpy set ... bridge`.
A BridgeSpec is parsed once: it holds the Shadowsocks server as a ServerConfig (method,
password, host, port), and its canonical URI text for the UAPI and for equality.

The daemon only takes numeric hosts, as UAPI's `endpoint=` does: the client side resolves names
first (`with_host`), so the daemon never blocks on DNS and never resolves anything the user did
not see resolved. Error messages never quote the value (an ss:// URI holds a password), and
neither does repr().
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from transport.address import AddressError, canonical_host, check_host, format_address, split_host_port

from .shadowsocks import Cipher, ServerConfig, ShadowsocksError, Udp2022Client, Udp2022Server, format_uri, parse_uri

Address = tuple[str, int]


class BridgeError(ValueError):
    """A Bridge value that cannot be used; the message quotes nothing from it."""


@dataclass(frozen=True)
class BridgeSpec:
    kind: str  # "ss" or "udp2tcp"
    server: Address  # where the carrier sends: the Shadowsocks or udp-over-tcp server
    uri: str = field(repr=False)  # canonical text; for ss:// it holds the password
    method: str = ""  # the Shadowsocks method ("" for udp2tcp)
    # ss:// only: the server as parsed (holds the password); compared through `uri`.
    shadowsocks: ServerConfig | None = field(default=None, repr=False, compare=False)

    @property
    def numeric(self) -> bool:
        try:
            ipaddress.ip_address(self.server[0])
            return True
        except ValueError:
            return False

    def cipher(self) -> Cipher:
        """A new Cipher for this Shadowsocks server (each carrier keeps its own)."""
        if self.shadowsocks is None:
            raise BridgeError(f"a {self.kind} bridge has no cipher")
        return self.shadowsocks.cipher()

    def overhead(self, target: Any) -> int:
        """Bytes a datagram grows by between us and the server, in the larger of the two directions
        (outer IP/UDP headers not counted; replies carry `target` as their source). udp2tcp: 0,
        since TCP segments to the path whatever the datagram size."""
        if self.shadowsocks is None:
            return 0
        cipher = self.cipher()
        try:
            if cipher.method.is_2022:
                # The larger direction: replies carry the client's session id as well.
                return max(Udp2022Client(cipher).overhead(tuple(target), padding=0),
                           Udp2022Server(cipher).overhead(tuple(target), padding=0))
            return cipher.udp_overhead(tuple(target))
        except ShadowsocksError as exc:
            raise BridgeError(str(exc)) from None

    def redacted(self) -> str:
        """For logs and `wgpy show`: the kind, method and server, never the password."""
        if self.kind == "udp2tcp":
            return f"udp2tcp://{format_address(self.server)}"
        return f"ss://{self.method}@{format_address(self.server)}"

    def with_host(self, host: str) -> BridgeSpec:
        """The same bridge with the server's host replaced (by its resolved address). Raises
        BridgeError for a host that is not an IP address or a host name."""
        try:
            check_host(host)
        except AddressError as exc:
            raise BridgeError(f"bridge server: {exc}") from None
        if self.shadowsocks is None:
            return _udp2tcp_spec(canonical_host(host), self.server[1])
        return _shadowsocks_spec(replace(self.shadowsocks, host=canonical_host(host)))


def _udp2tcp_spec(host: str, port: int) -> BridgeSpec:
    return BridgeSpec("udp2tcp", (host, port), f"udp2tcp://{format_address((host, port))}")


def _shadowsocks_spec(config: ServerConfig) -> BridgeSpec:
    if config.plugin:
        raise BridgeError("ss URI: plugins are not supported")
    return BridgeSpec("ss", (config.host, config.port), format_uri(config), config.method, config)


def parse_bridge(value: str, *, numeric: bool = False) -> BridgeSpec:
    """Validate a Bridge value. `numeric`: the server must be an IP address (the daemon's rule)."""
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise BridgeError("expected ss://... or udp2tcp://HOST:PORT")
    if scheme == "udp2tcp":
        try:
            host, port = split_host_port(rest[:-1] if rest.endswith("/") else rest)
        except AddressError as exc:  # names the part that is wrong, quotes nothing
            raise BridgeError(f"udp2tcp://: {exc} (expected udp2tcp://HOST:PORT)") from None
        spec = _udp2tcp_spec(canonical_host(host), port)
    elif scheme == "ss":
        try:
            spec = _shadowsocks_spec(parse_uri(value))
        except ShadowsocksError as exc:  # messages never contain the password
            raise BridgeError(str(exc)) from None
        except UnicodeError:  # undecodable bytes in the password (a file read with surrogateescape)
            raise BridgeError("ss URI: the password is not valid UTF-8") from None
    else:
        raise BridgeError("expected ss://... or udp2tcp://HOST:PORT")
    if numeric and not spec.numeric:
        raise BridgeError("the server must be an IP address here (resolve the name first)")
    return spec
