"""Interop: our sans-IO core (tunnel.noise.device.Device) against wireguard-go, with no TUN of ours.

Layout (both namespaces created by the test; the root namespace is never touched):

    namespace A (ours)                         namespace B (peer)
    veth 10.201.1.1/24, fd00:201:1::1/64  <->  veth 10.201.1.2/24, fd00:201:1::2/64
    our UDP socket (opened here via setns)     wireguard-go -f wgtXXXX, UDP port 51820
    Device: 10.99.0.1, fd99::1 (no TUN)        wgtXXXX: 10.99.0.2/24, fd99::2/64, kernel replies

The test process drives the Device over the plain UDP socket: it builds IP packets itself, hands
them to `outbound`, sends the datagrams, feeds every received datagram to `inbound`, runs `tick`
when due, and inspects what `inbound` would have written to a TUN.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from tests.helpers import checksum as inet_checksum
from tunnel.noise import crypto
from tunnel.noise.device import Device

from .netlab import NetLab, Namespace, LabProcess, missing_requirements, unique_ifname

_SKIP = missing_requirements(("ip", "wireguard-go", "wg"), need_tun=True)
# The interop tests: root, namespaces, wireguard-go. (The packet-builder self-check runs anywhere.)
needs_wireguard_go = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

OUR_V4, PEER_V4 = "10.99.0.1", "10.99.0.2"
OUR_V6, PEER_V6 = "fd99::1", "fd99::2"
UNDERLAY = {
    socket.AF_INET: ("10.201.1.1", "10.201.1.2", 24),
    socket.AF_INET6: ("fd00:201:1::1", "fd00:201:1::2", 64),
}
WG_PORT = 51820
STEP_TIMEOUT = 5.0  # seconds for any single exchange (handshake, one echo, one ping run)


# ---------------------------------------------------------------------- packets


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 0x1234) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
        socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst),
    )
    csum = inet_checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def icmp4_echo(src: str, dst: str, ident: int, seq: int, data: bytes, reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    return ipv4_packet(src, dst, 1, icmp)


def _icmp6_checksum(src: bytes, dst: bytes, icmp: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), 58)
    return inet_checksum(pseudo + icmp)


def icmp6_echo(src: str, dst: str, ident: int, seq: int, data: bytes, reply: bool = False) -> bytes:
    s = socket.inet_pton(socket.AF_INET6, src)
    d = socket.inet_pton(socket.AF_INET6, dst)
    icmp = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", _icmp6_checksum(s, d, icmp)) + icmp[4:]
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 64, s, d)
    return hdr + icmp


@dataclass
class Echo:
    family: int
    src: str
    dst: str
    is_request: bool
    ident: int
    seq: int
    data: bytes


def parse_echo(pkt: bytes) -> Echo | None:
    """An ICMP/ICMPv6 echo request or reply with valid checksums, else None."""
    if len(pkt) >= 28 and pkt[0] == 0x45 and pkt[9] == 1:
        total = struct.unpack_from("!H", pkt, 2)[0]
        if total != len(pkt) or inet_checksum(pkt[:20]) != 0:
            return None
        icmp = pkt[20:]
        if icmp[0] not in (0, 8) or icmp[1] != 0 or inet_checksum(icmp) != 0:
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return Echo(socket.AF_INET, socket.inet_ntop(socket.AF_INET, pkt[12:16]),
                    socket.inet_ntop(socket.AF_INET, pkt[16:20]), icmp[0] == 8, ident, seq, icmp[8:])
    if len(pkt) >= 48 and pkt[0] >> 4 == 6 and pkt[6] == 58:
        plen = struct.unpack_from("!H", pkt, 4)[0]
        if 40 + plen != len(pkt):
            return None
        icmp = pkt[40:]
        if icmp[0] not in (128, 129) or icmp[1] != 0 or _icmp6_checksum(pkt[8:24], pkt[24:40], icmp) != 0:
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return Echo(socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, pkt[8:24]),
                    socket.inet_ntop(socket.AF_INET6, pkt[24:40]), icmp[0] == 128, ident, seq, icmp[8:])
    return None


def echo_reply_for(req: Echo) -> bytes:
    build = icmp4_echo if req.family == socket.AF_INET else icmp6_echo
    return build(req.dst, req.src, req.ident, req.seq, req.data, reply=True)


def test_packet_builders_roundtrip() -> None:
    """The hand-made packets are well formed (checked against known checksums of the builders'
    own parser, and a textbook IPv4 header checksum)."""
    # RFC 1071-style sample: header from Wikipedia's IPv4 checksum example.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert inet_checksum(hdr) == 0xB861
    for build, a, b in ((icmp4_echo, OUR_V4, PEER_V4), (icmp6_echo, OUR_V6, PEER_V6)):
        e = parse_echo(build(a, b, 7, 9, b"xyz"))
        assert e is not None and e.is_request and (e.src, e.dst, e.ident, e.seq, e.data) == (a, b, 7, 9, b"xyz")
        r = parse_echo(echo_reply_for(e))
        assert r is not None and not r.is_request and (r.src, r.dst, r.data) == (b, a, b"xyz")


# ---------------------------------------------------------------------- the driver

_TYPES = {1: "initiation", 2: "response", 3: "cookie", 4: "transport"}


def _describe(data: bytes) -> str:
    kind = _TYPES.get(data[0], f"type{data[0]}") if data else "empty"
    if data and data[0] == 4 and len(data) >= 16:
        recv, ctr = struct.unpack_from("<IQ", data, 4)
        kind += f" idx={recv:#010x} ctr={ctr}" + (" (keepalive)" if len(data) == 32 else "")
    return f"{kind} {len(data)}B"


@dataclass
class CoreDriver:
    """Runs a Device over one UDP socket from the test thread, recording a trace."""

    device: Device
    sock: socket.socket
    trace: list[str] = field(default_factory=list)
    to_tun: list[bytes] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def _log(self, arrow: str, data: bytes, addr: object) -> None:
        self.trace.append(f"{time.monotonic() - self.t0:7.3f} {arrow} {addr} {_describe(data)}")

    def send(self, datagrams: list) -> None:
        for data, endpoint in datagrams:
            self._log("->", data, endpoint)
            self.sock.sendto(data, endpoint)

    def outbound(self, packets: list[bytes]) -> None:
        self.send(self.device.outbound(packets, time.monotonic()))

    def pump(self, done: Callable[[], bool], timeout: float = STEP_TIMEOUT,
             on_packet: Callable[[bytes], None] | None = None) -> bool:
        """Receive/feed/send and run timers until done() or timeout. Returns done()."""
        deadline = time.monotonic() + timeout
        dev = self.device
        while not done():
            now = time.monotonic()
            if now >= deadline:
                return done()
            nd = dev.next_deadline()
            if nd is not None and nd <= now:
                self.send(dev.tick(now))
                nd = dev.next_deadline()
            wait = min(deadline - now, 0.05)
            if nd is not None:
                wait = max(0.0, min(wait, nd - now))
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                continue
            batch = []
            while True:
                try:
                    data, src = self.sock.recvfrom(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                self._log("<-", data, src)
                batch.append((data, src))
            result = dev.inbound(batch, time.monotonic())
            self.send(result.to_net)
            for pkt in result.to_tun:
                self.trace.append(f"{time.monotonic() - self.t0:7.3f}    to_tun {len(pkt)}B {pkt[:40].hex()}")
                self.to_tun.append(pkt)
                if on_packet is not None:
                    on_packet(pkt)
        return True

    def state(self) -> str:
        dev = self.device
        peers = []
        for peer in dev.peers.values():
            kp = peer.keypairs
            peers.append(
                f"endpoint={peer.endpoint} rx={peer.rx_bytes} tx={peer.tx_bytes} "
                f"current={kp.current is not None} staged={len(peer.staged)}"
            )
        return (f"drops={dict(dev.drops)} stats={dict(dev.stats)} peers={peers}\n"
                f"trace (last 40):\n  " + "\n  ".join(self.trace[-40:]))


# ---------------------------------------------------------------------- the lab


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def new_keypair() -> tuple[bytes, bytes]:
    priv = crypto.clamp(os.urandom(32))
    return priv, crypto.public_key(priv)


@dataclass
class WgGo:
    """wireguard-go running in namespace B, and our socket in namespace A."""

    lab: NetLab
    a: Namespace
    b: Namespace
    ifname: str
    wg: LabProcess
    private: bytes
    public: bytes
    sock: socket.socket
    family: int

    @property
    def endpoint(self) -> tuple[str, int]:
        return (UNDERLAY[self.family][1], WG_PORT)

    @property
    def our_endpoint_str(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if self.family == socket.AF_INET6 else f"{host}:{port}"

    def wg_set(self, *args: str) -> None:
        self.b.run(["wg", "set", self.ifname, *args], timeout=5)

    def show_dump(self) -> list[list[str]]:
        out = self.b.run(["wg", "show", self.ifname, "dump"], check=False, timeout=5).stdout
        return [line.split("\t") for line in out.splitlines()]

    def report(self, driver: CoreDriver | None = None) -> str:
        parts = []
        if driver is not None:
            parts.append("our core: " + driver.state())
        parts.append("wg show dump: " + repr(self.show_dump()))
        log = self.wg.output().splitlines()
        parts.append(f"wireguard-go (exit={self.wg.poll()}) log, last 40 lines:\n  " + "\n  ".join(log[-40:]))
        return "\n".join(parts)


def start_peer(lab: NetLab, family: int = socket.AF_INET) -> WgGo:
    a, b = lab.netns("ours"), lab.netns("wggo")
    ours, theirs, plen = UNDERLAY[family]
    lab.veth(a, b, addrs_a=[f"{UNDERLAY[socket.AF_INET][0]}/24", f"{UNDERLAY[socket.AF_INET6][0]}/64"],
             addrs_b=[f"{UNDERLAY[socket.AF_INET][1]}/24", f"{UNDERLAY[socket.AF_INET6][1]}/64"])

    ifname = unique_ifname("wgt")
    sockfile = f"/var/run/wireguard/{ifname}.sock"
    # wireguard-go removes its UAPI socket on SIGTERM; after a SIGKILL we do.
    lab.defer(lambda: os.path.exists(sockfile) and os.unlink(sockfile))
    wg = b.popen(["wireguard-go", "-f", ifname], env={"LOG_LEVEL": "debug"})
    b.wait_for_link(ifname, timeout=5, proc=wg)
    deadline = time.monotonic() + 5
    while not os.path.exists(sockfile):  # the UAPI socket comes right after the TUN
        assert wg.poll() is None and time.monotonic() < deadline, f"no {sockfile}:\n{wg.output()}"
        time.sleep(0.02)

    private, public = new_keypair()
    keyfile = os.path.join(lab.tmpdir, "peer.key")
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(b64(private) + "\n")
    b.run(["wg", "set", ifname, "private-key", keyfile, "listen-port", str(WG_PORT)], timeout=5)
    b.addr_add(ifname, f"{PEER_V4}/24")
    b.addr_add(ifname, f"{PEER_V6}/64")
    b.link_up(ifname)

    sock = a.socket(family, socket.SOCK_DGRAM)
    sock.bind((ours, 0))
    return WgGo(lab, a, b, ifname, wg, private, public, sock, family)


def our_device(private: bytes) -> Device:
    return Device(private, wall_offset=time.time() - time.monotonic())


def peer_dump_line(peer: WgGo, our_public: bytes) -> list[str]:
    rows = [r for r in peer.show_dump()[1:] if r and r[0] == b64(our_public)]
    assert len(rows) == 1, f"our peer not in wg show dump:\n{peer.report()}"
    return rows[0]


# ---------------------------------------------------------------------- the tests


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["udp4", "udp6"])
@pytest.mark.netns
@needs_wireguard_go
def test_our_core_initiates(netlab: NetLab, family: int) -> None:
    """We initiate: ICMP echo requests sent into the tunnel are answered by namespace B's kernel
    through wireguard-go, and our core decrypts the replies (IPv4 and IPv6 inside, over an IPv4
    or IPv6 underlay)."""
    wg = start_peer(netlab, family)
    our_priv, our_pub = new_keypair()
    wg.wg_set("peer", b64(our_pub), "allowed-ips", f"{OUR_V4}/32,{OUR_V6}/128")

    dev = our_device(our_priv)
    dev.add_peer(wg.public, endpoint=wg.endpoint, allowed_ips=[f"{PEER_V4}/32", f"{PEER_V6}/128"])
    drv = CoreDriver(dev, wg.sock)

    for n, (build, src, dst) in enumerate(((icmp4_echo, OUR_V4, PEER_V4), (icmp6_echo, OUR_V6, PEER_V6))):
        ident, seq, data = 0x4700 + n, 1 + n, os.urandom(8) + b"wgpy interop %d" % n
        drv.outbound([build(src, dst, ident, seq, data)])
        if n == 0:
            assert dev.stats["initiations sent"] == 1, f"no initiation for the first packet\n{wg.report(drv)}"

        def got_reply() -> bool:
            for pkt in drv.to_tun:
                e = parse_echo(pkt)
                if e and not e.is_request and (e.src, e.dst, e.ident, e.seq, e.data) == (dst, src, ident, seq, data):
                    return True
            return False

        assert drv.pump(got_reply), (
            f"no echo reply {dst} -> {src} (id={ident:#x} seq={seq}) from wireguard-go's side\n{wg.report(drv)}"
        )

    assert dev.stats["handshakes completed"] == 1, wg.report(drv)
    assert not dev.drops, f"our core dropped something\n{wg.report(drv)}"

    row = peer_dump_line(wg, our_pub)
    # public-key, preshared-key, endpoint, allowed-ips, latest-handshake, rx, tx, keepalive
    endpoint, latest, rx, tx = row[2], int(row[4]), int(row[5]), int(row[6])
    assert endpoint == wg.our_endpoint_str, f"wireguard-go sees us at {endpoint}\n{wg.report(drv)}"
    assert abs(latest - time.time()) < 30, f"latest handshake {latest} not recent\n{wg.report(drv)}"
    ours = dev.peers[wg.public]
    assert rx > 0 and tx > 0, f"wireguard-go transfer rx={rx} tx={tx}\n{wg.report(drv)}"
    # Both sides count the same datagrams (initiation/response sizes plus transport messages).
    assert (rx, tx) == (ours.tx_bytes, ours.rx_bytes), (
        f"byte counters disagree: wg rx/tx={rx}/{tx}, ours tx/rx={ours.tx_bytes}/{ours.rx_bytes}\n{wg.report(drv)}"
    )


@pytest.mark.netns
@needs_wireguard_go
def test_wireguard_go_initiates(netlab: NetLab) -> None:
    """wireguard-go initiates (persistent keepalive) and our core, with no endpoint configured,
    answers as responder; then the namespace kernel pings us through the tunnel (IPv4 and IPv6)
    and our echo replies must reach it."""
    wg = start_peer(netlab, socket.AF_INET)
    our_priv, our_pub = new_keypair()
    dev = our_device(our_priv)
    ours = dev.add_peer(wg.public, allowed_ips=[f"{PEER_V4}/32", f"{PEER_V6}/128"])
    drv = CoreDriver(dev, wg.sock)

    wg.wg_set("peer", b64(our_pub), "allowed-ips", f"{OUR_V4}/32,{OUR_V6}/128",
              "endpoint", wg.our_endpoint_str, "persistent-keepalive", "1")

    # Initiation in, response out, then wireguard-go's first keepalive confirms our keypair.
    assert drv.pump(lambda: dev.stats["handshakes completed"] >= 1), (
        f"no handshake completed as responder\n{wg.report(drv)}"
    )
    assert dev.stats["responses sent"] == 1 and dev.stats["initiations sent"] == 0, wg.report(drv)
    assert ours.endpoint == wg.endpoint, f"peer endpoint learnt as {ours.endpoint}\n{wg.report(drv)}"
    assert dev.stats["keepalives received"] >= 1, wg.report(drv)

    answered: list[Echo] = []

    def answer(pkt: bytes) -> None:
        e = parse_echo(pkt)
        if e is not None and e.is_request and e.dst in (OUR_V4, OUR_V6):
            answered.append(e)
            drv.outbound([echo_reply_for(e)])

    for target, flag in ((OUR_V4, "-4"), (OUR_V6, "-6")):
        ping = wg.b.popen(["ping", flag, "-n", "-c", "3", "-i", "0.2", "-W", "2", target])
        before = len(answered)
        finished = drv.pump(lambda: ping.poll() is not None, timeout=STEP_TIMEOUT, on_packet=answer)
        out = ping.output()
        assert finished, f"ping {target} still running\n{out}\n{wg.report(drv)}"
        assert ping.poll() == 0 and " 3 received" in out, (
            f"ping {target} in the peer namespace failed (exit {ping.poll()}):\n{out}\n{wg.report(drv)}"
        )
        got = [e for e in answered[before:] if e.dst == target]
        assert len(got) == 3, f"expected 3 echo requests to {target}, answered {len(got)}\n{wg.report(drv)}"

    assert dev.stats["handshakes completed"] == 1 and dev.stats["initiations sent"] == 0, wg.report(drv)
    assert not dev.drops, f"our core dropped something\n{wg.report(drv)}"
    row = peer_dump_line(wg, our_pub)
    assert int(row[4]) > 0 and int(row[5]) > 0 and int(row[6]) > 0 and row[7] == "1", (
        f"wg show row {row}\n{wg.report(drv)}"
    )
