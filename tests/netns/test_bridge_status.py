"""`wgpy show` on a bridged peer with a wrong Shadowsocks password (issue 12, item 14): the server
takes the packets and stays silent, so the bridge says "no reply yet", never "connected"; with
the right password it becomes "connected" once replies authenticate."""

from __future__ import annotations

import pytest

from .netlab import missing_requirements
from .traffic import wait_for_ping
from .test_bridge_daemon import WGPY, _ping, _wait_listening
from .wg_peers import WgInterface

pytestmark = pytest.mark.netns


def _show(ns, ifname: str) -> str:
    return ns.run([WGPY, "show", ifname]).stdout


def test_wrong_password_is_no_reply_yet(netlab):
    reason = missing_requirements(("wg", "ss-server", "wireguard-go", "ping"), need_tun=True)
    if reason:
        pytest.skip(reason)
    c, s = netlab.netns("bsc"), netlab.netns("bss")
    netlab.veth(c, s, addrs_a=["10.233.0.2/24"], addrs_b=["10.233.0.1/24"])
    s.popen(["ss-server", "-s", "0.0.0.0", "-p", "8388", "-k", "right-pw", "-m", "aes-256-gcm", "-U"])
    _wait_listening(s, 8388, "u")
    relay = WgInterface(netlab, s, "wireguard-go").start()
    client = WgInterface(netlab, c, "wgpy").start()
    relay.setconf(listen_port=51820, peers=[client.peer_conf(["10.234.0.2/32"])])
    relay.address("10.234.0.1/24")
    client.setconf(listen_port=0, peers=[relay.peer_conf(["10.234.0.1/32"], "127.0.0.1:51820")])
    client.address("10.234.0.2/24")
    key = relay.keys.public_b64

    c.run([WGPY, "set", client.ifname, "peer", key, "bridge", "ss://aes-256-gcm:wrong-pw@10.233.0.1:8388"])
    assert _ping(c, "10.234.0.1", count=2).returncode != 0
    show = _show(c, client.ifname)
    assert "bridge: ss://aes-256-gcm@10.233.0.1:8388, no reply yet;" in show, show
    assert "connected;" not in show and "latest bridge reply" not in show, show
    assert "wrong-pw" not in show

    c.run([WGPY, "set", client.ifname, "peer", key, "bridge", "ss://aes-256-gcm:right-pw@10.233.0.1:8388"])
    # the next initiation may wait for the retry timer (one per 5 s)
    assert wait_for_ping(c, "10.234.0.1", timeout=15) is not None, client.log()
    show = _show(c, client.ifname)
    assert "bridge: ss://aes-256-gcm@10.233.0.1:8388, connected;" in show, show
    assert "latest bridge reply:" in show, show
