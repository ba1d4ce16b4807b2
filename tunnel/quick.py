"""`wgpy up` / `wgpy down`: what wg-quick does, with wgpy-daemon as the interface and every host
change journaled (tunnel/netconfig.py) so `down` restores the host exactly.

Order (as wg-quick): PreUp, daemon, keys and peers, addresses, MTU and link up, DNS, routes
(policy routing for 0.0.0.0/0 and ::/0), PostUp. Any failure undoes what was done and exits 1.

Multihop (a peer reached through another one, by `Via` or detected: tunnel/config.py `nesting`):
the MTU is taken on the path to the *entry* peer's endpoint (or its bridge's server) and loses
80 bytes per nesting level; the host route for an exit's own address (the entry's AllowedIPs
entry that is exactly the exit's endpoint /32 or /128) is not added, since the exit's datagrams
never pass through the host's routing table.

Kill switch (`KillSwitch = on`, tunnel/killswitch.py): its nftables table is made first, before
the daemon starts, with the first hops the config names (endpoints, bridge servers, the entry of
a chain) and the daemon's fwmark (chosen as for a full tunnel when the config has none), and
journaled so that it is undone last: `down` removes it only after the interface is gone, and a
daemon that dies leaves it in place. The daemon (`wgpy-daemon --kill-switch`) keeps its
first-hop sets current. An `up` after a crash replaces the stale table in one transaction.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bridge.multihop import NEST_OVERHEAD, NestingError, check_chains, depth, entry_for
from bridge.shadowsocks import METHODS, ServerConfig, format_uri
from bridge.fallback import format_ways, parse_ways
from bridge.spec import BridgeError, BridgeSpec, parse_bridge

from . import config as wgconfig
from . import killswitch, netconfig, uapi
from .netconfig import Journal, NetError, run

WGPY_DAEMON = str(Path(sys.executable).with_name("wgpy-daemon"))
DEFAULT_TABLE = 51820


class UpError(Exception):
    pass


class Interrupted(UpError):
    """`up` stopped by SIGINT, SIGTERM or SIGHUP, after undoing what it had done."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class _Signal(BaseException):
    """Raised by the signal handler `up` installs; becomes Interrupted once rolled back."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    raise _Signal(signum)


def _hook(commands: list[str], ifname: str, what: str) -> None:
    for command in commands:
        cmd = command.replace("%i", ifname)
        r = subprocess.run(["bash", "-c", cmd], timeout=120)
        if r.returncode != 0:
            raise UpError(f"{what} command exited {r.returncode}: {cmd}")


def _resolve(host: str, port: int, kind: int = socket.SOCK_DGRAM) -> str:
    """A name's address, IPv4 preferred like wg does when both exist. Raises socket.gaierror."""
    infos = socket.getaddrinfo(host, port, type=kind)
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][4][0]


def resolve_endpoints(cfg: wgconfig.Config) -> dict[int, tuple[str, int]]:
    """Numeric endpoints for the daemon; a name that does not resolve is a FILE:LINE error."""
    out: dict[int, tuple[str, int]] = {}
    errors = []
    for i, peer in enumerate(cfg.peers):
        if peer.endpoint is None:
            continue
        host, port = peer.endpoint
        try:
            ipaddress.ip_address(host)
            out[i] = (host, port)
            continue
        except ValueError:
            pass
        try:
            out[i] = (_resolve(host, port), port)
        except socket.gaierror as exc:
            errors.append((cfg.path, peer.line, f"Endpoint: cannot resolve {host!r}: {exc.strerror}"))
    if errors:
        raise wgconfig.ConfigError(errors)
    return out


# IPv6 + UDP + WireGuard: what wg-quick subtracts from the path MTU.
TUNNEL_OVERHEAD = 80


def resolve_bridge(spec: BridgeSpec) -> BridgeSpec:
    """The bridge with its server's name resolved (the daemon takes numeric hosts only, as for
    endpoints; IPv4 preferred like wg). Raises BridgeError naming the host, never the URI."""
    if spec.numeric:
        return spec
    host, port = spec.server
    kind = socket.SOCK_STREAM if spec.kind == "udp2tcp" else socket.SOCK_DGRAM
    try:
        return spec.with_host(_resolve(host, port, kind))
    except socket.gaierror as exc:
        raise BridgeError(f"cannot resolve the bridge server {host!r}: {exc.strerror}") from None


def bridge_plan(cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]]) -> dict[int, BridgeSpec]:
    """Each bridged peer's bridge, its server resolved. Errors are FILE:LINE."""
    plan: dict[int, BridgeSpec] = {}
    errors = []
    for i, peer in enumerate(cfg.peers):
        if not peer.bridge or wgconfig.is_fallback(peer.bridge):
            continue
        try:
            spec = parse_bridge(peer.bridge)
            if spec.kind == "ss" and i not in endpoints:
                raise BridgeError("a peer with Bridge = ss://... needs Endpoint: the WireGuard "
                                  "endpoint as the bridge server sees it (e.g. 127.0.0.1:51820)")
            plan[i] = resolve_bridge(spec)
        except BridgeError as exc:  # never echoes the URI (it may hold a password)
            errors.append((cfg.path, peer.line, f"Bridge: {exc}"))
    if errors:
        raise wgconfig.ConfigError(errors)
    return plan


def fallback_plan(cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]]) -> dict[int, tuple]:
    """Each peer with several ways (`Bridge = direct, lwo, ss://..., udp2tcp://...`): its ways,
    bridge servers resolved. Errors are FILE:LINE."""
    plan: dict[int, tuple] = {}
    errors = []
    for i, peer in enumerate(cfg.peers):
        if not peer.bridge or not wgconfig.is_fallback(peer.bridge):
            continue
        try:
            if i not in endpoints:
                raise BridgeError("a peer with several ways needs Endpoint: where it is reached directly (and "
                                  "where the bridge servers deliver its datagrams)")
            plan[i] = tuple(resolve_bridge(w) if isinstance(w, BridgeSpec) else w for w in parse_ways(peer.bridge))
        except BridgeError as exc:  # never echoes the value (it may hold a password)
            errors.append((cfg.path, peer.lines.get("Bridge", peer.line), f"Bridge: {exc}"))
    if errors:
        raise wgconfig.ConfigError(errors)
    return plan


def widest_bridges(ways: dict[int, tuple], endpoints: dict[int, tuple[str, int]]) -> dict[int, BridgeSpec]:
    """For MTU planning: each fallback peer's bridge that adds the most (the tunnel's MTU must
    fit whichever way is in use)."""
    out = {}
    for i, peer_ways in ways.items():
        specs = [w for w in peer_ways if isinstance(w, BridgeSpec)]
        if specs:
            out[i] = max(specs, key=lambda spec: spec.overhead(endpoints.get(i, spec.server)))
    return out


def set_bridges(ifname: str, changes: list[tuple[bytes, str | None]], *, out=print) -> None:
    """`wgpy set IFNAME peer KEY bridge URI|off ...`: set_peers with bridges only."""
    set_peers(ifname, [(key, "bridge", value) for key, value in changes], out=out)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _redacted_bridge(text: str | None) -> BridgeSpec | None:
    """A bridge as `get=wgpy` shows it (ss://METHOD@HOST:PORT, without its password), as a spec
    good for its server and overhead only (a stand-in password of the right form)."""
    if not text:
        return None
    try:
        if text.startswith("ss://") and "@" in text:
            method, _, server = text[len("ss://"):].partition("@")
            m = METHODS.get(method.lower())
            if m is None:
                return None
            password = base64.b64encode(bytes(m.key_len)).decode() if m.is_2022 else "x"
            host, port = parse_bridge(f"udp2tcp://{server}").server
            return parse_bridge(format_uri(ServerConfig(m.name, password, host, port)))
        return parse_bridge(text)
    except (BridgeError, ValueError):
        return None


def set_peers(ifname: str, changes: list[tuple[bytes, str, object]], *, out=print) -> None:
    """`wgpy set IFNAME peer KEY bridge URI|off | via KEY|off | obfuscation lwo|off ...` on a
    running wgpy-daemon (from `wgpy up`, wg-quick with WG_QUICK_USERSPACE_IMPLEMENTATION=wgpy-daemon,
    or by hand).

    `changes`: (peer public key, "bridge", URI or None), (peer public key, "via", entry public
    key or None) or (peer public key, "obfuscation", "lwo" or None). Each bridge's server is
    resolved and each via checked against the interface's peers as they will be (entry known, not
    the peer itself, no cycle, one level, no bridge on a nested peer: bridge.multihop's rules,
    with nesting detected from allowed ips as the daemon does); LWO only on a peer reached
    directly (no bridge, no explicit via: as `Obfuscation` in a config) whose way is not chosen by
    a fallback list; then all go in one UAPI request (all or nothing), and the interface's MTU is
    lowered if a bridge's overhead or a nesting level no longer lets it fit the path."""
    status = uapi.get_status(ifname)
    peers = {p.public_key: p for p in status.peers}
    lines: list[str] = []
    bridge = {p.public_key: _redacted_bridge(p.bridge) for p in status.peers}
    bridged = {p.public_key for p in status.peers if p.bridge}
    via = {p.public_key: p.via for p in status.peers if p.via is not None}
    obfuscated = {p.public_key for p in status.peers if p.obfuscation}
    for public_key, what, value in changes:
        name = _b64(public_key)
        if public_key not in peers:
            raise UpError(f"{ifname} has no peer {name} (add it first, e.g. with `wg set`)")
        if peers[public_key].fallback and what == "obfuscation":
            raise UpError(f"peer {name} chooses its way itself (fallback: {', '.join(peers[public_key].fallback)}); "
                          f"change its Bridge list in the config instead")
        lines += [f"public_key={public_key.hex()}", "update_only=true"]
        if what == "bridge":
            spec = None
            if value is not None:
                try:
                    spec = resolve_bridge(parse_bridge(str(value)))
                except BridgeError as exc:  # never echoes the value: it may hold a password
                    raise UpError(f"bridge for peer {name}: {exc}") from None
                bridged.add(public_key)
            else:
                bridged.discard(public_key)
            bridge[public_key] = spec
            lines.append(f"wgpy_bridge={spec.uri if spec else ''}")
        elif what == "via":
            if value is None:
                via.pop(public_key, None)
            else:
                assert isinstance(value, bytes)
                if value not in peers:
                    raise UpError(f"via for peer {name}: {ifname} has no peer {_b64(value)}")
                via[public_key] = value
            lines.append(f"wgpy_via={value.hex() if isinstance(value, bytes) else ''}")
        elif what == "obfuscation":
            if value not in ("lwo", None):
                raise UpError(f"obfuscation for peer {name}: {value!r} is not lwo or off")
            if value is None:
                obfuscated.discard(public_key)
            else:
                obfuscated.add(public_key)
            lines.append(f"wgpy_obfuscation={value or ''}")
        else:
            raise ValueError(f"unknown peer setting {what!r}")
    for key in obfuscated & {key for key, _, _ in changes}:
        if key in bridged or key in via:
            raise UpError(f"peer {_b64(key)}: obfuscation lwo with {'a bridge' if key in bridged else 'via'}: "
                          "LWO is a way to send on the UDP port, and this peer's datagrams go another way")
    nest = _status_nesting(status, via)
    try:
        check_chains(nest, peers, lambda k: f"peer {_b64(k)}")
    except NestingError as exc:
        raise UpError(str(exc)) from None
    for key in nest:
        if key in bridged:
            raise UpError(f"peer {_b64(key)} is reached through peer {_b64(nest[key])} and has a bridge: "
                          "a bridge wraps only the first hop; put it on the entry peer")
    try:
        uapi.set_config(ifname, lines)
    except uapi.ControlError as exc:
        if any(what == "obfuscation" for _, what, _ in changes):
            raise UpError(f"{exc} (bridges, via and obfuscation need wgpy-daemon; wireguard-go has none of them)") from None
        raise UpError(f"{exc} (bridges and via need wgpy-daemon; wireguard-go has neither)") from None
    changed = {key for key, _, _ in changes}
    needs = []
    for key in peers:
        first, levels = key, 0
        while first in nest and levels <= 1:
            first, levels = nest[first], levels + 1
        spec = bridge.get(first)
        if (key not in changed and first not in changed) or (spec is None and not levels):
            continue
        target = peers[first].endpoint
        if spec is not None:
            needs.append(_bridge_mtu(spec, target, status.fwmark) - NEST_OVERHEAD * levels)
        else:
            host = target[0] if target is not None else None
            path = netconfig.route_mtu_towards(host, status.fwmark) or 1500
            needs.append(path - TUNNEL_OVERHEAD - NEST_OVERHEAD * levels)
    need = min(needs, default=None)
    try:
        with open(f"/sys/class/net/{ifname}/mtu") as f:
            mtu = int(f.read())
    except (OSError, ValueError):
        return
    if need is not None and mtu > need:
        run(["ip", "link", "set", "dev", ifname, "mtu", str(need)])
        out(f"wgpy: {ifname}: MTU lowered from {mtu} to {need} to fit through the bridge or the entry peer",
            file=sys.stderr)


def _status_nesting(status: uapi.InterfaceStatus, via: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """{peer: entry} of a running interface with explicit vias `via`: those, else detected from
    the peers' endpoints and allowed ips (bridge.multihop.entry_for, as the daemon does)."""
    allowed = {p.public_key: p.allowed_ips for p in status.peers}
    nest = dict(via)
    for p in status.peers:
        if p.public_key not in nest and p.endpoint is not None:
            entry = entry_for(p.endpoint[0], p.public_key, allowed)
            if entry is not None:
                nest[p.public_key] = entry
    return nest


def _bridge_mtu(spec: BridgeSpec, target: tuple[str, int] | None, fwmark: int) -> int:
    """The largest tunnel MTU whose datagrams still fit the path to the bridge's server."""
    path = netconfig.route_mtu_towards(spec.server[0], fwmark) or 1500
    return path - TUNNEL_OVERHEAD - spec.overhead(target or ("127.0.0.1", 51820))


def _claim_name(ifname: str, *, out=print) -> None:
    """Refuse a name in use here; remove a control socket whose daemon died (SIGKILL, OOM);
    name the real problem when the socket belongs to another network namespace's interface
    (/var/run/wireguard is shared by all namespaces: it is where `wg` looks)."""
    if netconfig.link_exists(ifname):
        raise UpError(f"`{ifname}' already exists")
    path = uapi.socket_path(ifname)
    state, pid = netconfig.probe_socket(path)
    if state == "stale":
        os.unlink(path)
        out(f"wgpy: removed {path}, left by a daemon that was killed", file=sys.stderr)
    elif state == "other":
        raise UpError(f"`{ifname}' already exists: {path} is not a socket")
    elif state == "live":
        if pid is not None and netconfig.same_netns(pid) is False:
            raise UpError(f"`{ifname}' is in use in another network namespace: its control socket {path} is "
                          "shared by all namespaces (it is where `wg` looks), so each name can exist in only "
                          "one; use another name here")
        raise UpError(f"`{ifname}' already exists (a daemon answers on {path})")


def _wait_for_socket(ifname: str, timeout: float = 10.0) -> None:
    path = uapi.socket_path(ifname)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise UpError(f"{ifname}: the daemon made no control socket")
        time.sleep(0.02)


def compute_mtu(endpoints: dict[int, tuple[str, int]], bridge_overhead: int = 0) -> int:
    """wg-quick's rule: the largest MTU on the routes to the endpoints (else the default route's,
    else 1500), minus 80 for the IPv6 + UDP + WireGuard headers, minus what a bridge adds."""
    best = 0
    for host, _ in endpoints.values():
        mtu = netconfig.route_mtu_towards(host)
        if mtu and mtu > best:
            best = mtu
    if best == 0:
        best = netconfig.route_mtu_towards(None) or 1500
    return best - TUNNEL_OVERHEAD - bridge_overhead


def plan_mtu(cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]], bridges: dict[int, BridgeSpec],
             nest: dict[bytes, bytes]) -> int:
    """The tunnel's MTU: `MTU =` if it fits, else an UpError saying why (the numbers); without
    it, wg-quick's rule on the paths the encrypted packets really take (the bridge servers of
    bridged peers; not a nested peer's own endpoint, which the host never routes), lowered to
    what a nested peer fits (nested_mtu_limits: route MTU to the entry - 80 per layer - the
    entry's bridge)."""
    iface = cfg.interface
    nested = {i for i, p in enumerate(cfg.peers) if p.public_key in nest}
    underlay = {i: ep for i, ep in endpoints.items() if i not in nested}
    underlay.update({i: spec.server for i, spec in bridges.items()})
    overhead = max((spec.overhead(endpoints.get(i, spec.server)) for i, spec in bridges.items()), default=0)
    if iface.mtu is not None and bridges:
        path = max((netconfig.route_mtu_towards(h) or 1500 for h, _ in underlay.values()), default=1500)
        if iface.mtu + TUNNEL_OVERHEAD + overhead > path:
            raise UpError(f"MTU {iface.mtu} cannot fit: the path to the bridge carries {path} bytes and "
                          f"WireGuard ({TUNNEL_OVERHEAD}) plus the bridge ({overhead}) need the rest; "
                          f"use MTU = {path - TUNNEL_OVERHEAD - overhead} or less")
    limits = nested_mtu_limits(cfg, endpoints, bridges, nest)
    if iface.mtu is not None:
        for fit, line, why in limits:
            if iface.mtu > fit:
                raise UpError(f"MTU {iface.mtu} cannot fit the peer reached through another one "
                              f"({cfg.path}:{line}): {why}; use MTU = {fit} or less")
        return iface.mtu
    mtu = compute_mtu(underlay, overhead)
    if limits:
        fit, line, why = min(limits)
        mtu = min(mtu, fit)
        v6 = [a for a in iface.addresses if a.version == 6]
        if mtu < wgconfig.MIN_MTU_IPV6 and v6:
            raise UpError(f"the MTU left for the peer reached through another one ({cfg.path}:{line}) is {mtu}, "
                          f"below {wgconfig.MIN_MTU_IPV6}, the IPv6 minimum, and an IPv6 Address ({v6[0]}) is "
                          f"configured: {why}")
    return mtu


def exit_host_routes(cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]],
                     nest: dict[bytes, bytes]) -> set:
    """The host routes `up` leaves out: an entry's AllowedIPs entry that is exactly its exit's
    endpoint (/32 or /128), so the exit's address never enters the host's routing table."""
    index = {p.public_key: i for i, p in enumerate(cfg.peers)}
    out = set()
    for exit_key, entry_key in nest.items():
        ep = endpoints.get(index[exit_key], cfg.peers[index[exit_key]].endpoint)
        try:
            host = ipaddress.ip_network(ep[0]) if ep is not None else None
        except ValueError:
            continue
        if host is not None and host in cfg.peers[index[entry_key]].allowed_ips:
            out.add(host)
    return out


def nested_mtu_limits(cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]],
                      bridges: dict[int, BridgeSpec], nest: dict[bytes, bytes]) -> list[tuple[int, int, str]]:
    """For each nested peer (`nest`: tunnel/config.py's nesting): the largest tunnel MTU whose
    datagrams, wrapped once more per nesting level, still fit the path to its first hop (the
    entry's endpoint, or the entry's bridge server, with its overhead), with that peer's
    [Peer] line and the arithmetic in words. (fit, line, why), in the peers' order."""
    index = {p.public_key: i for i, p in enumerate(cfg.peers)}
    out = []
    for i, peer in enumerate(cfg.peers):
        if peer.public_key not in nest:
            continue
        levels = depth(peer.public_key, nest)
        first = peer.public_key
        for _ in range(levels):
            first = nest[first]
        e = index[first]
        spec = bridges.get(e)
        if spec is not None:
            host, what = spec.server[0], "bridge server"
            extra = spec.overhead(endpoints.get(e, spec.server))
        else:
            host, what = (endpoints[e][0] if e in endpoints else None), "endpoint"
            extra = 0
        path = (netconfig.route_mtu_towards(host) if host is not None else None) \
            or netconfig.route_mtu_towards(None) or 1500
        room = path - TUNNEL_OVERHEAD - NEST_OVERHEAD * levels - extra
        # WireGuard pads what it seals to a multiple of 16 (wireguard-go on the relays too): a
        # packet of the MTU must still fit after the exit pads it, so the MTU is a multiple of 16.
        fit = room - room % 16
        layers = f"{levels + 1} layers of WireGuard ({levels + 1} x {TUNNEL_OVERHEAD})"
        why = (f"the path to the entry peer's {what} ({host or 'default route'}) carries {path} bytes, and "
               f"{layers}{f' plus the bridge ({extra})' if extra else ''} need the rest, "
               f"rounded down to WireGuard's 16-byte padding")
        out.append((fit, peer.line, why))
    return out


def _family(net) -> str:
    return "-6" if net.version == 6 else "-4"


def _add_default(journal: Journal, ifname: str, net, table: int, cfg: wgconfig.Config) -> None:
    """wg-quick's full-tunnel routing: a separate table for everything, taken only by packets
    without our fwmark, so the daemon's own (marked) UDP packets keep using the main table."""
    fam = _family(net)
    journal.cmd(["ip", fam, "rule", "add", "not", "fwmark", str(table), "table", str(table)],
                ["ip", fam, "rule", "del", "not", "fwmark", str(table), "table", str(table)])
    journal.cmd(["ip", fam, "rule", "add", "table", "main", "suppress_prefixlength", "0"],
                ["ip", fam, "rule", "del", "table", "main", "suppress_prefixlength", "0"])
    journal.cmd(["ip", fam, "route", "add", str(net), "dev", ifname, "table", str(table)], None)
    if net.version == 4:
        netconfig.set_sysctl(journal, "net.ipv4.conf.all.src_valid_mark", "1")
    if run(["nft", "--version"], check=False).returncode == 0:
        # Like wg-quick: drop packets for our tunnel addresses arriving on other interfaces, and
        # carry the fwmark of our UDP flows (and of a udp2tcp bridge's TCP connection) through
        # conntrack so replies pass rp_filter.
        nft_fam = "ip6" if net.version == 6 else "ip"
        tname = f"wgpy-{ifname}"
        addrs = [a for a in cfg.interface.addresses if a.version == net.version]
        rules = [f"add table {nft_fam} {tname}",
                 f"add chain {nft_fam} {tname} preraw {{ type filter hook prerouting priority -300; }}",
                 f"add chain {nft_fam} {tname} premangle {{ type filter hook prerouting priority -150; }}",
                 f"add chain {nft_fam} {tname} postmangle {{ type filter hook postrouting priority -150; }}"]
        for a in addrs:
            rules.append(f"add rule {nft_fam} {tname} preraw iifname != \"{ifname}\" {nft_fam} daddr {a.ip} "
                         f"fib saddr type != local drop")
        rules.append(f"add rule {nft_fam} {tname} postmangle meta l4proto {{ tcp, udp }} mark {table} ct mark set mark")
        rules.append(f"add rule {nft_fam} {tname} premangle meta l4proto {{ tcp, udp }} meta mark set ct mark")
        journal.cmd(["nft", "-f", "-"], ["nft", "delete", "table", nft_fam, tname], input="\n".join(rules) + "\n")


def up(target: str, *, out=print) -> str:
    ifname, path = wgconfig.interface_name_for(target)
    cfg, warnings = wgconfig.load_config(path)
    for w in warnings:
        out(w, file=sys.stderr)
    _claim_name(ifname, out=out)
    endpoints = resolve_endpoints(cfg)
    nest = wgconfig.nesting(cfg, endpoints)  # detection on the resolved endpoints
    bridges = bridge_plan(cfg, endpoints)
    fallbacks = fallback_plan(cfg, endpoints)
    iface = cfg.interface
    mtu = plan_mtu(cfg, endpoints, {**bridges, **widest_bridges(fallbacks, endpoints)}, nest)
    exit_hosts = exit_host_routes(cfg, endpoints, nest)
    # Full tunnels mark the tunnel's own traffic (the bridges' too): chosen before anything runs.
    # The kill switch matches the tunnel's own packets by their mark too: it gets one as well.
    fwmark = iface.fwmark
    full = iface.table == "auto" and any(n.prefixlen == 0 for p in cfg.peers for n in p.allowed_ips)
    if (full or iface.kill_switch) and not fwmark:
        fwmark = DEFAULT_TABLE
        while netconfig.table_in_use(fwmark):
            fwmark += 1
    ks = kill_switch_plan(cfg, ifname, endpoints, bridges, nest, fwmark) if iface.kill_switch else None
    if ks is not None:
        try:
            usable = run(["nft", "--version"], check=False).returncode == 0
        except NetError:  # not installed
            usable = False
        line = iface.lines.get("KillSwitch", 0)
        if not usable:
            raise UpError(f"{cfg.path}:{line}: KillSwitch = on needs nftables (`nft`), which is not installed")
        # Two kill switches would each drop the other's tunnel: refuse, naming the other one.
        ours = killswitch.table_name(ifname)
        for table in killswitch.other_tables(run(["nft", "list", "tables"], check=False).stdout, ours):
            raise UpError(f"{cfg.path}:{line}: another kill switch is active here (nftables table inet {table}); "
                          "only one tunnel can have one: take that one down first")
        for w in dns_route_warnings(cfg):
            out(w, file=sys.stderr)

    # SIGINT, SIGTERM or SIGHUP from here on (a slow PostUp, Ctrl-C): undo, say so, fail.
    handlers = {signum: signal.signal(signum, _on_signal) for signum in netconfig.INTERRUPTS}
    try:
        return _up(ifname, path, cfg, endpoints, bridges, mtu, exit_hosts, fwmark, ks, out=out, fallbacks=fallbacks)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def kill_switch_status(ifname: str, tables: set[str] | None) -> killswitch.Status | None:
    """For `wgpy show`: whether `wgpy up` made a kill switch for `ifname` (its journal in this
    namespace says so; AllowLAN as it recorded it) and whether its table is among `tables`
    (killswitch.list_tables(); None: unknown). None when it was not asked for and there is no
    such table: nothing to say."""
    try:
        table = killswitch.table_name(ifname)
    except ValueError:
        return None
    try:
        journal = Journal.load(ifname)
    except NetError:
        journal = None
    recorded = journal.meta.get("kill_switch") if journal is not None else None
    asked = journal is not None and (isinstance(recorded, dict)
                                     or any(isinstance(e, dict) and e.get("kill_switch") for e in journal.undo))
    present = None if tables is None else table in tables
    if not asked and not present:
        return None
    allow_lan = recorded.get("allow_lan") if isinstance(recorded, dict) else None
    return killswitch.Status(table, asked, allow_lan if isinstance(allow_lan, bool) else None, present)


def kill_switch_plan(cfg: wgconfig.Config, ifname: str, endpoints: dict[int, tuple[str, int]],
                     bridges: dict[int, BridgeSpec], nest: dict[bytes, bytes], fwmark: int) -> killswitch.KillSwitch:
    """What the kill switch allows at `up`, from the config: each peer's first hop (its bridge's
    server, by TCP for udp2tcp and UDP for Shadowsocks; else its resolved endpoint over UDP;
    nothing for a peer reached through another), the DNS servers, AllowLAN, and IPv6 blocked
    when no peer's AllowedIPs hold any IPv6. The daemon takes over the hops once it runs."""
    hops = []
    for i, peer in enumerate(cfg.peers):
        if peer.public_key in nest:
            continue  # carried inside its entry's tunnel: never on the wire by itself
        if i in bridges:
            host, port = bridges[i].server
            hops.append((host, "tcp" if bridges[i].kind == "udp2tcp" else "udp", port))
        elif i in endpoints:
            hops.append((endpoints[i][0], "udp", endpoints[i][1]))
    iface = cfg.interface
    return killswitch.KillSwitch(
        ifname, fwmark=fwmark or 0, hops=killswitch.hops_of(hops), allow_lan=iface.allow_lan,
        dns=tuple(iface.dns_servers),
        block_ipv6=not any(n.version == 6 for p in cfg.peers for n in p.allowed_ips))


def dns_route_warnings(cfg: wgconfig.Config) -> list[str]:
    """With the kill switch, DNS goes only through the tunnel: a DNS server outside every peer's
    AllowedIPs is never routed there, so every query to it would be dropped. Say so."""
    nets = [n for p in cfg.peers for n in p.allowed_ips]
    line = cfg.interface.lines.get("DNS", 0)
    out = []
    for server in cfg.interface.dns_servers:
        plain = ipaddress.ip_address(str(server).split("%", 1)[0])
        if not any(plain.version == n.version and plain in n for n in nets):
            out.append(f"Warning: {cfg.path}{f':{line}' if line else ''}: DNS server {plain} is in no peer's "
                       "AllowedIPs: the kill switch lets DNS only through the tunnel, so queries to it "
                       "will be dropped")
    return out


def _install_kill_switch(journal: Journal, ks: killswitch.KillSwitch) -> None:
    """Make the kill switch's table, replacing a stale one of the same name in the same
    transaction. Its removal is journaled first: if nft fails, the rollback still removes a
    stale table the failed replacement left (and finds nothing to remove otherwise)."""
    table = killswitch.table_name(ks.ifname)
    with netconfig.signals_deferred():
        journal.record({"cmd": ["nft", "delete", "table", "inet", table], "may_fail": True, "kill_switch": True})
        try:
            killswitch.apply(killswitch.render(ks))
        except killswitch.KillSwitchError as exc:
            raise UpError(f"kill switch: {exc}") from None


def _up(ifname: str, path: str, cfg: wgconfig.Config, endpoints: dict[int, tuple[str, int]],
        bridges: dict[int, BridgeSpec], mtu: int, exit_hosts: set, fwmark: int,
        ks: killswitch.KillSwitch | None = None, *, out=print, fallbacks: dict[int, tuple] | None = None) -> str:
    iface = cfg.interface
    journal = None
    try:
        with netconfig.signals_deferred():
            stale = Journal.load(ifname)
            if stale is not None:  # left by a crash: the interface is gone, so undo what remains
                if ks is not None:  # its kill switch stays until the new one replaces it atomically
                    stale.undo = [e for e in stale.undo if not e.get("kill_switch")]
                stale.rollback()
                stale.remove()
            journal = Journal(ifname)
            journal.meta = {"config": path, "pre_down": iface.pre_down, "post_down": iface.post_down,
                            "save_config": iface.save_config}
            if ks is not None:  # for `wgpy show` (kill_switch_status)
                journal.meta["kill_switch"] = {"allow_lan": ks.allow_lan}
        if ks is not None:
            # First, so that it is undone last: `down` removes it once the interface is gone.
            out(f"[#] nft -f - (kill switch: table inet {killswitch.table_name(ifname)})", file=sys.stderr)
            _install_kill_switch(journal, ks)
        with netconfig.signals_deferred():
            # Recorded before the daemon starts: an interruption while it starts still undoes it.
            journal.undo.append({"cmd": ["ip", "link", "del", "dev", ifname], "may_fail": True})
            journal.save()
        _hook(iface.pre_up, ifname, "PreUp")
        argv = [WGPY_DAEMON, *(["--kill-switch"] if ks is not None else []), ifname]
        out(f"[#] {' '.join(argv)}", file=sys.stderr)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise UpError(r.stderr.strip() or f"wgpy-daemon {ifname} failed")
        _wait_for_socket(ifname)

        lines = wgconfig.uapi_set_lines(cfg, endpoints, {i: spec.uri for i, spec in bridges.items()},
                                        {i: format_ways(ways) for i, ways in (fallbacks or {}).items()})
        if ks is not None:  # the mark the kill switch expects, on the very first packet
            lines = [f"fwmark={fwmark}" if line.startswith("fwmark=") else line for line in lines]
        uapi.set_config(ifname, lines)

        for addr in iface.addresses:
            fam = "-6" if addr.version == 6 else "-4"
            journal.cmd(["ip", fam, "address", "add", str(addr), "dev", ifname],
                        ["ip", fam, "address", "del", str(addr), "dev", ifname], may_fail=True)

        out(f"[#] ip link set mtu {mtu} up dev {ifname}", file=sys.stderr)
        journal.cmd(["ip", "link", "set", "mtu", str(mtu), "up", "dev", ifname], None)

        if iface.dns_servers or iface.dns_search:
            _set_dns(journal, ifname, iface)

        if iface.table != "off":
            nets = sorted({n for p in cfg.peers for n in p.allowed_ips},
                          key=lambda n: (-n.prefixlen, n.version, int(n.network_address)))
            fwmark_set = False
            for net in nets:
                if net in exit_hosts:
                    continue
                fam = _family(net)
                if iface.table != "auto":
                    journal.cmd(["ip", fam, "route", "add", str(net), "dev", ifname, "table", iface.table], None)
                elif net.prefixlen == 0:
                    if not fwmark_set and fwmark != iface.fwmark:
                        uapi.set_config(ifname, [f"fwmark={fwmark}"])
                    fwmark_set = True
                    _add_default(journal, ifname, net, fwmark, cfg)
                elif not netconfig.route_exists_on(ifname, str(net), fam):
                    journal.cmd(["ip", fam, "route", "add", str(net), "dev", ifname], None)

        _hook(iface.post_up, ifname, "PostUp")
    except (_Signal, UpError, NetError, uapi.ControlError, OSError, subprocess.TimeoutExpired) as exc:
        for signum in netconfig.INTERRUPTS:  # a second Ctrl-C must not stop the undoing
            signal.signal(signum, signal.SIG_IGN)
        problems = []
        if journal is not None:
            problems = journal.rollback()
            journal.remove()
            _wait_daemon_gone(ifname)
        if isinstance(exc, _Signal):
            name = signal.Signals(exc.signum).name
            msg = (f"interrupted by {name}: everything `up` had done was undone" if journal is not None
                   else f"interrupted by {name}: nothing was changed")
        else:
            msg = str(exc)
        if problems:
            msg += "\nwhile undoing: " + "; ".join(problems)
        if isinstance(exc, _Signal):
            raise Interrupted(exc.signum, msg) from None
        raise UpError(msg) from None
    return ifname


def _set_dns(journal: Journal, ifname: str, iface) -> None:
    lines = [f"nameserver {s}" for s in iface.dns_servers]
    if iface.dns_search:
        lines.append("search " + " ".join(iface.dns_search))
    text = "".join(line + "\n" for line in lines)
    if run(["sh", "-c", "command -v resolvconf"], check=False).returncode == 0:
        journal.cmd(["resolvconf", "-a", f"tun.{ifname}", "-m", "0", "-x"],
                    ["resolvconf", "-d", f"tun.{ifname}", "-f"], input=text)
    else:
        header = f"# written by wgpy up {ifname}; restored by wgpy down {ifname}\n"
        with netconfig.signals_deferred():
            netconfig.replace_file(journal, netconfig.RESOLV_CONF, header + text)


def save_config(ifname: str, path: str) -> None:
    """SaveConfig = true: write the running interface back to its file before `down`, as
    `wg-quick save` does: the file's own wg-quick settings, the interface's current addresses, and
    the daemon's current keys, port, fwmark and peers (with the endpoints they roamed to)."""
    original, _ = wgconfig.load_config(path)
    iface = original.interface
    status = uapi.get_status(ifname)
    bridges = {p.public_key: p.bridge for p in original.peers}  # as written: the daemon's is redacted
    peers = [
        wgconfig.PeerConfig(
            p.public_key,
            preshared_key=p.preshared_key,
            allowed_ips=list(p.allowed_ips),
            endpoint=p.endpoint,
            persistent_keepalive=p.persistent_keepalive or None,
            bridge=bridges.get(p.public_key),
            via=p.via,
        )
        for p in status.peers
    ]
    addrs = []
    for line in run(["ip", "-o", "address", "show", "dev", ifname, "scope", "global"]).stdout.splitlines():
        words = line.split()
        if "inet" in words or "inet6" in words:
            addrs.append(ipaddress.ip_interface(words[words.index("inet" if "inet" in words else "inet6") + 1]))
    if status.private_key is None:
        raise uapi.ControlError(f"{ifname}: the daemon has no private key to save")
    iface.private_key = status.private_key
    iface.listen_port = status.listen_port or iface.listen_port
    iface.fwmark = status.fwmark or iface.fwmark  # the daemon reports no fwmark when it has none
    iface.addresses = addrs
    text = wgconfig.render_config(wgconfig.Config(path, iface, peers))
    tmp = f"{path}.wgpy-save"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _wait_daemon_gone(ifname: str, timeout: float = 5.0) -> None:
    """Wait for this namespace's daemon of `ifname` to exit (it does when its link is deleted);
    remove its control socket if it was killed and left it. Another namespace's daemon behind
    the same (shared) socket path is left alone."""
    path = uapi.socket_path(ifname)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state, pid = netconfig.probe_socket(path)
        except OSError:
            return
        if state == "stale":
            netconfig.remove_stale_socket(path)
            return
        if state != "live" or (pid is not None and netconfig.same_netns(pid) is False):
            return
        time.sleep(0.05)


def _is_wgpy_daemon(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(a) == b"wgpy-daemon" or a == b"tunnel.daemon" for a in argv[:3])


def down(target: str, *, out=print) -> str:
    """Undo what `up` recorded in this network namespace's journal, whatever else fails (a
    SaveConfig that cannot be written, a hook, a daemon that was killed), and report it all.
    Without a journal, only a TUN link with a wgpy-daemon behind it in this namespace is
    removed; anything else is refused, untouched."""
    ifname, _ = wgconfig.interface_name_for(target)
    journal = Journal.load(ifname)
    path = uapi.socket_path(ifname)
    state, pid = netconfig.probe_socket(path)
    here = state == "live" and pid is not None and netconfig.same_netns(pid) is True
    if journal is None:
        kind = netconfig.link_kind(ifname)
        if kind == "tun" and here and _is_wgpy_daemon(pid):
            run(["ip", "link", "del", "dev", ifname])
            _wait_daemon_gone(ifname)
            out(f"wgpy: `{ifname}' was not brought up by wgpy up: removed the interface only", file=sys.stderr)
            return ifname
        if kind is None and state == "stale":
            netconfig.remove_stale_socket(path)
            out(f"wgpy: `{ifname}' does not exist: removed {path}, left by a daemon that was killed",
                file=sys.stderr)
            return ifname
        if kind is None:
            why = "no such interface in this network namespace"
        elif kind == "tun" and here:
            why = "its daemon is not wgpy-daemon (wireguard-go?); use `ip link del` if you mean it"
        else:
            why = f"it is a {kind or 'plain'} link" + ("" if kind != "tun" else " without a wgpy daemon")
        raise UpError(f"`{ifname}' is not a WireGuard interface brought up by wgpy ({why}); nothing was changed")
    problems = []
    if journal.meta.get("save_config"):
        try:
            if not here:
                raise uapi.ControlError(f"{ifname}: its daemon is not running (killed?): the file was left as it was")
            save_config(ifname, journal.meta["config"])
        except Exception as exc:  # never stops the rollback: report it
            known = (UpError, NetError, uapi.ControlError, OSError, wgconfig.ConfigError)
            why = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
            problems.append(f"SaveConfig: {why}")
    try:
        _hook(journal.meta.get("pre_down", []), ifname, "PreDown")
    except (UpError, OSError, subprocess.TimeoutExpired) as exc:
        problems.append(str(exc))
    problems += journal.rollback()
    journal.remove()
    _wait_daemon_gone(ifname)
    try:
        _hook(journal.meta.get("post_down", []), ifname, "PostDown")
    except (UpError, OSError, subprocess.TimeoutExpired) as exc:
        problems.append(str(exc))
    if problems:
        raise UpError("; ".join(problems) + " (the rest was undone)")
    return ifname


def _nudge(ifname: str, nets: list) -> None:
    """Send one empty UDP datagram into the tunnel towards an address of each of `nets` (a
    peer's allowed ips): WireGuard starts a handshake for the first packet to a peer. The
    socket is bound to the interface, so it goes into the tunnel whatever the routes say."""
    for net in nets:
        host = net.network_address + (1 if net.num_addresses > 2 else 0)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
                s.sendto(b"", (str(host), 9))  # the discard port
            return
        except OSError:
            continue


def wait_for_handshakes(ifname: str, timeout: float, *, out=print) -> None:
    """`wgpy up --wait`: return once every peer with an endpoint has completed a handshake;
    UpError naming the peers that have not within `timeout` seconds (or when the daemon goes)."""
    deadline = time.monotonic() + timeout
    nudged = 0.0
    while True:
        try:
            status = uapi.get_status(ifname)
        except uapi.ControlError as exc:
            raise UpError(f"while waiting for handshakes: {exc}") from None
        waiting = [p for p in status.peers if p.endpoint is not None and not p.latest_handshake]
        if not any(p.endpoint is not None for p in status.peers):
            out(f"wgpy: {ifname}: no peer has an endpoint: nothing to wait for", file=sys.stderr)
            return
        if not waiting:
            return
        now = time.monotonic()
        if now >= deadline:
            names = ", ".join(f"{_b64(p.public_key)} ({p.endpoint[0]}:{p.endpoint[1]})" for p in waiting)
            raise UpError(f"{ifname}: no handshake within {timeout:g} s with peer {names}: check that the endpoint "
                          "is reachable over UDP and that each side has the other's public key "
                          f"(the tunnel stays up; `wgpy down {ifname}` removes it)")
        if now - nudged >= 1.0:
            for p in waiting:
                _nudge(ifname, p.allowed_ips)
            nudged = now
        time.sleep(min(0.1, max(0.0, deadline - now)))
