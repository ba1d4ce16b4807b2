"""Issue 12, defect 7, with a real wgpy-daemon driven by `wg`: an interface whose port was chosen
at random (no ListenPort) accepts `wg set IF listen-port <that port>` and
`wg syncconf IF <(wg showconf IF)` (both failed with EADDRINUSE); a busy port fails cleanly and
the interface keeps its port; a new port releases the old one. Traffic flows throughout."""

from __future__ import annotations

import os
import socket

import pytest

from .netlab import missing_requirements
from .wg_peers import WGPY_DAEMON, WgInterface

pytestmark = pytest.mark.netns

A_OUT, B_OUT = "10.205.0.1", "10.205.0.2"
A_IN, B_IN = "10.206.0.1", "10.206.0.2"
B_PORT = 51820


def _ping(ns, dst: str) -> None:
    r = ns.run(["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", dst], check=False, timeout=15)
    assert r.returncode == 0, f"ping {dst} failed:\n{r.stdout}{r.stderr}"


def test_listen_port_random_then_set_syncconf_and_rebind(netlab):
    reason = missing_requirements(("ip", "wg", "ping"), need_tun=True)
    if reason:
        pytest.skip(reason)
    if not os.access(WGPY_DAEMON, os.X_OK):
        pytest.skip(f"{WGPY_DAEMON} not installed (make venv)")
    lab = netlab
    a_ns, b_ns = lab.netns("lpa"), lab.netns("lpb")
    lab.veth(a_ns, b_ns, addrs_a=[f"{A_OUT}/24"], addrs_b=[f"{B_OUT}/24"])

    a = WgInterface(lab, a_ns, "wgpy").start()
    b = WgInterface(lab, b_ns, "wgpy").start()
    b.setconf(listen_port=B_PORT, peers=[a.peer_conf([f"{A_IN}/32"])])
    b.address(f"{B_IN}/24")

    key_path = os.path.join(lab.tmpdir, "a.key")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(a.keys.private_b64 + "\n")
    a.wg("set", a.ifname, "private-key", key_path, "peer", b.keys.public_b64,
         "allowed-ips", f"{B_IN}/32", "endpoint", f"{B_OUT}:{B_PORT}")
    a.address(f"{A_IN}/24")
    port = a.dump()["listen_port"]
    assert port, "no random port bound at start"
    _ping(a_ns, B_IN)

    # The port it has, by hand and through syncconf: no change, no error.
    r = a.wg("set", a.ifname, "listen-port", str(port), check=False)
    assert r.returncode == 0, f"wg set listen-port {port}: {r.stderr}\n{a.log()}"
    showconf = a.wg("showconf", a.ifname).stdout
    assert f"ListenPort = {port}" in showconf
    conf_path = os.path.join(lab.tmpdir, "a.conf")
    fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(showconf)
    r = a.wg("syncconf", a.ifname, conf_path, check=False)
    assert r.returncode == 0, f"wg syncconf: {r.stderr}\n{a.log()}"
    assert a.dump()["listen_port"] == port
    _ping(a_ns, B_IN)

    # A port another socket holds: refused, and the interface keeps its port (and traffic).
    busy = a_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("0.0.0.0", 0))
    r = a.wg("set", a.ifname, "listen-port", str(busy.getsockname()[1]), check=False)
    assert r.returncode != 0, "wg set listen-port <busy port> succeeded"
    assert a.dump()["listen_port"] == port
    _ping(a_ns, B_IN)

    # A free port: moved there, the old one is released, and b follows (roaming).
    probe = a_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("0.0.0.0", 0))
    new_port = probe.getsockname()[1]
    probe.close()
    r = a.wg("set", a.ifname, "listen-port", str(new_port), check=False)
    assert r.returncode == 0, f"wg set listen-port {new_port}: {r.stderr}\n{a.log()}"
    assert a.dump()["listen_port"] == new_port
    old = a_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    old.bind(("0.0.0.0", port))  # free again
    old.close()
    _ping(a_ns, B_IN)
    assert b.dump()["peers"][a.keys.public_b64]["endpoint"] == f"{A_OUT}:{new_port}"
