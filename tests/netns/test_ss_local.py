"""`python -m bridge.ss_local` (the client side of the Shadowsocks UDP carrier) against real servers.

    namespace C (client)                                   namespace S (server)
    veth 10.211.0.1/24                               <->   veth 10.211.0.2/24
    app / wireguard-go --> ss_local 127.0.0.1:P  ==UDP==>  ss-server -s 0.0.0.0 -p 8388 -U  (2017)
                                                           python -m bridge.serve ss://2022-...  (2022)
                                                             --> UDP echo 127.0.0.1:7007
                                                             --> wireguard-go 127.0.0.1:51820

The forwarder runs as a subprocess with --listen 127.0.0.1:0 and prints its chosen address on the
first line of stdout; the test's own sockets are opened inside the namespaces (netlab setns).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import sys
import time
from urllib.parse import quote

import pytest

from bridge.shadowsocks import Cipher, Udp2022Server
from bridge.ss_local import overhead

from .traffic import udp_echo
from .netlab import LabProcess, Namespace, NetLab, missing_requirements
from .wg_peers import WgInterface

pytestmark = pytest.mark.netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
C_ADDR, S_ADDR = "10.211.0.1", "10.211.0.2"
SS_PORT = 8388
ECHO = ("127.0.0.1", 7007)
WG_TARGET = ("127.0.0.1", 51820)
PASSWORD = "wgpy-ss-local/Pa55:w0rd"
METHODS_2017 = ("chacha20-ietf-poly1305", "aes-256-gcm", "aes-128-gcm")
METHOD_2022 = "2022-blake3-aes-256-gcm"
PSK_2022 = base64.b64encode(bytes(range(7, 39))).decode()
SIZES = (1, 100, 1400)
VETH_MTU = 1500
WG_DATA_OVERHEAD = 32  # WireGuard transport header (16) + Poly1305 tag (16)


def _uri(method: str, host: str) -> str:
    password = PSK_2022 if method.startswith("2022-") else PASSWORD
    return f"ss://{quote(method, safe='')}:{quote(password, safe='')}@{host}:{SS_PORT}"


def _lab(lab: NetLab) -> tuple[Namespace, Namespace, str]:
    """C and S joined by a veth; returns them and the veth's name in S."""
    c, s = lab.netns("ssc"), lab.netns("sss")
    _, veth_s = lab.veth(c, s, addrs_a=[f"{C_ADDR}/24"], addrs_b=[f"{S_ADDR}/24"])
    return c, s, veth_s


def _wait_udp_bound(ns: Namespace, port: int, proc: LabProcess, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run(["ss", "-Hlun", f"sport = :{port}"], check=False).stdout.strip():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"nothing bound to UDP port {port}:\n{proc.output()}")


def _ss_server(ns: Namespace, method: str) -> LabProcess:
    proc = ns.popen(["ss-server", "-s", "0.0.0.0", "-p", str(SS_PORT), "-k", PASSWORD,
                     "-m", method, "-U"])
    _wait_udp_bound(ns, SS_PORT, proc)
    return proc


def _bridge_serve_2022(ns: Namespace, allow: tuple[str, int]) -> LabProcess:
    proc = ns.popen([PYTHON, "-m", "bridge.serve", "--listen", _uri(METHOD_2022, "0.0.0.0"),
                     "--allow", f"{allow[0]}:{allow[1]}"], env={"PYTHONPATH": REPO})
    deadline = time.monotonic() + 10
    while "ready:" not in proc.output():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"bridge.serve did not start:\n{proc.output()}")
        time.sleep(0.05)
    return proc


def _forwarder(ns: Namespace, uri: str, target: tuple[str, int]) -> tuple[LabProcess, tuple[str, int]]:
    """Start `python -m bridge.ss_local --listen 127.0.0.1:0` in `ns`; returns it and its address
    (the first line it prints)."""
    proc = ns.popen([PYTHON, "-m", "bridge.ss_local", "--listen", "127.0.0.1:0",
                     "--server-uri", uri, "--target", f"{target[0]}:{target[1]}"],
                    env={"PYTHONPATH": REPO})
    deadline = time.monotonic() + 10
    while True:
        out = proc.output()
        m = re.match(r"(127\.0\.0\.1):(\d+)\n", out)
        if m:
            assert out == m.group(0), f"unexpected output: {out!r}"  # nothing else on success
            return proc, (m.group(1), int(m.group(2)))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ss_local did not start:\n{out}")
        time.sleep(0.02)


def _app(ns: Namespace) -> socket.socket:
    s = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _echo_through(app: socket.socket, fwd: tuple[str, int], procs: list[LabProcess]) -> None:
    # the first datagram may race the server's start: retry it
    app.settimeout(0.3)
    deadline = time.monotonic() + 8
    while True:
        app.sendto(b"hello", fwd)
        try:
            if app.recvfrom(100) == (b"hello", fwd):
                break
        except socket.timeout:
            pass
        assert time.monotonic() < deadline, "\n".join(p.output()[-2000:] for p in procs)
    app.settimeout(3.0)
    for n in SIZES:
        payload = os.urandom(n)
        app.sendto(payload, fwd)
        data, src = app.recvfrom(65535)
        assert (data, src) == (payload, fwd), n


def _stop_cleanly(proc: LabProcess) -> None:
    proc.stop()
    assert proc.poll() == 0, proc.output()
    assert PASSWORD not in proc.output() and PSK_2022 not in proc.output()


# ---------------------------------------------------------------- echo through real servers


@pytest.mark.parametrize("method", METHODS_2017)
def test_echo_through_ss_server(netlab: NetLab, method: str) -> None:
    reason = missing_requirements(("ss-server", "ss"))
    if reason:
        pytest.skip(reason)
    c, s, _ = _lab(netlab)
    udp_echo(netlab, s, ECHO)
    server = _ss_server(s, method)
    fwd_proc, fwd = _forwarder(c, _uri(method, S_ADDR), ECHO)
    app = _app(c)
    _echo_through(app, fwd, [fwd_proc, server])

    # another local address is not the remembered peer: it gets nothing back
    stranger = _app(c)
    stranger.settimeout(0.3)
    stranger.sendto(b"stranger", fwd)
    with pytest.raises(socket.timeout):
        stranger.recvfrom(100)
    app.sendto(b"still", fwd)
    assert app.recvfrom(100) == (b"still", fwd)
    _stop_cleanly(fwd_proc)


def test_echo_through_bridge_serve_2022(netlab: NetLab) -> None:
    reason = missing_requirements(("ss",))
    if reason:
        pytest.skip(reason)
    c, s, _ = _lab(netlab)
    udp_echo(netlab, s, ECHO)
    server = _bridge_serve_2022(s, ECHO)
    fwd_proc, fwd = _forwarder(c, _uri(METHOD_2022, S_ADDR), ECHO)
    _echo_through(_app(c), fwd, [fwd_proc, server])
    _stop_cleanly(fwd_proc)


# ---------------------------------------------------------------- overhead against the wire


@pytest.mark.parametrize("method", (*METHODS_2017, METHOD_2022))
def test_overhead_is_the_wire_growth(netlab: NetLab, method: str) -> None:
    """Our own socket plays the server: every datagram arrives exactly as many bytes bigger as a
    request grows (overhead() for AEAD-2017; for 2022, overhead() is the reply's growth, 8 bytes
    more), and opens to (target, payload)."""
    c, s, _ = _lab(netlab)
    fake = s.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind((S_ADDR, SS_PORT))
    fake.settimeout(3.0)
    uri = _uri(method, S_ADDR)
    assert overhead(uri, ECHO) == {"chacha20-ietf-poly1305": 55, "aes-256-gcm": 55, "aes-128-gcm": 39,
                                   METHOD_2022: 58}[method]
    grow = overhead(uri, ECHO) - (8 if method == METHOD_2022 else 0)
    fwd_proc, fwd = _forwarder(c, uri, ECHO)
    app = _app(c)
    cipher = Cipher(method, PSK_2022 if method == METHOD_2022 else PASSWORD)
    for n in (1, 148, 1400, VETH_MTU - 28 - grow):
        payload = os.urandom(n)
        app.sendto(payload, fwd)
        packet, src = fake.recvfrom(65535)
        assert len(packet) == n + grow, (method, n)
        if method == METHOD_2022:
            got = Udp2022Server(cipher).open(packet, time.time())
            assert ((got.target.host, got.target.port), got.payload) == (ECHO, payload)
        else:
            target, data = cipher.open_udp(packet)
            assert ((target.host, target.port), data) == (ECHO, payload)
    _stop_cleanly(fwd_proc)


# ---------------------------------------------------------------- WireGuard through it


def _counters(ns: Namespace, table: str, *names: str) -> dict[str, int]:
    out = {}
    for name in names:
        text = ns.run(["nft", "list", "counter", "netdev", table, name]).stdout
        out[name] = int(re.search(r"packets (\d+)", text).group(1))
    return out


def test_wireguard_go_through_ss_local(netlab: NetLab) -> None:
    """wireguard-go in C (Endpoint = the forwarder) and in S (port 51820, reached by ss-server on
    127.0.0.1). The tunnel MTU is lowered by overhead(): a DF ping that exactly fills it leaves
    as a 1500-byte IPv4 packet on the veth, unfragmented; one byte more fragments."""
    reason = missing_requirements(("ss-server", "ss", "nft", "wireguard-go", "wg", "ping"),
                                  need_tun=True)
    if reason:
        pytest.skip(reason)
    method = "aes-256-gcm"
    c, s, veth_s = _lab(netlab)
    s.run(["nft", "-f", "-"], input=(
        "table netdev sslocal {\n"
        "  counter frags {}\n"
        "  counter full {}\n"
        "  chain in {\n"
        f"    type filter hook ingress device \"{veth_s}\" priority 0; policy accept;\n"
        "    ip frag-off & 0x3fff != 0 counter name frags\n"
        f"    ip length {VETH_MTU} udp dport {SS_PORT} counter name full\n"
        "  }\n"
        "}\n"))
    uri = _uri(method, S_ADDR)
    grow = overhead(uri, WG_TARGET)
    mtu = VETH_MTU - 28 - WG_DATA_OVERHEAD - grow  # 1385 for aes-256-gcm

    wg_s = WgInterface(netlab, s, "wireguard-go").start()
    wg_c = WgInterface(netlab, c, "wireguard-go").start()
    server = _ss_server(s, method)
    fwd_proc, fwd = _forwarder(c, uri, WG_TARGET)
    wg_s.setconf(listen_port=WG_TARGET[1], peers=[wg_c.peer_conf(["10.212.0.1/32"])])
    wg_c.setconf(listen_port=51821, peers=[wg_s.peer_conf(["10.212.0.2/32"], f"{fwd[0]}:{fwd[1]}")])
    wg_c.address("10.212.0.1/24", mtu=mtu)
    wg_s.address("10.212.0.2/24", mtu=mtu)

    r = c.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.212.0.2"], check=False, timeout=20)
    logs = lambda: fwd_proc.output()[-2000:] + server.output()[-2000:] + wg_c.log()[-2000:]
    assert r.returncode == 0, r.stdout + r.stderr + logs()
    peer = wg_c.dump()["peers"][wg_s.keys.public_b64]
    assert peer["latest_handshake"] > 0 and peer["rx"] > 0

    # the largest DF ping the lowered MTU allows: exactly a full-size packet on the wire
    r = c.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "-M", "do", "-s", str(mtu - 28),
               "10.212.0.2"], check=False, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr + logs()
    got = _counters(s, "sslocal", "frags", "full")
    assert got["frags"] == 0 and got["full"] >= 3, got

    # one byte more than the overhead allows (tunnel MTU raised by 1) must fragment outside
    c.ip("link", "set", wg_c.ifname, "mtu", str(mtu + 1))
    c.run(["ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(mtu + 1 - 28), "10.212.0.2"],
          check=False, timeout=10)
    assert _counters(s, "sslocal", "frags")["frags"] > 0
    _stop_cleanly(fwd_proc)
