"""Kill switch (`KillSwitch = on`) and DNS leak protection: an nftables table of wgpy's own.

While a `wgpy up` interface with `KillSwitch = on` exists (and after its daemon died, until
`wgpy down`), one table per interface, `inet wgpy-ks-IFNAME`, drops every packet leaving the
host (output hook) or forwarded by it (forward hook) except:

- loopback;
- the first hop's own packets: its address, protocol and port, sent with the daemon's fwmark
  (a plain peer's endpoint over UDP; a Shadowsocks bridge's server over UDP, a udp2tcp bridge's
  over TCP; for multihop only the entry relay, since the exit's datagrams travel inside the
  entry's). They are the elements of the named sets `hops4` / `hops6`
  (mark . address . protocol . port), which the daemon keeps equal to what it sends to
  (`follow`: the sets are replaced in one nft transaction whenever they change);
- DHCP (v4 client 68 -> 67; DHCPv6 from link-local to ff02::1:2, 546 -> 547) and IPv6
  neighbour discovery (router/neighbour solicitations and neighbour advertisements with hop
  limit 255: they cannot leave the link, and an IPv6 first hop needs them);
- with `DNS =` servers: DNS (UDP/TCP 53, DoT TCP 853) only to those servers and only through the
  tunnel interface; every other DNS packet is dropped, before any LAN or tunnel rule;
- when the tunnel carries no IPv6 (no peer has an IPv6 AllowedIP) all other IPv6 is dropped,
  link-local aside with AllowLAN;
- everything through the tunnel interface (forwarded: out through it, and replies coming back
  through it);
- with `AllowLAN = on`: private and link-local ranges (10/8, 172.16/12, 192.168/16,
  169.254/16, fc00::/7, fe80::/10) and multicast that stays in the LAN (224.0.0.0/24,
  239.0.0.0/8, 255.255.255.255, ff01::/16, ff02::/16, ff05::/16).

Nothing else is touched: no other table, chain or rule. The table is created atomically
(replacing a stale one of the same name in the same transaction) and removed by `wgpy down`
through the journal (tunnel/quick.py), never by the daemon: a daemon that dies leaves it.

    text = render(KillSwitch("wg0", fwmark=0xca6c, hops=hops_of([("192.0.2.1", "udp", 51820)]),
                             dns=(ipaddress.ip_address("10.64.0.1"),)))
    apply(text)                                   # nft -f -
    apply(render_hops("wg0", 0xca6c, new_hops))   # what the daemon does when its first hops move

`render`, `render_hops`, `hops_of` and `table_name` are pure (text out); `apply` runs `nft`;
`follow` is the daemon's task (trio).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Protocol, Union

import trio

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

log = logging.getLogger("wgpy")

LAN4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
LAN6 = ("fc00::/7", "fe80::/10")
MULTICAST4 = ("224.0.0.0/24", "239.0.0.0/8", "255.255.255.255")
MULTICAST6 = ("ff01::/16", "ff02::/16", "ff05::/16")
LINK_LOCAL6 = ("fe80::/10", "ff02::/16")  # AllowLAN while IPv6 is blocked
DNS_UDP_PORTS = (53,)
DNS_TCP_PORTS = (53, 853)  # DNS over TCP, DNS over TLS
PROTOCOLS = ("udp", "tcp")
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")  # wg-quick's interface names
_NFT_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what an nft identifier may hold after "wgpy-ks-"
POLL_INTERVAL = 0.25  # the daemon's look at its first hops between configuration changes (roaming)
RETRY_MAX = 5.0


class KillSwitchError(Exception):
    pass


@dataclass(frozen=True, order=True)
class Hop:
    """A first hop: where the daemon's own packets go on the wire."""

    family: int  # 4 or 6
    proto: str  # "udp" or "tcp"
    address: str  # canonical text (ipaddress), no scope
    port: int  # 1..65535


@dataclass(frozen=True)
class KillSwitch:
    """What the table allows: a plain description, `render`'s only input."""

    ifname: str
    fwmark: int = 0  # the daemon's socket mark (0: first hops matched without one)
    hops: frozenset[Hop] = frozenset()
    allow_lan: bool = False
    dns: tuple[IPAddress, ...] = ()  # DNS servers: DNS only to them, only through the tunnel
    block_ipv6: bool = False  # the tunnel carries no IPv6: drop IPv6 (first hops, ND, DHCPv6 aside)


def _check_ifname(ifname: str) -> None:
    if not _IFNAME.fullmatch(ifname):
        raise ValueError(f"invalid interface name {ifname!r}")


def table_name(ifname: str) -> str:
    """`wgpy-ks-IFNAME`; an interface name with characters nft identifiers cannot hold (`+`,
    `=`) is spelled in hex instead (`wgpy-ksx-HEX`), so distinct interfaces never share a table."""
    _check_ifname(ifname)
    if _NFT_NAME.fullmatch(ifname):
        return f"wgpy-ks-{ifname}"
    return f"wgpy-ksx-{ifname.encode().hex()}"


def other_tables(listing: str, ours: str) -> list[str]:
    """The kill-switch tables in `nft list tables` output other than `ours`."""
    out = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) == 3 and words[:2] == ["table", "inet"] and words[2] != ours \
                and words[2].startswith(("wgpy-ks-", "wgpy-ksx-")):
            out.append(words[2])
    return out


def inet_tables(listing: str) -> set[str]:
    """The names of the inet tables in `nft list tables` output."""
    out = set()
    for line in listing.splitlines():
        words = line.split()
        if len(words) == 3 and words[:2] == ["table", "inet"]:
            out.add(words[2])
    return out


def list_tables() -> set[str] | None:
    """This namespace's inet tables (`nft list tables`), or None when nft cannot say (not
    installed, not allowed, failing)."""
    try:
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return inet_tables(r.stdout) if r.returncode == 0 else None


@dataclass(frozen=True)
class Status:
    """What `wgpy show` says of an interface's kill switch (tunnel/show.py)."""

    table: str  # its nftables table, `inet wgpy-ks-IFNAME`
    asked: bool  # `wgpy up` made it (its journal says so)
    allow_lan: bool | None = None  # AllowLAN as `wgpy up` recorded it; None: not recorded
    present: bool | None = None  # the table exists; None: nft could not tell


def hops_of(entries: Iterable[tuple[str, str, int]]) -> frozenset[Hop]:
    """Hops from (address, "udp"|"tcp", port) as the engine reports them. Entries that are no
    numeric address (a scope is dropped), no known protocol or no valid port are left out: they
    cannot be sent to either."""
    out = set()
    for host, proto, port in entries:
        try:
            addr = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            continue
        if proto not in PROTOCOLS or not isinstance(port, int) or not 0 < port < 65536:
            continue
        out.add(Hop(addr.version, proto, str(addr), port))
    return frozenset(out)


def _elements(fwmark: int, hops: Iterable[Hop], family: int) -> str:
    return ", ".join(f"{fwmark:#x} . {h.address} . {h.proto} . {h.port}"
                     for h in sorted(hops) if h.family == family)


def _set(name: str, addr_type: str, elements: str) -> str:
    body = f"type mark . {addr_type} . inet_proto . inet_service"
    if elements:
        body += f"; elements = {{ {elements} }}"
    return f"\tset {name} {{ {body}; }}\n"


def _anonymous(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def render(ks: KillSwitch) -> str:
    """The nft script that (re)creates the table in one transaction: `add table` + `delete
    table` first, so a table of that name left by a crash is replaced without a gap, never
    merged with."""
    _check_ifname(ks.ifname)
    if not 0 <= ks.fwmark <= 0xFFFFFFFF:
        raise ValueError(f"fwmark {ks.fwmark} out of range")
    t = table_name(ks.ifname)
    tun = f'"{ks.ifname}"'
    dns4 = sorted({str(a) for a in ks.dns if a.version == 4}, key=ipaddress.ip_address)
    dns6 = sorted({str(ipaddress.ip_address(str(a).split("%", 1)[0])) for a in ks.dns if a.version == 6},
                  key=ipaddress.ip_address)
    if ks.block_ipv6:
        dns6 = []  # IPv6 does not go through the tunnel: no IPv6 DNS at all
    lines = [f"add table inet {t}", f"delete table inet {t}", f"table inet {t} {{"]
    lines.append(f'\tcomment "wgpy kill switch for {ks.ifname}: removed by wgpy down {ks.ifname}"')
    text = "\n".join(lines) + "\n"
    text += _set("hops4", "ipv4_addr", _elements(ks.fwmark, ks.hops, 4))
    text += _set("hops6", "ipv6_addr", _elements(ks.fwmark, ks.hops, 6))

    dns_jump: list[str] = []
    if ks.dns:
        text += "\tchain dns {\n"
        if dns4:
            text += f"\t\toifname {tun} ip daddr {_anonymous(dns4)} accept\n"
        if dns6:
            text += f"\t\toifname {tun} ip6 daddr {_anonymous(dns6)} accept\n"
        text += "\t\tcounter drop\n\t}\n"
        dns_jump = [f"udp dport {_anonymous(map(str, DNS_UDP_PORTS))} jump dns",
                    f"tcp dport {_anonymous(map(str, DNS_TCP_PORTS))} jump dns"]

    block6 = []
    if ks.block_ipv6:
        if ks.allow_lan:
            block6.append(f"ip6 daddr {_anonymous(LINK_LOCAL6)} accept")
        block6.append("meta nfproto ipv6 counter drop")
    lan = []
    if ks.allow_lan:
        lan.append(f"ip daddr {_anonymous(LAN4 + MULTICAST4)} accept")
        if not ks.block_ipv6:
            lan.append(f"ip6 daddr {_anonymous(LAN6 + MULTICAST6)} accept")

    output = [
        "type filter hook output priority filter; policy drop;",
        'oifname "lo" accept',
        "meta mark . ip daddr . meta l4proto . th dport @hops4 accept",
        "meta mark . ip6 daddr . meta l4proto . th dport @hops6 accept",
        "meta nfproto ipv4 udp sport 68 udp dport 67 accept",
        "ip6 saddr fe80::/10 ip6 daddr ff02::1:2 udp sport 546 udp dport 547 accept",
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        *dns_jump,
        *block6,
        f"oifname {tun} accept",
        *lan,
        "counter drop",
    ]
    forward = [
        "type filter hook forward priority filter; policy drop;",
        *dns_jump,
        *[r for r in block6 if "accept" not in r],  # link-local is never forwarded
        f"oifname {tun} accept",
        f"iifname {tun} ct state established,related accept",
        *lan,
        "counter drop",
    ]
    for name, rules in (("output", output), ("forward", forward)):
        text += f"\tchain {name} {{\n" + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n"
    return text + "}\n"


def render_hops(ifname: str, fwmark: int, hops: Iterable[Hop]) -> str:
    """The nft script that replaces the first-hop sets' elements in one transaction (a packet
    sees the old sets or the new ones, never a mix or none). Fails, changing nothing, if the
    table is gone: it never creates one."""
    t = table_name(ifname)
    hops = list(hops)
    text = f"flush set inet {t} hops4\nflush set inet {t} hops6\n"
    for name, family in (("hops4", 4), ("hops6", 6)):
        elements = _elements(fwmark, hops, family)
        if elements:
            text += f"add element inet {t} {name} {{ {elements} }}\n"
    return text


def apply(text: str) -> None:
    """`nft -f -` with `text`; KillSwitchError with nft's message on failure."""
    try:
        r = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise KillSwitchError("`nft` (nftables) is not installed; the kill switch needs it") from None
    except subprocess.TimeoutExpired:
        raise KillSwitchError("`nft -f -` timed out") from None
    if r.returncode != 0:
        raise KillSwitchError(f"nft: {(r.stderr or r.stdout).strip()}")


async def apply_async(text: str) -> None:
    """`apply` for the daemon: the nft process runs without blocking the engine."""
    try:
        r = await trio.run_process(["nft", "-f", "-"], stdin=text.encode(), capture_stdout=True,
                                   capture_stderr=True, check=False)
    except OSError as exc:
        raise KillSwitchError(f"cannot run nft: {exc.strerror or exc}") from None
    if r.returncode != 0:
        raise KillSwitchError(f"nft: {(r.stderr or r.stdout).decode(errors='replace').strip()}")


class FirstHops(Protocol):
    """What `follow` needs of the engine (tunnel/engine.py)."""

    ifname: str
    first_hops_changed: trio.Event

    @property
    def fwmark(self) -> int: ...

    def first_hops(self) -> frozenset[tuple[str, str, int]]: ...


async def follow(engine: FirstHops, *, apply: Callable[[str], Awaitable[None]] = apply_async,
                 poll: float = POLL_INTERVAL) -> None:
    """The daemon's task: keep the table's first-hop sets equal to the engine's first hops and
    fwmark. Woken by `engine.first_hops_changed` (set after every UAPI set: endpoints, bridges,
    vias, peers, fwmark) and every `poll` seconds (an endpoint that roamed to the source of an
    authenticated packet). Starts from (no hops, mark 0): until the first configuration arrives
    it leaves the sets `wgpy up` wrote alone. A failed update (the table gone, nft failing) is
    logged and retried with backoff; it never removes or creates the table."""
    applied: tuple[int, frozenset[Hop]] = (0, frozenset())
    failures = 0
    last_error = ""
    while True:
        changed = engine.first_hops_changed
        want = (engine.fwmark, hops_of(engine.first_hops()))
        wait = poll
        if want != applied:
            try:
                await apply(render_hops(engine.ifname, *want))
            except KillSwitchError as exc:
                failures += 1
                wait = min(RETRY_MAX, poll * 2 ** failures)
                if str(exc) != last_error:
                    log.error("%s: kill switch: cannot update the allowed first hops: %s", engine.ifname, exc)
                    last_error = str(exc)
            else:
                applied, failures, last_error = want, 0, ""
                log.info("%s: kill switch: %d first hop(s) allowed", engine.ifname, len(want[1]))
                log.debug("%s: kill switch: first hops %s", engine.ifname,
                          ", ".join(f"{h.proto} {h.address} port {h.port}" for h in sorted(want[1])) or "none")
        with trio.move_on_after(wait):
            await changed.wait()
