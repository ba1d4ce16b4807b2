"""`python -m bridge.serve` (wgpy bridge serve) against the real shadowsocks-libev client.

    namespace "bscli"                         namespace "bssrv"
    veth 10.206.0.1/24                   <->  veth 10.206.0.2/24
    ss-tunnel -s 10.206.0.2 -l 127.0.0.1:P    python -m bridge.serve --listen ss://...@0.0.0.0:838x
              -L 127.0.0.1:7007 -U                    --allow 127.0.0.1:7007 -v
    probes: our own sockets (setns)           echo servers (threads): UDP+TCP 127.0.0.1:7007,
                                              UDP 127.0.0.1:7008 (reachable, but NOT allowed)
"""

from __future__ import annotations

import base64
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import pytest

from bridge.shadowsocks import Cipher, TcpDecryptor, TcpEncryptor, Udp2022Client

from .traffic import tcp_echo, udp_echo
from .netlab import LabProcess, Namespace, NetLab, missing_requirements

pytestmark = pytest.mark.netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
CLI_V4, SRV_V4 = "10.206.0.1", "10.206.0.2"
ECHO_PORT, FORBIDDEN_PORT = 7007, 7008
PASSWORD = "wgpy-bridge/Pa55:w0rd"  # '/' and ':' exercise both URI forms
METHODS_2017 = ("chacha20-ietf-poly1305", "aes-256-gcm", "aes-128-gcm")
PORTS = {m: 8388 + i for i, m in enumerate(METHODS_2017)}
UDP2TCP_PORT = 4443
PORT_2022 = 8395
PSK_2022 = base64.b64encode(bytes(range(100, 132))).decode()
NO_REPLY_WAIT = 0.5


def _uri(method: str, port: int, base64_form: bool) -> str:
    if base64_form:
        info = base64.urlsafe_b64encode(f"{method}:{PASSWORD}".encode()).decode().rstrip("=")
    else:
        info = f"{quote(method, safe='')}:{quote(PASSWORD, safe='')}"
    return f"ss://{info}@0.0.0.0:{port}"


@dataclass
class Lab:
    lab: NetLab
    cli: Namespace
    srv: Namespace
    server: LabProcess
    tunnels: dict[str, int]  # method -> ss-tunnel local port (to the allowed echo)
    forbidden_tunnel: int  # ss-tunnel local port whose target is not allowed


def _start_echoes(lab: NetLab, ns: Namespace) -> None:
    for addr in (("127.0.0.1", ECHO_PORT), ("127.0.0.1", FORBIDDEN_PORT)):
        udp_echo(lab, ns, addr)
    tcp_echo(lab, ns, ("127.0.0.1", ECHO_PORT))


def _wait_output(proc: LabProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.output():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen; output:\n{proc.output()}")


def _wait_udp_bound(ns: Namespace, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run(["ss", "-Hlun", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing bound to UDP port {port}")


@pytest.fixture(scope="module")
def bslab() -> Iterator[Lab]:
    reason = missing_requirements(("ip", "ss", "ss-tunnel"))
    if reason:
        pytest.skip(reason)
    lab = NetLab()
    try:
        cli, srv = lab.netns("bscli"), lab.netns("bssrv")
        lab.veth(cli, srv, addrs_a=[f"{CLI_V4}/24"], addrs_b=[f"{SRV_V4}/24"])
        _start_echoes(lab, srv)
        argv = [PYTHON, "-m", "bridge.serve", "-v"]
        for i, method in enumerate(METHODS_2017):
            argv += ["--listen", _uri(method, PORTS[method], base64_form=(i % 2 == 0))]
        argv += ["--listen", f"ss://2022-blake3-aes-256-gcm:{quote(PSK_2022, safe='')}@0.0.0.0:{PORT_2022}"]
        argv += ["--listen", f"udp2tcp://0.0.0.0:{UDP2TCP_PORT}",
                 "--allow", f"127.0.0.1:{ECHO_PORT}"]
        server = srv.popen(argv, env={"PYTHONPATH": REPO})
        _wait_output(server, "ready:")
        tunnels: dict[str, int] = {}
        for i, method in enumerate(METHODS_2017):
            local = 9100 + i
            cli.popen(["ss-tunnel", "-s", SRV_V4, "-p", str(PORTS[method]), "-k", PASSWORD,
                       "-m", method, "-b", "127.0.0.1", "-l", str(local),
                       "-L", f"127.0.0.1:{ECHO_PORT}", "-U"])
            tunnels[method] = local
        forbidden = 9200
        cli.popen(["ss-tunnel", "-s", SRV_V4, "-p", str(PORTS["aes-256-gcm"]), "-k", PASSWORD,
                   "-m", "aes-256-gcm", "-b", "127.0.0.1", "-l", str(forbidden),
                   "-L", f"127.0.0.1:{FORBIDDEN_PORT}", "-U"])
        for port in (*tunnels.values(), forbidden):
            _wait_udp_bound(cli, port)
        yield Lab(lab, cli, srv, server, tunnels, forbidden)
    finally:
        lab.close()


def _recv(sock: socket.socket, timeout: float) -> bytes | None:
    r, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(65535) if r else None


def _exchange(sock: socket.socket, dest: tuple, payload: bytes, tries: int = 3) -> bytes | None:
    for _ in range(tries):
        sock.sendto(payload, dest)
        got = _recv(sock, 1.0)
        if got is not None:
            return got
    return None


def _udp(ns: Namespace) -> socket.socket:
    s = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    return s


# ---------------------------------------------------------------- through ss-tunnel


@pytest.mark.parametrize("method", METHODS_2017)
def test_ss_tunnel_udp_echo(bslab: Lab, method: str) -> None:
    s = _udp(bslab.cli)
    local = ("127.0.0.1", bslab.tunnels[method])
    for size in (1, 100, 1300):
        payload = os.urandom(size)
        assert _exchange(s, local, payload) == payload, bslab.server.output()[-2000:]


def test_refused_target_gets_nothing(bslab: Lab) -> None:
    s = _udp(bslab.cli)
    s.sendto(b"should not arrive", ("127.0.0.1", bslab.forbidden_tunnel))
    assert _recv(s, NO_REPLY_WAIT) is None
    _wait_output(bslab.server, "target not allowed", timeout=2)
    # still fine
    ok = _udp(bslab.cli)
    assert _exchange(ok, ("127.0.0.1", bslab.tunnels["aes-256-gcm"]), b"after") == b"after"


# ---------------------------------------------------------------- probes straight at the server


def test_probes_get_no_reply(bslab: Lab) -> None:
    method = "chacha20-ietf-poly1305"
    server = (SRV_V4, PORTS[method])
    cipher = Cipher(method, PASSWORD)
    s = _udp(bslab.cli)
    echo = ("127.0.0.1", ECHO_PORT)

    # a legitimate packet of our own: answered, and the reply comes from the target
    packet = cipher.seal_udp(echo, b"legit")
    reply = _exchange(s, server, packet, tries=1)
    assert reply is not None
    source, payload = cipher.open_udp(reply)
    assert (source.host, source.port, payload) == ("127.0.0.1", ECHO_PORT, b"legit")

    probes = {
        "replayed": packet,
        "random": os.urandom(200),
        "random short": os.urandom(8),
        "truncated": cipher.seal_udp(echo, b"x" * 50)[:40],
        "one byte cut": cipher.seal_udp(echo, b"y" * 50)[:-1],
        "wrong password": Cipher(method, "not-the-password").seal_udp(echo, b"z"),
        "other method": Cipher("aes-256-gcm", PASSWORD).seal_udp(echo, b"w"),
        "forbidden target": cipher.seal_udp(("127.0.0.1", FORBIDDEN_PORT), b"v"),
        "domain target": cipher.seal_udp(("localhost", ECHO_PORT), b"u"),
        "empty": b"",
    }
    for name, probe in probes.items():
        s.sendto(probe, server)
    assert _recv(s, NO_REPLY_WAIT) is None

    # still serving, and our own socket still gets answers
    fresh = cipher.seal_udp(echo, b"after probes")
    reply = _exchange(s, server, fresh, tries=1)
    assert reply is not None and cipher.open_udp(reply)[1] == b"after probes"
    out = bslab.server.output()
    for reason in ("replay", "authentication", "malformed", "target not allowed"):
        assert f"({reason})" in out, reason
    assert PASSWORD not in out


def test_2022_udp(bslab: Lab) -> None:
    cipher = Cipher("2022-blake3-aes-256-gcm", PSK_2022)
    client = Udp2022Client(cipher)
    s = _udp(bslab.cli)
    server = (SRV_V4, PORT_2022)
    packet = client.seal(("127.0.0.1", ECHO_PORT), b"hello 2022", time.time())
    reply = _exchange(s, server, packet, tries=1)
    assert reply is not None
    source, payload = client.open(reply, time.time())
    assert (source.host, source.port, payload) == ("127.0.0.1", ECHO_PORT, b"hello 2022")
    # the same packet again (packet id replay), and a forbidden target: silence
    s.sendto(packet, server)
    s.sendto(client.seal(("127.0.0.1", FORBIDDEN_PORT), b"no", time.time()), server)
    assert _recv(s, NO_REPLY_WAIT) is None
    reply = _exchange(s, server, client.seal(("127.0.0.1", ECHO_PORT), b"again", time.time()), 1)
    assert reply is not None and client.open(reply, time.time())[1] == b"again"


# ---------------------------------------------------------------- TCP


def _tcp_connect(ns: Namespace, port: int) -> socket.socket:
    c = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(3)
    c.connect((SRV_V4, port))
    return c


def test_tcp_relay_and_probe(bslab: Lab) -> None:
    method = "aes-128-gcm"
    cipher = Cipher(method, PASSWORD)
    c = _tcp_connect(bslab.cli, PORTS[method])
    enc = TcpEncryptor(cipher, ("127.0.0.1", ECHO_PORT))
    dec = TcpDecryptor(cipher)
    data = os.urandom(20000)
    c.sendall(enc.encrypt(data))
    got = b""
    while len(got) < len(data):
        chunk = c.recv(65536)
        assert chunk, "closed early"
        got += b"".join(dec.feed(chunk))
    assert got == data
    c.close()

    # a probe: random bytes get no reply and the connection is not closed on us
    p = _tcp_connect(bslab.cli, PORTS[method])
    p.sendall(os.urandom(100))
    r, _, _ = select.select([p], [], [], NO_REPLY_WAIT)
    assert not r, "the server answered (or closed) a probe"
    p.sendall(os.urandom(1000))
    r, _, _ = select.select([p], [], [], 0.2)
    assert not r
    p.close()

    # forbidden target over TCP: the same silence
    f = _tcp_connect(bslab.cli, PORTS[method])
    f.sendall(TcpEncryptor(cipher, ("127.0.0.1", FORBIDDEN_PORT)).encrypt(b"hello"))
    r, _, _ = select.select([f], [], [], NO_REPLY_WAIT)
    assert not r
    f.close()


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("args", [
    [],
    ["--listen"],
    ["--listen", f"ss://nope-cipher:{PASSWORD}@0.0.0.0:8388"],
    ["--listen", f"ss://aes-256-gcm:{PASSWORD}@0.0.0.0:99999"],
    ["--listen", f"ss://aes-256-gcm:{PASSWORD}@0.0.0.0:8388", "--allow", "nonsense"],
    ["--listen", f"ss://aes-256-gcm:{PASSWORD}@0.0.0.0:8388", "--allow", "example.com:1"],
    ["--listen", f"http://u:{PASSWORD}@0.0.0.0:1"],
    [f"ss://aes-256-gcm:{PASSWORD}@0.0.0.0:8388"],
    ["--bogus"],
])
def test_bad_arguments(args: list[str]) -> None:
    p = subprocess.run([PYTHON, "-m", "bridge.serve", *args], capture_output=True, text=True,
                       timeout=20, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode != 0
    err = p.stderr.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in err
    assert PASSWORD not in err and quote(PASSWORD, safe="") not in err
    assert p.stdout == ""


def test_sigterm_stops_and_logs_statistics(bslab: Lab) -> None:
    """Last in the file: stops the shared server."""
    bslab.server.popen.send_signal(15)
    assert bslab.server.wait(5) == 0, bslab.server.output()[-2000:]
    out = bslab.server.output()
    assert "SIGTERM, stopping" in out
    assert "dropped:" in out and "udp in" in out
    assert "Traceback" not in out
    assert PASSWORD not in out and PSK_2022 not in out


def test_wgpy_bridge_serve_entry_point():
    """`wgpy bridge serve` is the same program as `python -m bridge.serve`."""
    wgpy = str(Path(sys.executable).with_name("wgpy"))
    r = subprocess.run([wgpy, "bridge", "serve", "--listen", "ss://chacha20-ietf-poly1305:pw-secret@0.0.0.0:99999"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "pw-secret" not in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([wgpy, "bridge"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "wgpy bridge serve" in r.stderr
