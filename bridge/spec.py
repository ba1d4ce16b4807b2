"""What a peer's `Bridge` value means, sans-IO: which carrier, which server, how many bytes it adds.

    ss://...               Shadowsocks UDP (any method bridge.shadowsocks supports), SIP002 URI
    udp2tcp://HOST:PORT    udp-over-tcp, Mullvad's framing

One parser for every place a bridge is written: a config file's `Bridge =` (tunnel/config.py,
tunnel/quick.py), the UAPI extension key `wgpy_bridge=` (tunnel/uapi.py) and `wgpy set ... bridge`.

The daemon only takes numeric hosts, as UAPI's `endpoint=` does: the client side resolves names
first (`with_host`), so the daemon never blocks on DNS and never resolves anything the user did
not see resolved. Error messages never quote the value (an ss:// URI holds a password).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from .netio import format_address

Address = tuple[str, int]


class BridgeError(ValueError):
    """A Bridge value that cannot be used; the message quotes nothing from it."""


@dataclass(frozen=True)
class BridgeSpec:
    kind: str  # "ss" or "udp2tcp"
    server: Address  # where the carrier sends: the Shadowsocks or udp-over-tcp server
    uri: str = field(repr=False)  # canonical text; for ss:// it holds the password
    method: str = ""  # the Shadowsocks method ("" for udp2tcp)

    @property
    def numeric(self) -> bool:
        try:
            ipaddress.ip_address(self.server[0])
            return True
        except ValueError:
            return False

    def overhead(self, target: Any) -> int:
        """Bytes a datagram grows by between us and the server, in the larger of the two directions
        (outer IP/UDP headers not counted; replies carry `target` as their source). udp2tcp: 0,
        since TCP segments to the path whatever the datagram size."""
        if self.kind == "udp2tcp":
            return 0
        from .shadowsocks import ShadowsocksError, Udp2022Client, Udp2022Server, parse_uri

        cipher = parse_uri(self.uri).cipher()
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

    def with_host(self, host: str) -> "BridgeSpec":
        """The same bridge with the server's host replaced (by its resolved address)."""
        if self.kind == "udp2tcp":
            return parse_bridge(f"udp2tcp://{format_address((host, self.server[1]))}")
        from .shadowsocks import format_uri, parse_uri

        return parse_bridge(format_uri(replace(parse_uri(self.uri), host=host)))


def parse_bridge(value: str, *, numeric: bool = False) -> BridgeSpec:
    """Validate a Bridge value. `numeric`: the server must be an IP address (the daemon's rule)."""
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise BridgeError("expected ss://... or udp2tcp://HOST:PORT")
    from .shadowsocks import ShadowsocksError, format_uri, parse_uri
    from .shadowsocks.uri import split_host_port

    if scheme == "udp2tcp":
        try:
            host, port = split_host_port(rest[:-1] if rest.endswith("/") else rest, "udp2tcp://")
        except ShadowsocksError as exc:  # names the part that is wrong, quotes nothing
            raise BridgeError(f"{exc} (expected udp2tcp://HOST:PORT)") from None
        spec = BridgeSpec("udp2tcp", (host, port), f"udp2tcp://{format_address((host, port))}")
    elif scheme == "ss":
        try:
            config = parse_uri(value)
            uri = format_uri(config)
        except ShadowsocksError as exc:  # messages never contain the password
            raise BridgeError(str(exc)) from None
        except UnicodeError:  # undecodable bytes in the password (a file read with surrogateescape)
            raise BridgeError("ss URI: the password is not valid UTF-8") from None
        if config.plugin:
            raise BridgeError("ss URI: plugins are not supported")
        spec = BridgeSpec("ss", (config.host, config.port), uri, config.method)
    else:
        raise BridgeError("expected ss://... or udp2tcp://HOST:PORT")
    if numeric and not spec.numeric:
        raise BridgeError("the server must be an IP address here (resolve the name first)")
    return spec
