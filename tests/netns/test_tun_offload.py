"""TUN offloads against the real kernel, in network namespaces:

    test_iperf3_through_offloads   wgpy <-> wgpy with offloads (the default): iperf3 both ways, no
                                   retransmit storm, `wg show` counters matching iperf3's bytes, and
                                   the daemons' own counts showing super-packets read and written
    test_iperf3_offloads_forced_off   the same with one side forced off in each way a user or a
                                   kernel can: WGPY_TUN_OFFLOAD=0, and `ethtool -K` turning the
                                   interface's TSO, GSO and checksum offload off
    test_tun_reads_from_the_kernel  a Tun read as the kernel hands packets over: a TCP SYN whose
                                   checksum is left to us, a UDP GSO send (USO) cut into datagrams,
                                   all with valid checksums; with TUNSETOFFLOAD refused, plain
                                   packets through the vnet header
"""

from __future__ import annotations

import errno
import re
import socket
import struct
import time

import pytest

from tunnel import tun as tunmod
from tunnel.tun import Tun

from ..helpers import checksum, checksums_valid
from .netlab import missing_requirements, unique_ifname
from .test_daemon_interop import A_IN4, B_IN4, B_IN6, PORT_A, PORT_B, diag, endpoint, wg_set
from .traffic import iperf3, wait_for_ping
from .wg_peers import WgInterface

pytestmark = pytest.mark.netns

COUNTS = re.compile(r"TUN offloads: (\d+) super-packets read \((\d+) packets\), (\d+) written "
                    r"\((\d+) segments\)")


def require(*tools: str) -> None:
    reason = missing_requirements(("ip", "wg", "ping", "iperf3", *tools), need_tun=True)
    if reason:
        pytest.skip(reason)


def make_pair(lab, env_a=None):
    a_ns, b_ns = lab.netns("a"), lab.netns("b")
    lab.veth(a_ns, b_ns, addrs_a=["10.203.0.1/24"], addrs_b=["10.203.0.2/24"])
    a = WgInterface(lab, a_ns, "wgpy").start(env=env_a)
    b = WgInterface(lab, b_ns, "wgpy").start()
    wg_set(a, listen_port=PORT_A,
           peers=[b.peer_conf([f"{B_IN4}/32", f"{B_IN6}/128"], endpoint("10.203.0.2", PORT_B))])
    b.setconf(listen_port=PORT_B, peers=[a.peer_conf([f"{A_IN4}/32"])])
    a.address(f"{A_IN4}/24", "fd00:202::1/64")
    b.address(f"{B_IN4}/24", f"{B_IN6}/64")
    assert wait_for_ping(a_ns, B_IN4, 10) is not None, diag(a, b, extra="no ping through the tunnel")
    return a_ns, b_ns, a, b


def counts(iface: WgInterface) -> tuple[int, int, int, int]:
    """The daemon's offload counts, logged when it stops."""
    iface.stop()
    m = COUNTS.search(iface.log())
    assert m, diag(iface, extra="no offload counts in the log")
    return tuple(int(x) for x in m.groups())


def check_run(res, a, b, sender, receiver) -> None:
    ctx = diag(a, b, extra=str(res))
    segments = res.received_bytes / 1300
    # No retransmit storm: a healthy run retransmits well under 1% of its segments.
    assert res.retransmits is not None and res.retransmits <= max(100, segments / 100), ctx
    tx = sender.dump()["peers"][receiver.keys.public_b64]["tx"]
    rx = receiver.dump()["peers"][sender.keys.public_b64]["rx"]
    # Each datagram carries one <=MTU packet of the stream plus WireGuard's 32 bytes and padding:
    # the counters are the payload plus under 12% (and the earlier pings and handshakes).
    assert res.received_bytes <= rx <= tx, ctx
    assert tx <= res.received_bytes * 1.12 + 2_000_000, ctx


def test_iperf3_through_offloads(netlab):
    require()
    a_ns, b_ns, a, b = make_pair(netlab)
    res = iperf3(b_ns, a_ns, B_IN4, seconds=2)  # a sends
    check_run(res, a, b, a, b)
    before = b.dump()["peers"][a.keys.public_b64]["tx"]
    res6 = iperf3(b_ns, a_ns, B_IN4, seconds=2, reverse=True)  # b sends
    assert res6.retransmits <= max(100, res6.received_bytes / 130000), diag(a, b, extra=str(res6))
    assert b.dump()["peers"][a.keys.public_b64]["tx"] - before >= res6.received_bytes
    read_a, read_pkts_a, wrote_a, segs_a = counts(a)
    read_b, read_pkts_b, wrote_b, segs_b = counts(b)
    print(f"\n[offloads] a->b {res.mbps:.0f} Mbit/s (retr {res.retransmits}), "
          f"b->a {res6.mbps:.0f} (retr {res6.retransmits}); a read {read_a} super-packets "
          f"({read_pkts_a} packets), wrote {wrote_a} ({segs_a}); b read {read_b} ({read_pkts_b}), "
          f"wrote {wrote_b} ({segs_b})")
    # Both sides sent and received bulk TCP: super-packets came in from the kernel and went out
    # to it, each standing for several segments.
    assert read_a > 0 and read_pkts_a > 2 * read_a
    assert read_b > 0 and wrote_a > 0 and wrote_b > 0 and segs_b > 2 * wrote_b


@pytest.mark.parametrize("how", ["env", "ethtool"])
def test_iperf3_offloads_forced_off(netlab, how):
    require("ethtool") if how == "ethtool" else require()
    env = {"WGPY_TUN_OFFLOAD": "0"} if how == "env" else None
    a_ns, b_ns, a, b = make_pair(netlab, env_a=env)
    if how == "ethtool":
        a_ns.run(["ethtool", "-K", a.ifname, "tso", "off", "gso", "off", "tx", "off"])
    for reverse in (False, True):
        res = iperf3(b_ns, a_ns, B_IN4, seconds=1, reverse=reverse)
        if reverse:
            assert res.retransmits <= max(100, res.received_bytes / 130000), diag(a, b, extra=str(res))
        else:
            check_run(res, a, b, a, b)
    if how == "env":
        a.stop()
        assert "TUN offloads: off" in a.log(), diag(a)
        assert not COUNTS.search(a.log())
    else:
        read_a, _, wrote_a, _ = counts(a)
        assert read_a == 0, diag(a, extra="super-packets read with TSO and GSO off")
        assert wrote_a > 0  # writing super-packets does not depend on the ethtool features
    read_b, *_ = counts(b)
    assert read_b > 0  # the other side kept its offloads


# ---------------------------------------------------------------------- the Tun itself


def _read_all(t: Tun, want, tries=50):
    """Read until `want(packets)` holds (the kernel sends router solicitations and the like)."""
    got = []
    for _ in range(tries):
        got += t.read_batch(64)
        if want(got):
            return got
        time.sleep(0.02)
    return got


@pytest.mark.parametrize("refused", [False, True], ids=["offloads", "offload-refused"])
def test_tun_reads_from_the_kernel(netlab, monkeypatch, refused):
    require()
    ns = netlab.netns("t")
    name = unique_ifname("wgpyo")
    if refused:
        real = tunmod.fcntl.ioctl

        def ioctl(fd, request, arg=0, *rest):
            if request == tunmod.TUNSETOFFLOAD:
                raise OSError(errno.EINVAL, "refused by the test")
            return real(fd, request, arg, *rest)
        monkeypatch.setattr(tunmod.fcntl, "ioctl", ioctl)
    with ns.entered():
        t = Tun(name, 1420)
    netlab.defer(t.close)
    assert t.vnet_hdr
    assert t.tso == (not refused)
    ns.addr_add(name, "10.204.0.1/24")
    ns.link_up(name)
    payload = bytes(range(256)) * 30  # 7680 bytes: 6 datagrams of 1280
    with ns.entered():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    netlab.defer(u.close)
    netlab.defer(c.close)
    # A UDP GSO send: with USO it crosses the TUN as one super-packet, otherwise the kernel cuts it.
    u.sendmsg([payload], [(socket.SOL_UDP, 103, struct.pack("=H", 1280))], 0, ("10.204.0.9", 9999))
    c.setblocking(False)
    try:
        c.connect(("10.204.0.9", 80))
    except BlockingIOError:
        pass

    def done(got):
        udp = [p for p in got if p[9] == 17 and p[22:24] == b"\x27\x0f"]
        syn = [p for p in got if p[9] == 6]
        return len(udp) == 6 and syn
    got = _read_all(t, done)
    udp = [p for p in got if p[0] >> 4 == 4 and p[9] == 17 and p[22:24] == b"\x27\x0f"]
    syn = [p for p in got if p[0] >> 4 == 4 and p[9] == 6]
    assert [len(p) for p in udp] == [20 + 8 + 1280] * 6, [len(p) for p in got]
    assert b"".join(p[28:] for p in udp) == payload
    assert syn and all(checksums_valid(p) for p in udp + syn), "a checksum left unfinished"
    if not refused and t.uso:
        assert t.gso_reads >= 1  # the six came as one super-packet
    if refused:
        assert t.gso_reads == 0 and t.offloads == "off"
    # Writing: an ICMP echo request "from" the other end; the kernel's reply comes back.
    icmp = struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"x" * 40
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                     socket.inet_aton("10.204.0.9"), socket.inet_aton("10.204.0.1"))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    t.write_batch([ip + icmp])
    replies = _read_all(t, lambda g: any(p[9] == 1 and p[20] == 0 for p in g if p[0] >> 4 == 4))
    assert any(p[0] >> 4 == 4 and p[9] == 1 and p[20] == 0 for p in replies), replies
    assert not t.drops.reasons
