"""udp-over-tcp across a path that drops all UDP (the Bridge mode acceptance test).

    namespace C (client)                                  namespace S (server)
    UDP app --> udp2tcp client 127.0.0.1:51000/UDP        nftables: UDP in on the veth -> drop
                   \\==== TCP 10.203.0.1 -> 10.203.0.2:5001 ====> udp2tcp server --> 127.0.0.1:7777/UDP echo

The udp2tcp ends run as `python -m bridge.udp2tcp` subprocesses inside the namespaces; the test's
own sockets are opened inside them with netlab's setns helper.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from .traffic import udp_echo
from .netlab import LabProcess, Namespace, NetLab, missing_requirements
from .wg_peers import WgInterface

pytestmark = pytest.mark.netns

C_ADDR, S_ADDR = "10.203.0.1", "10.203.0.2"
TCP_PORT = 5001
ECHO = ("127.0.0.1", 7777)
FORWARDER = ("127.0.0.1", 51000)
SIZES = [0, 1, 1400, 65507]


@pytest.fixture(autouse=True)
def _needs_nft():
    reason = missing_requirements(("nft",))
    if reason:
        pytest.skip(reason)


def udp2tcp(ns: Namespace, *args: str) -> LabProcess:
    proc = ns.popen([sys.executable, "-m", "bridge.udp2tcp", *args])
    deadline = time.monotonic() + 10
    while "listening on" not in proc.output():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"udp2tcp {args[0]} did not start:\n{proc.output()}")
        time.sleep(0.02)
    return proc


def udp_blocked_lab(lab: NetLab) -> tuple[Namespace, Namespace]:
    """C and S joined by a veth; in S every UDP datagram coming in over the veth is dropped.
    Asserts the setup: plain UDP C -> S arrives before the rule and no longer after it."""
    c, s = lab.netns("c"), lab.netns("s")
    _, veth_s = lab.veth(c, s, addrs_a=[f"{C_ADDR}/24"], addrs_b=[f"{S_ADDR}/24"])
    probe_rx = s.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe_rx.bind((S_ADDR, 9999))
    probe_rx.settimeout(2.0)
    probe_tx = c.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe_tx.sendto(b"before", (S_ADDR, 9999))
    assert probe_rx.recvfrom(100)[0] == b"before"  # the path carries UDP without the rule

    s.run(["nft", "-f", "-"], input=(
        "table inet udp2tcp_test {\n"
        "  chain in {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    meta l4proto udp iifname \"{veth_s}\" counter drop\n"
        "  }\n"
        "}\n"))
    probe_rx.settimeout(0.5)
    probe_tx.sendto(b"after", (S_ADDR, 9999))
    with pytest.raises(socket.timeout):
        probe_rx.recvfrom(100)
    ruleset = s.run(["nft", "list", "table", "inet", "udp2tcp_test"]).stdout
    assert "packets 1 " in ruleset, ruleset  # dropped by the rule, not lost some other way
    return c, s


def test_udp_through_tcp_when_udp_is_blocked(netlab):
    c, s = udp_blocked_lab(netlab)
    udp_echo(netlab, s, ECHO)
    server = udp2tcp(s, "server", "--listen", f"{S_ADDR}:{TCP_PORT}",
                     "--forward", f"{ECHO[0]}:{ECHO[1]}", "--idle-timeout", "30")
    client = udp2tcp(c, "client", "--listen", f"{FORWARDER[0]}:{FORWARDER[1]}",
                     "--server", f"{S_ADDR}:{TCP_PORT}")

    app = c.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.settimeout(0.2)
    # Datagrams sent before the TCP connection is up are dropped (as UDP would lose them): retry.
    deadline = time.monotonic() + 10
    while True:
        app.sendto(b"hello", FORWARDER)
        try:
            if app.recvfrom(100) == (b"hello", FORWARDER):
                break
        except socket.timeout:
            pass
        assert time.monotonic() < deadline, client.output() + server.output()
    app.settimeout(5.0)
    for n in SIZES:
        payload = bytes([n % 251]) * n
        app.sendto(payload, FORWARDER)
        data, src = app.recvfrom(65535)
        assert (len(data), src) == (n, FORWARDER)
        assert data == payload

    # The other local addresses are not the remembered peer: nothing comes back to them.
    stranger = c.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.settimeout(0.3)
    stranger.sendto(b"stranger", FORWARDER)
    with pytest.raises(socket.timeout):
        stranger.recvfrom(100)
    assert server.poll() is None and client.poll() is None


def test_wireguard_go_over_udp2tcp(netlab):
    """Two wireguard-go peers whose only path is the udp2tcp bridge: the client's peer endpoint is
    the local forwarder, the server forwards to wireguard-go's port on its own loopback."""
    reason = missing_requirements(("nft", "wireguard-go", "wg", "ping"), need_tun=True)
    if reason:
        pytest.skip(reason)
    c, s = udp_blocked_lab(netlab)
    wg_s = WgInterface(netlab, s, "wireguard-go").start()
    wg_c = WgInterface(netlab, c, "wireguard-go").start()
    udp2tcp(s, "server", "--listen", f"{S_ADDR}:{TCP_PORT}", "--forward", "127.0.0.1:51820")
    udp2tcp(c, "client", "--listen", f"{FORWARDER[0]}:{FORWARDER[1]}",
            "--server", f"{S_ADDR}:{TCP_PORT}")
    wg_s.setconf(listen_port=51820, peers=[wg_c.peer_conf(["10.204.0.1/32"])])
    wg_c.setconf(listen_port=51821, peers=[wg_s.peer_conf(
        ["10.204.0.2/32"], f"{FORWARDER[0]}:{FORWARDER[1]}")])
    wg_c.address("10.204.0.1/24")
    wg_s.address("10.204.0.2/24")
    r = c.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.204.0.2"], check=False, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr + wg_c.log()[-2000:]
    peer = wg_c.dump()["peers"][wg_s.keys.public_b64]
    assert peer["latest_handshake"] > 0 and peer["rx"] > 0
    # The server side sees the client at its own UDP relay socket on loopback.
    assert wg_s.dump()["peers"][wg_c.keys.public_b64]["endpoint"].startswith("127.0.0.1:")
