"""The trio engine: a TUN device and transports around the sans-IO core, and a UAPI socket.

Tasks (one trio thread; the core is called synchronously, so it needs no locks):

    tun reader      TUN --batch--> Device.outbound --> transports
    receivers       one per receive function of each transport (transport/base.py): the UDP
                    port (IPv4, IPv6), each bridged peer's Shadowsocks or udp-over-tcp transport,
                    each nested (multihop) peer's transport; all the same loop:
                    batch --> Device.inbound --> TUN write (nested hops' datagrams picked out
                    for their transport), transports
    timers          sleep until Device.next_deadline() (or a config change) --> Device.tick --> transports
    uapi server     /var/run/wireguard/IFNAME.sock: get/set through tunnel.uapi
    link watcher    rtnetlink: exit when the link is deleted, follow MTU changes
    socket watcher  exit when the UAPI socket file is removed

Outgoing datagrams go to the transport their endpoint names (`Endpoint.via`); one back-pressure
rule for all: what a transport says would block is offered again once it is writable. The TUN
and the UDP transport are arguments, so tests run the whole engine on transport.memory doubles.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import trio

from bridge import fallback
from bridge.carrier import BridgeTransport, open_bridge
from bridge.lwo_transport import LwoPort, LwoTransport
from bridge.multihop import Reassembler
from bridge.nested import NestedTransport
from bridge.spec import BridgeSpec
from transport.base import UDP, Datagram, Endpoint, ReceiveFunc, Transport
from transport.udp import UdpTransport

from . import netlink, uapi
from .noise import Device
from .noise.events import describe, short_key
from .tun import BATCH as TUN_BATCH
from .tun import Tun

log = logging.getLogger("wgpy")

_UDP_HEADER = struct.Struct("!HHHH")  # source port, destination port, length, checksum

SOCKET_DIR = "/var/run/wireguard"
UAPI_IDLE_TIMEOUT = 30.0  # a client that sends nothing for this long is disconnected
UAPI_MAX_CONNECTIONS = 32
UAPI_READ_SIZE = 65536
FALLBACK_POLL = 1.0  # seconds between looks at the handshakes of peers with several ways
# After a wakeup that moved only a few packets (a ping, a keystroke, a request), the engine keeps
# looking at the TUN and the UDP sockets for this long before it sleeps in epoll, as a NIC driver's
# busy poll does. `wgpy bench latency --without busy-poll --rounds 5`: idle ping RTT 0.72 ms with
# it, 0.94 ms without (wireguard-go 0.46), RTT under iperf3 the same; 500 us bought no more than
# 200 us (ad-hoc runs). Waking a sleeping process costs more than this on a virtual machine. It
# costs a few windows of CPU per such wakeup (about 1% at 20 pings/s); a busy tunnel's batches are
# full and skip it. WGPY_POLL_US=0 turns it off.
POLL_WINDOW_DEFAULT_US = 200


def _poll_window(text: str | None) -> tuple[float, str]:
    """WGPY_POLL_US as seconds, and what was wrong with it (then the default applies)."""
    if text is None or not text.strip():
        return POLL_WINDOW_DEFAULT_US / 1e6, ""
    try:
        us = int(text)
    except ValueError:
        us = -1
    if not 0 <= us <= 100_000:
        return (POLL_WINDOW_DEFAULT_US / 1e6,
                f"WGPY_POLL_US={text!r} is not a whole number of microseconds 0..100000; "
                f"using {POLL_WINDOW_DEFAULT_US}")
    return us / 1e6, ""


POLL_WINDOW, POLL_WINDOW_ERROR = _poll_window(os.environ.get("WGPY_POLL_US"))
POLL_AFTER = 8  # batches smaller than this are followed by the poll
POLL_ROUNDS = 5  # the poll gives the thread back to trio after at most this many windows


class Engine:
    """One WireGuard interface. Implements uapi.InterfaceSettings (listen port, fwmark, bridges).

    `tun` (default: a new Linux TUN named `ifname`) and `udp` (default: a UdpTransport) are the
    two ends; `udp` must have `port` and `bind(port)`. `open_bridge(spec, ident, fwmark)` makes a
    bridged peer's transport."""

    def __init__(self, ifname: str, *, socket_dir: str = SOCKET_DIR, mtu: int = 1420, tun=None,
                 udp: Transport | None = None,
                 open_bridge: Callable[[BridgeSpec, int, int], BridgeTransport] = open_bridge,
                 addresses: tuple[str, ...] = ()) -> None:
        self.ifname = ifname
        self.socket_dir = socket_dir
        self.socket_path = os.path.join(socket_dir, f"{ifname}.sock")
        self.tun = tun if tun is not None else Tun(ifname, mtu)
        self.ifindex = self.tun.ifindex
        self.device = Device(None, wall_offset=0.0, mtu=self.tun.mtu)
        self.udp = udp if udp is not None else UdpTransport()
        self.udp.ident = UDP
        # The brief busy poll after small batches needs sockets to look at (not the memory doubles).
        self.poll_window = POLL_WINDOW if isinstance(self.udp, UdpTransport) else 0.0
        # Every transport by the number its endpoints carry (Endpoint.via); UDP is 0.
        self.transports: dict[int, Transport] = {UDP: self.udp}
        self._scopes: dict[int, trio.CancelScope] = {}  # each transport's tasks
        self._open_bridge = open_bridge
        self.io_drops: Counter[str] = Counter()
        self._listen_port = 0
        self._port_random = False  # the UDP port was bound at random at start (none configured yet)
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._sleeping_until = float("inf")  # the deadline the timer task waits for
        self._uapi_sock: trio.socket.SocketType | None = None
        self._socket_ino: tuple[int, int] | None = None
        self._uapi_clients = 0
        self.bridges: dict[bytes, _Bridge] = {}  # bridged peers by public key
        # Peers with several ways to reach them (bridge/fallback.py), by public key.
        self.fallbacks: dict[bytes, _Fallback] = {}
        # LWO (bridge/lwo_transport.py): each LWO peer's transport by public key, the LWO side of
        # the UDP port, and its receive step while any peer uses LWO (else None: the plain
        # receive path's only cost is that check).
        self.lwo: dict[bytes, LwoTransport] = {}
        self._lwo_port: LwoPort | None = None
        self._lwo_open: Callable[[list[Datagram]], list[Datagram]] | None = None
        # Multihop: explicit Via by public key; the transport of each nested peer; what picks
        # their datagrams out of the packets the entry delivers.
        self._via: dict[bytes, bytes] = {}
        self.nested: dict[bytes, NestedTransport] = {}
        # (packed address, port) of each nested peer's endpoint -> its transport and endpoint.
        self._nested_by_source: dict[tuple[bytes, int], tuple[NestedTransport, Endpoint]] = {}
        self._nested_hosts: frozenset[bytes] = frozenset()
        self._reassembler = Reassembler()
        # The tunnel's own addresses (inner source of nested datagrams), from rtnetlink or given.
        self.addresses: set[str] = {str(ipaddress.ip_address(a)) for a in addresses}
        self._next_ident = UDP + 1
        self.exit_reason = ""
        self.stopped = trio.Event()
        # Set, then replaced, after every UAPI set: the first hops may have moved (kill switch).
        self.first_hops_changed = trio.Event()

    # ------------------------------------------------------------ uapi.InterfaceSettings

    @property
    def listen_port(self) -> int:
        return self.udp.port

    @property
    def fwmark(self) -> int:
        return self.udp.fwmark

    def set_listen_port(self, port: int) -> None:
        """Compared with the port actually bound, not the one last asked for: a port first
        chosen at random (0) and sent back by `wg set listen-port` or `wg syncconf` is no
        change. Otherwise rebind (UdpTransport.bind closes the old sockets first, as
        wireguard-go, and on failure binds the old port again and raises)."""
        if port != 0 and port == self.udp.port:
            return
        try:
            self.udp.bind(port)
        finally:
            self._listen_port = self.udp.port
            if self.udp.port:
                self._serve(self.udp)  # the old receive functions ended with their sockets

    def set_fwmark(self, mark: int) -> None:
        self.udp.set_fwmark(mark)
        for bridged in self.bridges.values():
            try:
                bridged.transport.set_fwmark(mark)
            except OSError as exc:  # the socket is being replaced; the new one gets the mark
                log.warning("%s: bridge %s: fwmark: %s", self.ifname, bridged.transport.spec.redacted(), exc)

    def set_endpoint(self, peer, endpoint: tuple[str, int]) -> None:
        bridged = self._bridge_of(peer)
        nested = self.nested.get(peer.public_key)
        if bridged is not None:
            bridged.placeholder_endpoint = False
            self.device.set_endpoint(peer, bridged.transport.endpoint(endpoint), pinned=True)
        elif nested is not None:  # after the set, nesting is decided again for the new address
            self.device.set_endpoint(peer, Endpoint(endpoint[0], endpoint[1], nested.ident), pinned=True)
        else:
            self._set_direct(peer, endpoint)

    def set_via(self, peer, entry: bytes | None) -> None:
        """Reach `peer` through the peer whose public key is `entry` (None: as the addresses say).
        Applied after the whole request (`after_set`): the entry may come later in it."""
        if entry is None:
            self._via.pop(peer.public_key, None)
        else:
            self._via[peer.public_key] = entry

    def set_bridge(self, peer, bridge: BridgeSpec | None) -> None:
        old = self.bridges.get(peer.public_key)
        if old is not None and old.peer is peer and old.transport.spec == bridge:
            return  # the same bridge again: keep the transport (and a 2022 session) running
        # The peer's endpoint without the bridge: (host, port) as the bridge server sees it.
        target = None if peer.endpoint is None else (peer.endpoint[0], peer.endpoint[1])
        if old is not None:  # ours, or left by a peer of the same key removed in this request
            self._stop_bridge(peer.public_key)
        if bridge is None:
            if old is not None and old.placeholder_endpoint:
                target = None
            self._set_direct(peer, target)
            return
        ident = self._next_ident
        self._next_ident += 1
        transport = self._open_bridge(bridge, ident, self.udp.fwmark)
        self.bridges[peer.public_key] = _Bridge(transport, peer, placeholder_endpoint=target is None)
        self.transports[ident] = transport
        self.device.set_endpoint(peer, transport.endpoint(target), pinned=True)
        log.info("%s: a peer now goes through bridge %s", self.ifname, bridge.redacted())
        self._serve(transport)

    def set_obfuscation(self, peer, kind: str | None) -> None:
        """`kind` "lwo": the peer's datagrams on the UDP port are LWO (bridge/lwo.py), and LWO
        is accepted on the port; None: plain WireGuard. A bridge or nesting, if the peer has one,
        carries it instead (LWO applies again once it is reached directly)."""
        pk = peer.public_key
        old = self.lwo.get(pk)
        if kind is not None and old is not None and old.peer is peer:
            return
        if old is not None:
            self._stop_lwo(pk)
        if kind is not None:
            port = self._lwo_port
            if port is None:
                port = self._lwo_port = LwoPort(self._next_ident, self.udp)
                self._next_ident += 1
                self.transports[port.ident] = port
            transport = LwoTransport(self._next_ident, pk, port, peer)
            self._next_ident += 1
            self.lwo[pk] = transport
            self.transports[transport.ident] = transport
            log.info("%s: a peer now uses LWO obfuscation", self.ifname)
        if not peer.pinned:  # reached directly: same address, the new format
            ep = peer.endpoint
            self._set_direct(peer, None if ep is None else (ep[0], ep[1]))
        self._lwo_refresh()

    def set_fallback(self, peer, ways: tuple | None) -> None:
        """Reach `peer` by the first of `ways` that works; the timer task moves between them
        (_poll_fallbacks). None: off, the way in use stays."""
        pk = peer.public_key
        old = self.fallbacks.get(pk)
        if ways is None:
            self.fallbacks.pop(pk, None)
            return
        if old is not None and old.peer is peer and old.ways == ways:
            return  # the same list again: keep the way in use and what was learnt
        fb = self.fallbacks[pk] = _Fallback(peer, ways, fallback.Fallback(len(ways)))
        self._use_way(fb, 0, "the first way configured")

    def _use_way(self, fb: "_Fallback", index: int, reason: str) -> None:
        way = fb.ways[index]
        peer = fb.peer
        fb.reason = reason
        if isinstance(way, BridgeSpec):
            self.set_obfuscation(peer, None)
            self.set_bridge(peer, way)
        else:
            self.set_bridge(peer, None)
            self.set_obfuscation(peer, "lwo" if way == fallback.LWO else None)
        # A way given up is worth a warning (the network blocks something); the rest is routine.
        log.log(logging.WARNING if reason == fallback.FAILED else logging.INFO,
                "%s: %s: now reached by way %d of %d, %s (%s)", self.ifname, short_key(peer.public_key),
                index + 1, len(fb.ways), fallback.describe(way), reason)
        self.first_hops_changed.set()  # the kill switch follows the way in use
        self.first_hops_changed = trio.Event()

    def _poll_fallbacks(self, now: float) -> list[Datagram]:
        """Before the timers fire: move a peer whose way went unanswered to its next way (the
        retry that is due then goes out there), or probe the earlier ways. Returns what a probe's
        new handshake sends."""
        out: list[Datagram] = []
        for pk, fb in list(self.fallbacks.items()):
            peer = fb.peer
            if self.device.peers.get(pk) is not peer:
                del self.fallbacks[pk]
                continue
            switch = fb.policy.poll(now, peer.initiations_sent, peer.handshake.last_sent_handshake,
                                    peer.last_handshake_wall)
            if switch is not None:
                self._use_way(fb, switch.index, switch.reason)
                if switch.handshake_now:
                    out += self.device.initiate(peer, now)
        return out

    def _set_direct(self, peer, address: tuple[str, int] | None) -> None:
        """The peer reached directly on the UDP port: plainly, or through its LWO transport. An
        LWO peer roams freely: its endpoint follows the form of its latest authenticated
        datagram too, LWO (LwoPort) or plain (bridge/lwo_transport.py), so it is answered as it
        sends; until then, LWO."""
        lwo = self.lwo.get(peer.public_key)
        if lwo is not None and lwo.peer is peer:
            self.device.set_endpoint(peer, None if address is None else lwo.endpoint(address))
        else:
            self.device.set_endpoint(peer, None if address is None else Endpoint(address[0], address[1], UDP))

    def _stop_lwo(self, public_key: bytes) -> None:
        transport = self.lwo.pop(public_key)
        del self.transports[transport.ident]
        transport.close()

    def _lwo_refresh(self) -> None:
        """Accept LWO on the port while a peer uses it, keyed with our current public key."""
        port = self._lwo_port
        if port is None:
            return
        port.set_own_key(self.device.public_key)
        self._lwo_open = port.open if self.lwo and port.own is not None else None

    def extension_lines(self, peer) -> list[str]:
        lines = []
        via = self._via.get(peer.public_key)
        if via is not None:
            lines.append(f"wgpy_via={via.hex()}")
        nested = self.nested.get(peer.public_key)
        if nested is not None:
            lines.append(f"wgpy_entry={nested.entry.hex()}")
        lwo = self.lwo.get(peer.public_key)
        if lwo is not None and lwo.peer is peer:
            lines.append("wgpy_obfuscation=lwo")
        fb = self.fallbacks.get(peer.public_key)
        if fb is not None and fb.peer is peer:
            lines += [f"wgpy_fallback={','.join(fallback.describe(w) for w in fb.ways)}",
                      f"wgpy_fallback_in_use={fb.policy.index}"]
        bridged = self._bridge_of(peer)
        if bridged is not None:
            st = bridged.transport.statistics()
            lines += [f"wgpy_bridge={st['bridge']}", f"wgpy_bridge_connected={int(st['connected'])}",
                      f"wgpy_bridge_tx_packets={st['sent']}", f"wgpy_bridge_rx_packets={st['received']}",
                      f"wgpy_bridge_dropped={st['dropped']}",
                      f"wgpy_bridge_last_reply={int(st.get('last_reply') or 0)}"]  # 0: no reply yet
        return lines

    def _bridge_of(self, peer) -> _Bridge | None:
        bridged = self.bridges.get(peer.public_key)
        return bridged if bridged is not None and bridged.peer is peer else None

    def _stop_bridge(self, public_key: bytes) -> None:
        transport = self.bridges.pop(public_key).transport
        scope = self._scopes.pop(transport.ident, None)
        if scope is not None:
            scope.cancel()
        del self.transports[transport.ident]
        transport.close()

    def after_set(self) -> None:
        """After a UAPI set: stop what removed peers leave behind, decide nesting again."""
        self.forget_removed_peers()
        self._plan_nesting()
        self.first_hops_changed.set()
        self.first_hops_changed = trio.Event()

    def first_hops(self) -> frozenset[tuple[str, str, int]]:
        """Where this interface's own packets go on the wire, as (address, "udp"|"tcp", port):
        each bridged peer's bridge server (udp2tcp over TCP, Shadowsocks over UDP) and the
        endpoint of every other peer not reached through another one (a multihop exit's
        datagrams travel inside its entry's). The kill switch (tunnel/killswitch.py) allows
        exactly these; roaming moves them without a set, so its follower also polls."""
        hops = set()
        for pk, peer in self.device.peers.items():
            bridged = self._bridge_of(peer)
            if bridged is not None:
                host, port = bridged.transport.spec.server
                hops.add((host, "tcp" if bridged.transport.spec.kind == "udp2tcp" else "udp", port))
            elif pk not in self.nested and peer.endpoint is not None:
                hops.add((peer.endpoint[0], "udp", peer.endpoint[1]))
        return frozenset(hops)

    def forget_removed_peers(self) -> None:
        """After a set request: stop the transports of peers that were removed (or removed and
        added again without their bridge)."""
        for pk, bridged in list(self.bridges.items()):
            if self.device.peers.get(pk) is not bridged.peer:
                log.info("%s: bridge %s stopped: its peer is gone", self.ifname,
                         bridged.transport.spec.redacted())
                self._stop_bridge(pk)
        for pk, lwo in list(self.lwo.items()):
            if self.device.peers.get(pk) is not lwo.peer:
                self._stop_lwo(pk)
        self._lwo_refresh()  # also after a new private key

    # ------------------------------------------------------------ multihop

    def _plan_nesting(self) -> None:
        """Decide which peers travel inside which (bridge/multihop.py): an explicit Via, else a
        peer whose endpoint lies in another peer's allowed IPs (/0 ignored). A nested peer's
        endpoint names its NestedTransport and is pinned, so nothing of it can leave around the
        entry; a Via that names no peer yet keeps it there with nothing sent."""
        device = self.device
        peers = device.peers
        for pk in [pk for pk in self._via if pk not in peers]:
            del self._via[pk]
        plan: dict[bytes, bytes] = {}
        for pk, peer in peers.items():
            if pk in self.bridges:
                continue  # a bridge is a first hop
            entry = self._via.get(pk)
            if entry is None and peer.endpoint is not None:
                try:
                    packed = ipaddress.ip_address(peer.endpoint[0]).packed
                except ValueError:
                    continue
                match = device.allowed_ips.lookup_specific(packed)
                entry = match.public_key if match is not None and match is not peer else None
            if entry is not None:
                plan[pk] = entry
        cyclic = set()  # a cycle of Vias cannot carry anything: its peers send nothing
        for pk in plan:
            hop, seen = pk, []
            while hop in plan and hop not in seen:
                seen.append(hop)
                hop = plan[hop]
            if hop == pk:
                cyclic.add(pk)
        if cyclic:
            log.error("%s: Via forms a cycle; %d peers are not reachable", self.ifname, len(cyclic))
        for pk, transport in list(self.nested.items()):
            if plan.get(pk) != transport.entry:
                self._stop_nested(pk)
                peer = peers.get(pk)
                if peer is not None and pk not in self.bridges:
                    ep = peer.endpoint
                    self._set_direct(peer, None if ep is None else (ep[0], ep[1]))
        for pk, entry in plan.items():
            transport = self.nested.get(pk)
            if transport is None:
                transport = NestedTransport(self._next_ident, entry, seal=self._seal_for,
                                            route=self.transports.get, source=self._inner_source)
                self._next_ident += 1
                self.nested[pk] = transport
                self.transports[transport.ident] = transport
                self._serve(transport)
                log.info("%s: a peer is now reached through another (multihop)", self.ifname)
            transport.blocked = pk in cyclic
            peer, ep = peers[pk], peers[pk].endpoint
            endpoint = None if ep is None else Endpoint(ep[0], ep[1], transport.ident)
            device.set_endpoint(peer, endpoint, pinned=True)
        carried: dict[bytes, set[bytes]] = {}
        by_source: dict[tuple[bytes, int], tuple[NestedTransport, Endpoint]] = {}
        for pk, transport in self.nested.items():
            ep = peers[pk].endpoint
            if ep is not None:
                by_source[(ipaddress.ip_address(ep[0]).packed, ep[1])] = (transport, ep)
                carried.setdefault(transport.entry, set()).add(ipaddress.ip_address(ep[0]).packed)
        for pk, peer in peers.items():
            if peer.carries or pk in carried:
                device.set_carries(peer, carried.get(pk, ()))
        self._nested_by_source = by_source
        self._nested_hosts = frozenset(h for hosts in carried.values() for h in hosts)

    def _stop_nested(self, public_key: bytes) -> None:
        transport = self.nested.pop(public_key)
        scope = self._scopes.pop(transport.ident, None)
        if scope is not None:
            scope.cancel()
        del self.transports[transport.ident]
        transport.close()

    def _seal_for(self, entry: bytes, packets: list[bytes]) -> list[Datagram]:
        """A nested peer's datagrams, wrapped, sealed for its entry peer."""
        peer = self.device.peers.get(entry)
        if peer is None:
            self.io_drops["multihop: entry peer missing"] += len(packets)
            return []
        out = self.device.outbound_to(peer, packets, trio.current_time())
        self._reschedule_timers()
        return out

    def _inner_source(self, version: int) -> tuple[str, int] | None:
        """Our tunnel address of that IP version (not link-local) and the port nested datagrams
        come from: the listen port, so a relay sees one flow per interface."""
        for address in sorted(self.addresses):
            ip = ipaddress.ip_address(address)
            if ip.version == version and not ip.is_link_local:
                return (address, self.udp.port)
        return None

    def _divert(self, packets: list[bytes], now: float
                ) -> tuple[list[bytes], dict[NestedTransport, list[Datagram]]]:
        """Pick the nested peers' datagrams out of what the core would write to the TUN: UDP from
        a nested peer's endpoint to our address and port (IPv4 fragments reassembled first).
        Returns the packets left for the TUN, and each nested transport's datagrams. No UDP
        checksum check: the payload is a WireGuard message the core authenticates."""
        keep = []
        hosts, by_source, port = self._nested_hosts, self._nested_by_source, self.udp.port
        ours = {ipaddress.ip_address(a).packed for a in self.addresses}
        arrived: dict[NestedTransport, list[Datagram]] = {}
        unpack = _UDP_HEADER.unpack_from
        for pkt in packets:
            version = pkt[0] >> 4
            if version == 4 and len(pkt) >= 28 and pkt[9] == 17 and pkt[12:16] in hosts:
                if pkt[6] & 0x3F or pkt[7]:  # a fragment
                    whole = self._reassembler.feed_untrusted(pkt, now)
                    if whole is None:
                        continue
                    pkt = whole
                start, end = (pkt[0] & 0x0F) * 4, (pkt[2] << 8) | pkt[3]
                src, dst = pkt[12:16], pkt[16:20]
            elif version == 6 and len(pkt) >= 48 and pkt[6] == 17 and pkt[8:24] in hosts:
                start, end = 40, 40 + ((pkt[4] << 8) | pkt[5])
                src, dst = pkt[8:24], pkt[24:40]
            else:
                keep.append(pkt)
                continue
            if start < 20 or end > len(pkt) or end < start + 8:
                keep.append(pkt)
                continue
            sport, dport, ulen, _ = unpack(pkt, start)
            hit = by_source.get((src, sport))
            if hit is None or dport != port or dst not in ours or ulen < 8 or start + ulen > end:
                keep.append(pkt)
                continue
            transport, endpoint = hit
            batch = arrived.get(transport)
            if batch is None:
                batch = arrived[transport] = []
            batch.append((pkt[start + 8:start + ulen], endpoint))
        return keep, arrived

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the link or the socket file goes away, or the caller cancels."""
        self.device.wall_offset = time.time() - trio.current_time()
        # Handshake events are collected only when they would be logged (debug, LOG_LEVEL=debug).
        self.device.events = [] if log.isEnabledFor(logging.DEBUG) else None
        listener = self._open_uapi_socket()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.udp.port:
                    self.udp.bind(0)
                    self._port_random = True
                for transport in self.transports.values():
                    self._serve(transport)
                nursery.start_soon(self._tun_reader)
                nursery.start_soon(self._timers)
                nursery.start_soon(self._uapi_server, listener)
                if self.ifindex is not None:
                    nursery.start_soon(self._link_watcher)
                nursery.start_soon(self._socket_watcher)
                if POLL_WINDOW_ERROR:
                    log.warning("%s: %s", self.ifname, POLL_WINDOW_ERROR)
                log.info("%s: up (TUN offloads: %s)", self.ifname, self.tun.offloads)
                task_status.started()
        finally:
            self._nursery = None
            self.close()
            self.stopped.set()

    def stop(self, reason: str) -> None:
        if not self.exit_reason:
            self.exit_reason = reason
            log.info("%s: shutting down: %s", self.ifname, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        for pk in list(self.nested):
            self._stop_nested(pk)
        for pk in list(self.bridges):
            self._stop_bridge(pk)
        for pk in list(self.lwo):
            self._stop_lwo(pk)
        self.udp.close()
        if self._uapi_sock is not None:
            self._uapi_sock.close()
            self._uapi_sock = None
        try:
            st = os.lstat(self.socket_path)
            if self._socket_ino == (st.st_dev, st.st_ino):
                os.unlink(self.socket_path)
        except OSError:
            pass
        if self.tun.offloads != "off":
            st = self.tun.statistics()
            log.info("%s: TUN offloads: %d super-packets read (%d packets), %d written "
                     "(%d segments)", self.ifname, st["gso_reads"], st["gso_read_packets"],
                     st["gro_writes"], st["gro_write_segments"])
        self.tun.close()

    # ------------------------------------------------------------ transports

    def _serve(self, transport: Transport) -> None:
        """(Re)start a transport's tasks: its `run` and one receiver per receive function.
        Before the engine runs, `run` starts them all."""
        old = self._scopes.pop(transport.ident, None)
        if old is not None:
            old.cancel()
        if self._nursery is None:
            return
        if transport is self.udp:  # here, not at start: `wg setconf` usually moves it at once
            # Until a port is configured, the one bound is random: say so, so the first line of
            # the log does not read as the port the interface keeps (issue 12, item 15).
            random = self._port_random and not self._listen_port
            how = " (random until a listen port is configured)" if random else ""
            log.info("%s: listening on UDP port %d%s", self.ifname, self.udp.port, how)
        scope = trio.CancelScope()
        self._scopes[transport.ident] = scope
        self._nursery.start_soon(self._transport_tasks, transport, scope)

    async def _transport_tasks(self, transport: Transport, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport.run)
                # The brief poll looks at the TUN and the UDP port only: after a bridge's batch
                # it would spin blind (the bridge's next datagrams wait for its own task).
                polls = not isinstance(transport, BridgeTransport)
                for receive in transport.receivers():
                    nursery.start_soon(self._receiver, receive, polls)

    async def _receiver(self, receive: ReceiveFunc, polls: bool = True) -> None:
        """The one reader loop, whatever the transport."""
        while True:
            try:
                batch = await receive()
            except trio.ClosedResourceError:
                return  # its socket was replaced or closed: a new receiver serves the new one
            to_net = self._inbound(batch)
            if to_net:
                await self._send(to_net)
            if polls and len(batch) < POLL_AFTER and self.poll_window:
                await self._poll_briefly()

    def _answered_on_polled_sockets(self, sent: list[Datagram]) -> bool:
        """Whether the answers to `sent` come where the brief poll looks (the UDP port, which
        LWO shares): not when any went out by a bridge, or nested in a bridged entry peer, whose
        replies arrive on the bridge's own connection. Spinning for those only costs CPU and
        holds up the bridge's task."""
        bridges = self.bridges
        if not bridges:
            return True
        for _, endpoint in sent:
            transport = self.transports.get(endpoint[2])
            if isinstance(transport, BridgeTransport) or (
                    isinstance(transport, NestedTransport) and transport.entry in bridges):
                return False
        return True

    def _inbound(self, batch: list[Datagram]) -> list[Datagram]:
        """One batch of received datagrams through the core: packets to the TUN, and what the
        core answers (returned, for the caller to send)."""
        if self._lwo_open is not None:
            batch = self._lwo_open(batch)
        now = trio.current_time()
        result = self.device.inbound(batch, now)
        self._reschedule_timers()
        to_tun, to_net = result.to_tun, result.to_net
        arrived = None
        if to_tun and self._nested_hosts:
            to_tun, arrived = self._divert(to_tun, now)
        if to_tun:
            self.tun.write_batch(to_tun)
            # The host often answers at once (an echo reply, a TCP ACK): its stack has queued the
            # answer on the TUN before the write returned. Sealing it in this wakeup spares the
            # TUN reader a wakeup of its own: a shorter round trip, fewer wakeups under load.
            try:
                answers = self.tun.read_batch(TUN_BATCH)
            except OSError:
                answers = None  # the TUN reader meets the same error and stops the engine
            if answers:
                out = self.device.outbound(answers, now)
                self._reschedule_timers()
                if out:
                    to_net = to_net + out if to_net else out
        if arrived:
            # A nested peer's datagrams go through the core in the same wakeup: handing them to
            # another task would cost a task switch per batch on the multihop receive path.
            for transport, nested in arrived.items():
                transport.received += len(nested)
                to_net = to_net + self._inbound(nested)
        return to_net

    async def _send(self, datagrams: list[Datagram]) -> None:
        """Hand each datagram to the transport its endpoint names. What would block is offered
        again once the transport is writable (the one back-pressure rule)."""
        for transport, group in self._by_transport(datagrams):
            rest = transport.send(group)
            while rest:
                await transport.wait_writable()
                rest = transport.send(rest)

    def _by_transport(self, datagrams: list[Datagram]) -> list[tuple[Transport, list[Datagram]]]:
        transports = self.transports
        via = datagrams[0][1][2]
        for _, endpoint in datagrams:
            if endpoint[2] != via:
                break
        else:  # the common case: one transport for the whole batch
            transport = transports.get(via)
            if transport is None:
                self.io_drops["transport removed"] += len(datagrams)
                return []
            return [(transport, datagrams)]
        groups: dict[int, list[Datagram]] = {}
        for d in datagrams:
            groups.setdefault(d[1][2], []).append(d)
        out = []
        for via, group in groups.items():
            transport = transports.get(via)
            if transport is None:
                self.io_drops["transport removed"] += len(group)
            else:
                out.append((transport, group))
        return out

    # ------------------------------------------------------------ TUN and timers

    async def _tun_reader(self) -> None:
        device, tun = self.device, self.tun
        while True:
            try:
                batch = await tun.receive()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                # Deleting the link (`wg-quick down`, `ip link del`) fails the read before the
                # link watcher hears of it: that is a normal stop, not a failure.
                # The kernel answers EBADFD once the device is gone, even while /sys still shows it.
                gone = self.ifindex is not None and (
                    exc.errno in (errno.EBADFD, errno.EIO) or not os.path.exists(f"/sys/class/net/{self.ifname}"))
                self.stop("interface deleted" if gone else f"TUN read failed: {exc.strerror}")
                return
            out = device.outbound(batch, trio.current_time())
            self._reschedule_timers()
            if out:
                await self._send(out)
            if len(batch) < POLL_AFTER and self.poll_window and self._answered_on_polled_sockets(out):
                await self._poll_briefly()

    async def _poll_briefly(self) -> None:
        """Look at the TUN and the UDP sockets without sleeping for up to `poll_window` seconds
        (yielding the CPU to anything runnable in between). What turns up is handled as its own
        task would handle it, and the window starts again, as long as the traffic stays small:
        a full batch, or POLL_ROUNDS windows in all, give the thread back to trio (whose other
        tasks, timers and UAPI, wait meanwhile). Waking a sleeping process costs much more than
        this on a virtual machine (see POLL_WINDOW)."""
        udp, tun = self.udp, self.tun
        now = time.perf_counter
        deadline = now() + self.poll_window
        give_up = now() + self.poll_window * POLL_ROUNDS
        while True:
            moved = 0
            try:
                packets = tun.read_batch(TUN_BATCH)
            except OSError:
                return  # the TUN reader meets the same error and stops the engine
            if packets:
                moved += len(packets)
                out = self.device.outbound(packets, trio.current_time())
                self._reschedule_timers()
                if out:
                    await self._send(out)
            for sock in udp.sockets:
                try:
                    batch = udp.recv_batch(sock, TUN_BATCH)
                except trio.ClosedResourceError:
                    return
                if batch:
                    moved += len(batch)
                    to_net = self._inbound(batch)
                    if to_net:
                        await self._send(to_net)
            t = now()
            if moved >= POLL_AFTER or t >= give_up:
                return
            if moved:
                deadline = t + self.poll_window
            elif t >= deadline:
                return
            else:
                os.sched_yield()

    def wake_timers(self) -> None:
        self._wake.set()

    def _reschedule_timers(self) -> None:
        """After a batch: traffic arms timers (retries, keepalives, rekeys); wake the timer task
        if one is now due earlier than what it sleeps for."""
        if self.device.events:
            self._log_events()
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._wake.set()

    def _log_events(self) -> None:
        """Log the core's handshake events (tunnel/noise/events.py) at debug level, as
        wireguard-go logs them at verbose level. Never a key: peers are peer(AbCd…wxYz)."""
        events = self.device.events
        for event in events:
            log.debug("%s: %s", self.ifname, describe(event))
        events.clear()

    async def _timers(self) -> None:
        device = self.device
        while True:
            deadline = device.next_deadline()
            if deadline is None:
                deadline = trio.current_time() + 3600
            if self.fallbacks:  # see handshakes complete within a second (fallback's probe timing)
                deadline = min(deadline, trio.current_time() + FALLBACK_POLL)
            self._sleeping_until = deadline
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._sleeping_until = float("-inf")  # awake: no need to be woken
            self._wake = trio.Event()
            now = trio.current_time()
            out = self._poll_fallbacks(now) if self.fallbacks else []
            out += device.tick(now)
            if device.events:
                self._log_events()
            if out:
                await self._send(out)

    # ------------------------------------------------------------ UAPI

    def _open_uapi_socket(self) -> trio.socket.SocketType:
        os.makedirs(self.socket_dir, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.socket_path} exists and is not a socket")
            # A stale socket from a dead daemon is replaced; a live one means the name is taken.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)
            else:
                raise OSError(errno.EADDRINUSE, f"{self.socket_path} is in use by another daemon")
            finally:
                probe.close()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            raw.bind(self.socket_path)
        except OSError:
            raw.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o700)
        raw.listen(16)
        sock = trio.socket.from_stdlib_socket(raw)
        st = os.lstat(self.socket_path)
        self._socket_ino = (st.st_dev, st.st_ino)
        self._uapi_sock = sock
        return sock

    async def _uapi_server(self, listener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                if self._uapi_clients >= UAPI_MAX_CONNECTIONS:
                    log.warning("%s: UAPI: too many connections, refusing one", self.ifname)
                    conn.close()
                    continue
                nursery.start_soon(self._uapi_client, conn)

    async def _uapi_client(self, conn) -> None:
        self._uapi_clients += 1
        reader = uapi.RequestReader()
        try:
            with conn:
                while True:
                    with trio.move_on_after(UAPI_IDLE_TIMEOUT) as idle:
                        data = await conn.recv(UAPI_READ_SIZE)
                    if idle.cancelled_caught:
                        log.info("%s: UAPI: idle client disconnected", self.ifname)
                        return
                    if not data:
                        return
                    try:
                        requests, error = reader.feed(data), None
                    except uapi.UapiError as exc:
                        # Answer what was complete before the violation, then the errno, then close.
                        requests, error = exc.requests, exc
                    for request in requests:
                        reply = uapi.handle(request, self.device, self, on_error=self._uapi_refused)
                        if request[0] == "set":
                            self.after_set()
                            self.wake_timers()
                        await conn.send(reply.encode())
                    if error is not None:
                        log.info("%s: UAPI: protocol error: %s", self.ifname, error.message)
                        await conn.send(f"errno=-{error.errno}\n\n".encode())
                        return
        except OSError:
            return  # the client went away mid-reply
        finally:
            self._uapi_clients -= 1

    def _uapi_refused(self, exc: uapi.UapiError) -> None:
        # The message names the line and the problem, never a key's value.
        log.info("%s: UAPI: request refused (errno %d): %s", self.ifname, exc.errno, exc.message)

    # ------------------------------------------------------------ watchers

    async def _link_watcher(self) -> None:
        try:
            mon = netlink.open_link_monitor()
        except OSError as exc:
            log.error("%s: cannot watch links (%s); deletion of the link will not stop the daemon",
                      self.ifname, exc.strerror)
            return
        with mon:
            # The link may have gone between creating it and subscribing.
            if not os.path.exists(f"/sys/class/net/{self.ifname}"):
                self.stop("interface deleted")
                return
            try:
                netlink.request_addresses(mon)  # what is there already; changes follow as events
            except OSError as exc:
                log.warning("%s: cannot list the interface's addresses: %s", self.ifname, exc.strerror)
            while True:
                await trio.lowlevel.wait_readable(mon)
                while True:
                    try:
                        data = mon.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:  # missed events: re-check the link
                            if not os.path.exists(f"/sys/class/net/{self.ifname}"):
                                self.stop("interface deleted")
                            continue
                        raise
                    for addr in netlink.parse_address_events(data):
                        if addr.ifindex == self.ifindex:
                            (self.addresses.discard if addr.deleted else self.addresses.add)(addr.address)
                    for ev in netlink.parse_link_events(data):
                        if ev.ifindex != self.ifindex:
                            continue
                        if ev.deleted:
                            self.stop("interface deleted")
                            return
                        if ev.mtu and ev.mtu != self.device.mtu:
                            log.info("%s: MTU %d", self.ifname, ev.mtu)
                            self.device.mtu = ev.mtu

    async def _socket_watcher(self) -> None:
        while True:
            await trio.sleep(0.5)
            try:
                st = os.lstat(self.socket_path)
                gone = (st.st_dev, st.st_ino) != self._socket_ino
            except FileNotFoundError:
                gone = True
            if gone:
                self.stop("UAPI socket removed")
                return

    def statistics(self) -> dict:
        return {
            "drops": dict(self.device.drops),
            "io_drops": dict(self.io_drops),
            "tun_drops": dict(self.tun.drops.reasons),
            "tun": self.tun.statistics(),
            "events": dict(self.device.stats),
            "transports": [t.statistics() for t in self.transports.values()],
        }


@dataclass
class _Fallback:
    """A peer with several ways to reach it: the ways and the policy choosing among them."""

    peer: object
    ways: tuple
    policy: fallback.Fallback
    reason: str = ""


@dataclass
class _Bridge:
    """A bridged peer: its transport, and what the engine remembers about the peer."""

    transport: BridgeTransport
    peer: object  # the Peer object (a peer removed and added again is another one)
    placeholder_endpoint: bool  # it had no endpoint of its own (udp2tcp then uses the server's)
