"""Fault tests of `wgpy bridge serve` (issue 12): a low RLIMIT_NOFILE under a flood, in a namespace
of the test's own (only its loopback is used). Probe timing and slowloris are tested with a driven
clock in tests/unit/test_hardening_bridge.py."""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import pytest

from bridge.shadowsocks import Cipher

from .netlab import NetLab, missing_requirements
from .traffic import udp_echo

pytestmark = pytest.mark.netns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSWORD = "faults-test"
SS_PORT, U2T_PORT, ECHO_PORT = 8388, 4443, 7007
NOFILE = 64


def _wait_output(proc, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.output():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen; output:\n{proc.output()}")


def test_low_fd_limit_and_a_flood_leave_the_server_serving(netlab: NetLab):
    reason = missing_requirements(("ip", "prlimit"))
    if reason:
        pytest.skip(reason)
    ns = netlab.netns("bfault")
    ns.ip("link", "set", "lo", "up")
    udp_echo(netlab, ns, ("127.0.0.1", ECHO_PORT))
    env = {"PYTHONPATH": REPO, "WGPY_SS_PASSWORD": PASSWORD}
    server = ns.popen(["prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m",
                       "bridge.serve", "--listen", f"ss://aes-256-gcm@127.0.0.1:{SS_PORT}",
                       "--listen", f"udp2tcp://127.0.0.1:{U2T_PORT}",
                       "--allow", f"127.0.0.1:{ECHO_PORT}"], env=env)
    _wait_output(server, "ready:")
    cipher = Cipher("aes-256-gcm", PASSWORD)
    target = ("127.0.0.1", ECHO_PORT)
    # Flood: 300 authentic UDP sessions (each wants a descriptor), 100 TCP probes held open and
    # 50 udp2tcp connections, far more than 64 descriptors.
    floods = []
    for i in range(300):
        s = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(cipher.seal_udp(target, b"flood"), ("127.0.0.1", SS_PORT))
        floods.append(s)
    for port in [SS_PORT] * 100 + [U2T_PORT] * 50:
        s = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        floods.append(s)
    for s in floods[300:]:
        try:
            s.send(os.urandom(40))
        except OSError:
            pass
    time.sleep(1.0)
    assert server.poll() is None, server.output()
    legit = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    legit.bind(("127.0.0.1", 0))
    got = None
    for _ in range(10):
        legit.sendto(cipher.seal_udp(target, b"legit"), ("127.0.0.1", SS_PORT))
        if select.select([legit], [], [], 0.5)[0]:
            got = cipher.open_udp(legit.recv(65535))[1]
            break
    assert got == b"legit", server.output()  # udp_echo echoes the payload as is
    assert server.poll() is None, server.output()
    for s in floods:
        s.close()
    server.stop()
    out = server.output()
    assert "Traceback" not in out, out
    assert "open-file limit 64" in out, out
