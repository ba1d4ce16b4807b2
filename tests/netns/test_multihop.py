"""Multihop with real peers: `wgpy up` nests the exit relay's tunnel inside the entry relay's.

    client (wgpy up) -> entry relay -> exit relay -> destination      (tests/netns/multihop_lab.py)

The relays are wireguard-go or wgpy-daemon interfaces configured by `wg setconf`, forwarding and
masquerading towards the next hop; each relay reaches only its neighbours (the client's default
gateway is the entry relay's host, as on the Internet). The client's config is a full tunnel
(exit: AllowedIPs = 0.0.0.0/0, ::/0) with the nesting either detected (the layout Mullvad and
kernel users write: entry AllowedIPs = the exit's address/32) or explicit (`Via =`).

- traffic: ping v4 and v6 to the destination, iperf3 both ways, for both relay kinds and layouts,
  and once with the exit's endpoint on IPv6 (nested datagrams in IPv6 between the relays: a
  full-size reply, padded by the exit, must still fit the entry's tunnel);
- leaks (nftables counters, in every traffic test): the client's link carries only the entry hop
  (UDP to the entry's endpoint, or the bridge's packets), the exit receives only from the entry's
  address, the destination sees only the exit's; and no IP fragment appears anywhere. A datagram
  sent around the entry (to the exit, with the daemon's fwmark) is counted: the check can fail;
- MTU: 1500 - 80 - 80 down to a multiple of 16 (WireGuard's padding); a DF ping of exactly the MTU reaches the destination, one byte more fails
  locally with "message too long";
- the entry hop through `wgpy bridge serve`: Shadowsocks, and udp-over-tcp through a firewall that
  drops all UDP on the client's link;
- a relay restarted mid-transfer (entry, then exit): the traffic resumes by itself within a bound.

One lab per relay kind serves the whole module (each test brings its own `wgpy up` and takes it
down); the restart tests come last.
"""

from __future__ import annotations

import contextlib
import socket
import time
import warnings
from typing import Callable, Iterator

import pytest

from bridge.spec import parse_bridge

from .multihop_lab import (C_LINK4, DEST4, DEST6, E_FWD4, E_FWD6, E_LINK4, LINK_MTU, NEST_OVERHEAD, SS_URI,
                           UDP2TCP_PORT, UDP2TCP_URI, SS_PORT, WG_PORT, X_LINK4, MultihopLab)
from .netlab import NetLab, missing_requirements
from .traffic import PingStream, iperf3, ping, received

pytestmark = pytest.mark.netns

# Functional floor, not a benchmark: TCP really flows through both hops (`wgpy bench multihop`
# measures speed). Seven processes share the data path on a 2-core machine.
MIN_MBPS = 1.0
IPERF_SECONDS = 2.0
# A restarted relay has no session: the client notices after WireGuard's keepalive timeout plus
# rekey timeout (10 + 5 s) without an answer to its data, then handshakes again (each try 5 s).
RESUME_BOUND = 30.0


def nested_mtu(overhead: int = 0) -> int:
    """1500 - 80 - 80 (minus a bridge), down to a multiple of 16: WireGuard pads to 16 bytes."""
    room = LINK_MTU - NEST_OVERHEAD - NEST_OVERHEAD - overhead
    return room - room % 16


MTU = nested_mtu()  # 1328
SO_MARK = getattr(socket, "SO_MARK", 36)


@pytest.fixture(scope="module")
def lab() -> Iterator[Callable[[str], MultihopLab]]:
    """lab(kind): the module's multihop lab with `kind` relays ("wireguard-go" or "wgpy"), built
    on first use, removed (namespaces, processes) when the module is done, pass or fail."""
    reason = missing_requirements(("ip", "wg", "nft", "ping", "iperf3", "wireguard-go"), need_tun=True)
    if reason:
        pytest.skip(reason)
    made: dict[str, tuple[NetLab, MultihopLab]] = {}

    def get(kind: str) -> MultihopLab:
        if kind not in made:
            netlab = NetLab()
            try:
                made[kind] = (netlab, MultihopLab(netlab, kind))
            except BaseException:
                netlab.close()
                raise
        return made[kind][1]

    try:
        yield get
    finally:
        for netlab, _ in made.values():
            netlab.close()
            if netlab.cleanup_errors:
                warnings.warn("netlab cleanup problems: " + "; ".join(netlab.cleanup_errors))


def check_ping(m: MultihopLab, ifname: str, dst: str, count: int = 3) -> None:
    r = ping(m.client_ns, dst, count=count, wait=3)
    assert received(r) == count, (f"ping {dst}:\n{r.stdout}{r.stderr}\n{m.wgpy('show', ifname).stdout}"
                                  f"\n{m.client_log(ifname)}\n{m.relay_state()}")


def check_iperf(m: MultihopLab, label: str) -> None:
    for reverse in (False, True):
        result = iperf3(m.dest_ns, m.client_ns, DEST4, reverse=reverse, seconds=IPERF_SECONDS)
        print(f"\n[multihop {label}] iperf3 {'<-' if reverse else '->'}: {result.mbps:.1f} Mbit/s")
        assert result.mbps > MIN_MBPS, str(result)


def check_no_leaks(m: MultihopLab, *, v6: bool = True) -> None:
    """What each link carried since watch_client_link(): only the hop it should, and something."""
    seen = m.counters()
    assert seen["client"]["other"] == 0 and seen["client"]["entry"] > 0, seen
    assert seen["exit"]["other"] == 0 and seen["exit"]["entry"] + seen["exit"]["entry6"] > 0, seen
    assert seen["dest"]["other"] == 0 and seen["dest"]["exit4"] > 0, seen
    assert seen["dest"]["exit6"] > 0 or not v6, seen
    # The relays' own view: the entry knows the client's address, the exit only the entry's.
    client = m.client_keys.public_b64
    entry_sees = m.entry.dump()["peers"][client]["endpoint"]
    exit_sees = m.exit.dump()["peers"][client]["endpoint"]
    assert exit_sees is not None and exit_sees.startswith((f"{E_FWD4}:", f"[{E_FWD6}]:")), exit_sees
    assert entry_sees is not None and entry_sees.rsplit(":", 1)[0] in (C_LINK4, "127.0.0.1"), entry_sees


def check_no_fragments(m: MultihopLab) -> None:
    fragments = m.fragments()
    assert not any(fragments.values()), fragments


def check_show(m: MultihopLab, ifname: str) -> None:
    show = m.wgpy("show", ifname).stdout
    exit_section = show.split(f"peer: {m.exit.keys.public_b64}")[1]
    assert f"via: {m.entry.keys.public_b64}" in exit_section, show


@pytest.mark.parametrize("relays, layout", [
    ("wireguard-go", "detected"), ("wireguard-go", "via"), ("wgpy", "detected"), ("wgpy", "via"),
    ("wireguard-go", "detected-exit-v6"),  # the nested datagrams in IPv6 between the relays
])
def test_ping_and_iperf_through_both_hops(lab, relays, layout):
    """Both relay kinds, both layouts: ping v4 and v6 and iperf3 both ways to the destination,
    nothing on any link but the hop it should carry, no fragment anywhere."""
    m = lab(relays)
    m.watch_client_link()
    config = m.client_config(via=layout == "via", exit_v6=layout.endswith("v6"))
    with m.client(config) as ifname:
        assert m.mtu(ifname) == MTU
        check_ping(m, ifname, DEST4)
        check_ping(m, ifname, DEST6)
        check_iperf(m, f"{relays} relays, {layout}")
        check_show(m, ifname)
        check_no_leaks(m)
        # The counters do catch a leak: a datagram to the exit sent as the daemon's own (with its
        # fwmark, so the full tunnel's rules let it out by the main table) leaves by the default
        # route, through the entry relay's host, and is counted.
        mark = int(m.client_ns.run(["wg", "show", ifname, "fwmark"]).stdout.strip(), 0)
        leak = m.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        leak.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        leak.sendto(b"leak", (X_LINK4, WG_PORT))
        leak.close()
        assert m.counters()["client"]["other"] == 1
        check_no_fragments(m)


def test_df_ping_of_exactly_the_mtu(lab):
    """1500 - 80 - 80: a DF ping of exactly the interface MTU crosses both relays without a
    fragment; one byte more is refused locally."""
    m = lab("wireguard-go")
    m.watch_client_link()
    with m.client(m.client_config(via=False)) as ifname:
        mtu = m.mtu(ifname)
        assert mtu == MTU
        for dst, header, six in ((DEST4, 28, []), (DEST6, 48, ["-6"])):
            fits = m.client_ns.run(["ping", *six, "-n", "-M", "do", "-c", "2", "-i", "0.2", "-W", "3",
                                    "-s", str(mtu - header), dst], check=False)
            assert received(fits) == 2, fits.stdout + fits.stderr + m.relay_state()
            assert f"{mtu - header + 8} bytes from" in fits.stdout, fits.stdout
            over = m.client_ns.run(["ping", *six, "-n", "-M", "do", "-c", "1", "-W", "2",
                                    "-s", str(mtu - header + 1), dst], check=False)
            assert over.returncode != 0 and "message too long" in over.stdout + over.stderr, over
        check_no_leaks(m)
        check_no_fragments(m)


@pytest.mark.parametrize("carrier", ["ss", "udp2tcp"])
def test_entry_hop_through_a_bridge(lab, carrier):
    """Full tunnel, entry through `wgpy bridge serve` on the entry relay: Shadowsocks, or
    udp-over-tcp with every UDP packet on the client's link dropped. Only the bridge's packets
    leave the client; the MTU drops by the bridge's overhead on top of both hops."""
    m = lab("wireguard-go")
    m.start_bridge_server()
    uri = {"ss": SS_URI, "udp2tcp": UDP2TCP_URI}[carrier]
    overhead = parse_bridge(uri).overhead(("127.0.0.1", WG_PORT))
    with (m.censor_udp() if carrier == "udp2tcp" else contextlib.nullcontext()):
        if carrier == "udp2tcp":  # the censor works: a plain UDP datagram is counted and dropped
            m.client_ns.run(["bash", "-c", f"echo probe > /dev/udp/{E_LINK4}/{WG_PORT}"], check=False)
            assert m.censored() == 1
        m.watch_client_link(*(("udp", SS_PORT) if carrier == "ss" else ("tcp", UDP2TCP_PORT)))
        with m.client(m.client_config(via=True, bridge=uri)) as ifname:
            mtu = m.mtu(ifname)
            assert mtu == nested_mtu(overhead)
            check_ping(m, ifname, DEST4)
            check_ping(m, ifname, DEST6)
            fits = m.client_ns.run(["ping", "-n", "-M", "do", "-c", "1", "-W", "3", "-s", str(mtu - 28), DEST4],
                                   check=False)
            assert received(fits) == 1, fits.stdout + fits.stderr
            check_iperf(m, f"bridge {carrier}")
            check_no_leaks(m)
            check_no_fragments(m)
        if carrier == "udp2tcp":
            assert m.censored() == 1  # the tunnel never tried UDP


@pytest.mark.parametrize("which", ["entry", "exit"])
def test_relay_restart_mid_transfer(lab, which):
    """A relay's daemon is stopped and started again with the same config while a ping stream
    and a TCP connection run through both hops: the traffic resumes by itself (the client
    handshakes again after WireGuard's timeouts) within RESUME_BOUND, and the TCP connection,
    its NAT state on the relays intact, carries data again."""
    m = lab("wireguard-go")
    port = {"entry": 7007, "exit": 7008}[which]
    m.tcp_echo(port)
    m.watch_client_link()
    with m.client(m.client_config(via=False)) as ifname:
        check_ping(m, ifname, DEST4, count=1)
        conn = m.client_ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect((DEST4, port))
        conn.sendall(b"before")
        assert conn.recv(64) == b"before"
        stream = PingStream(m.client_ns, DEST4, interval=0.1)
        try:
            assert stream.wait_reply_after(time.time(), 5) is not None, stream.output()
            relay = m.entry if which == "entry" else m.exit
            time.sleep(0.5)
            m.restart_relay(relay)
            restarted = time.time()
            took = stream.wait_reply_after(restarted, RESUME_BOUND + 5)
            print(f"\n[multihop] traffic resumed {took and round(took, 1)} s after the {which} relay restarted")
            assert took is not None and took < RESUME_BOUND, (
                f"no reply within {RESUME_BOUND} s after the {which} relay restarted\n"
                f"{m.wgpy('show', ifname).stdout}\n{m.client_log(ifname)}\n{m.relay_state()}")
        finally:
            stream.stop()
        conn.settimeout(10)
        conn.sendall(b"after")
        assert conn.recv(64) == b"after"
        conn.close()
        check_no_leaks(m, v6=False)
