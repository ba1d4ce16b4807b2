"""Bridges on a bare wgpy-daemon: configured by `wg`, bridged by `wgpy set IFNAME peer K bridge URI`
(also from a wg-quick PostUp), carried inside the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .netlab import missing_requirements, unique_ifname
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
WGPY = str(Path(sys.executable).with_name("wgpy"))
WGPY_DAEMON = str(Path(sys.executable).with_name("wgpy-daemon"))


def _wait_listening(ns, port: int, proto: str) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in ns.run(["ss", f"-Hl{proto}n"]).stdout:
        assert time.monotonic() < deadline, f"nothing listening on {port}"
        time.sleep(0.05)


def _ping(ns, dst: str, count: int = 3):
    return ns.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dst], check=False, timeout=30)


def _mtu(ns, ifname: str) -> int:
    return int(ns.run(["cat", f"/sys/class/net/{ifname}/mtu"]).stdout)


def test_wgpy_set_bridges_a_daemon_configured_by_wg(netlab):
    """wg setconf configures the daemon; `wgpy set ... bridge ss://` sends it through
    shadowsocks-libev's ss-server to wireguard-go, and nothing else leaves the client."""
    reason = missing_requirements(("wg", "ss-server", "wireguard-go", "ping", "nft"), need_tun=True)
    if reason:
        pytest.skip(reason)
    c, s = netlab.netns("dbc"), netlab.netns("dbs")
    netlab.veth(c, s, addrs_a=["10.230.0.2/24"], addrs_b=["10.230.0.1/24"])
    s.popen(["ss-server", "-s", "0.0.0.0", "-p", "8388", "-k", "daemon-pw", "-m", "aes-256-gcm", "-U"])
    _wait_listening(s, 8388, "u")
    relay = WgInterface(netlab, s, "wireguard-go").start()
    client = WgInterface(netlab, c, "wgpy").start()
    relay.setconf(listen_port=51820, peers=[client.peer_conf(["10.231.0.2/32"])])
    relay.address("10.231.0.1/24")
    client.setconf(listen_port=0, peers=[relay.peer_conf(["10.231.0.1/32"], "127.0.0.1:51820")])
    client.address("10.231.0.2/24")
    # Every UDP datagram the client sends that is not for the bridge server is counted.
    c.run(["nft", "-f", "-"], input="""table inet leak {
  chain out { type filter hook output priority 0; meta l4proto udp udp dport != 8388 oifname != "lo" counter; }
}
""")

    r = c.run([WGPY, "set", client.ifname, "peer", relay.keys.public_b64, "bridge",
               "ss://aes-256-gcm:daemon-pw@10.230.0.1:8388"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr + client.log()
    assert _mtu(c, client.ifname) == 1500 - 80 - 55, r.stderr  # lowered to fit the bridge
    assert "MTU lowered from 1420 to 1365" in r.stderr

    ping = _ping(c, "10.231.0.1")
    assert ping.returncode == 0, ping.stdout + ping.stderr + client.log() + relay.log()
    leak = c.run(["nft", "list", "table", "inet", "leak"]).stdout
    assert "counter packets 0 " in leak, leak

    # `wg` keeps working, and sees the endpoint as the bridge server sees it.
    assert client.dump()["peers"][relay.keys.public_b64]["endpoint"] == "127.0.0.1:51820"
    show = c.run([WGPY, "show", client.ifname]).stdout
    assert "bridge: ss://aes-256-gcm@10.230.0.1:8388, connected;" in show, show
    assert "daemon-pw" not in show

    # `wg set ... endpoint` on a bridged peer changes where the bridge server sends; the
    # datagrams still go through the bridge.
    client.wg("set", client.ifname, "peer", relay.keys.public_b64, "endpoint", "127.0.0.1:51820")
    client.wg("set", client.ifname, "peer", relay.keys.public_b64, "persistent-keepalive", "1")
    time.sleep(1.5)
    assert _ping(c, "10.231.0.1").returncode == 0
    assert "counter packets 0 " in c.run(["nft", "list", "table", "inet", "leak"]).stdout

    # `wg syncconf` keeps the bridge (the peer stays); `wg setconf` replaces everything, bridges too.
    conf = os.path.join(netlab.tmpdir, f"{client.ifname}.conf")
    client.wg("syncconf", client.ifname, conf)
    assert "bridge: ss://aes-256-gcm@10.230.0.1:8388" in c.run([WGPY, "show", client.ifname]).stdout
    assert _ping(c, "10.231.0.1", count=1).returncode == 0
    client.wg("setconf", client.ifname, conf)
    assert "bridge:" not in c.run([WGPY, "show", client.ifname]).stdout
    # This time from a file, as `wg set ... preshared-key FILE`: no password in the process list.
    uri_file = os.path.join(netlab.tmpdir, "bridge.uri")
    fd = os.open(uri_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("ss://aes-256-gcm:daemon-pw@10.230.0.1:8388\n")
    r = c.run([WGPY, "set", client.ifname, "peer", relay.keys.public_b64, "bridge", uri_file], check=False)
    assert r.returncode == 0 and "MTU" not in r.stderr, r.stderr  # already low enough
    assert _ping(c, "10.231.0.1").returncode == 0

    # `bridge off`: the peer is sent to directly again (127.0.0.1:51820 on the client itself,
    # where nothing listens: the relay becomes unreachable, which is the proof).
    r = c.run([WGPY, "set", client.ifname, "peer", relay.keys.public_b64, "bridge", "off"], check=False)
    assert r.returncode == 0, r.stderr
    assert "bridge:" not in c.run([WGPY, "show", client.ifname]).stdout
    relay.wg("set", relay.ifname, "peer", client.keys.public_b64, "remove")  # no session to reuse
    relay.setconf(listen_port=51820, peers=[client.peer_conf(["10.231.0.2/32"])])
    assert _ping(c, "10.231.0.1", count=2).returncode != 0


def test_wgpy_set_errors(netlab):
    reason = missing_requirements(("wg",), need_tun=True)
    if reason:
        pytest.skip(reason)
    c = netlab.netns("dbe")
    client = WgInterface(netlab, c, "wgpy").start()
    other, no_endpoint = Keys(), Keys()
    client.setconf(listen_port=0, peers=[PeerConf(other.public_b64, ["10.232.0.1/32"], "127.0.0.1:51820"),
                                         PeerConf(no_endpoint.public_b64, ["10.232.0.2/32"])])
    stranger = Keys().public_b64

    def wgpy_set(*words: str) -> subprocess.CompletedProcess:
        return c.run([WGPY, "set", client.ifname, *words], check=False)

    r = wgpy_set("peer", stranger, "bridge", "udp2tcp://127.0.0.1:443")
    assert r.returncode == 1 and f"has no peer {stranger}" in r.stderr, r.stderr
    r = wgpy_set("peer", other.public_b64, "bridge", "ss://aes-256-gcm:topsecret@no-such-host.invalid:8388")
    assert r.returncode == 1 and "cannot resolve" in r.stderr and "topsecret" not in r.stderr, r.stderr
    r = wgpy_set("peer", other.public_b64, "bridge", "ss://rot13:topsecret@127.0.0.1:8388")
    assert r.returncode == 1 and "topsecret" not in r.stderr, r.stderr
    r = wgpy_set("peer", other.public_b64, "endpoint", "127.0.0.1:1")
    assert r.returncode == 1 and "usage: wgpy set" in r.stderr, r.stderr
    r = wgpy_set("peer", "ss://aes-256-gcm:topsecret@127.0.0.1:8388", "bridge", other.public_b64)
    assert r.returncode == 1 and "not a base64 WireGuard public key" in r.stderr, r.stderr
    assert "topsecret" not in r.stderr
    r = wgpy_set("peer", other.public_b64, "bridge", "/nonexistent/bridge.uri")
    assert r.returncode == 1 and "neither a URI nor a readable file" in r.stderr, r.stderr
    # nothing changed, and the daemon still answers
    assert "bridge:" not in c.run([WGPY, "show", client.ifname]).stdout
    # udp2tcp on a peer without an endpoint: `wg` shows the server as its endpoint while bridged,
    # and no endpoint again afterwards (never the server's address as a plain UDP endpoint).
    assert wgpy_set("peer", no_endpoint.public_b64, "bridge", "udp2tcp://127.0.0.1:443").returncode == 0
    assert client.dump()["peers"][no_endpoint.public_b64]["endpoint"] == "127.0.0.1:443"
    assert wgpy_set("peer", no_endpoint.public_b64, "bridge", "off").returncode == 0
    assert client.dump()["peers"][no_endpoint.public_b64]["endpoint"] is None
    # A wireguard-go interface has no bridges: the refusal says so.
    go = WgInterface(netlab, c, "wireguard-go").start()
    go.setconf(listen_port=0, peers=[PeerConf(other.public_b64, ["10.232.0.1/32"], "127.0.0.1:51820")])
    r = c.run([WGPY, "set", go.ifname, "peer", other.public_b64, "bridge", "udp2tcp://127.0.0.1:443"],
              check=False)
    assert r.returncode == 1 and "wireguard-go has neither" in r.stderr, r.stderr
    # ... and `wgpy show` still shows it (it falls back to the standard get).
    assert f"peer: {other.public_b64}" in c.run([WGPY, "show", go.ifname]).stdout


def test_wg_quick_postup_bridges_through_a_firewall_that_drops_udp(netlab):
    """wg-quick with WG_QUICK_USERSPACE_IMPLEMENTATION=wgpy-daemon and PostUp = wgpy set ... bridge
    udp2tcp://: the tunnel works although every UDP packet towards the server is dropped."""
    reason = missing_requirements(("wg", "wg-quick", "ping", "nft"), need_tun=True)
    if reason:
        pytest.skip(reason)
    c, s = netlab.netns("dqc"), netlab.netns("dqs")
    _, veth_s = netlab.veth(c, s, addrs_a=["10.233.0.2/24"], addrs_b=["10.233.0.1/24"])
    s.run(["nft", "-f", "-"], input=f"""table inet censor {{
  chain in {{ type filter hook input priority 0; iifname "{veth_s}" meta l4proto udp counter drop; }}
}}
""")
    c.run(["bash", "-c", "echo probe > /dev/udp/10.233.0.1/51820"], check=False)
    assert "counter packets 1 " in s.run(["nft", "list", "table", "inet", "censor"]).stdout
    s.popen([WGPY, "bridge", "serve", "--listen", "udp2tcp://0.0.0.0:443", "--allow", "127.0.0.1:51820"])
    _wait_listening(s, 443, "t")
    server = WgInterface(netlab, s, "wgpy").start()
    kc = Keys()
    server.setconf(listen_port=51820, peers=[PeerConf(kc.public_b64, ["10.234.0.2/32"])])
    server.address("10.234.0.1/24")

    ifname = unique_ifname("wgdq")
    path = os.path.join(netlab.tmpdir, f"{ifname}.conf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"""[Interface]
PrivateKey = {kc.private_b64}
Address = 10.234.0.2/24
PostUp = {WGPY} set %i peer {server.keys.public_b64} bridge udp2tcp://10.233.0.1:443

[Peer]
PublicKey = {server.keys.public_b64}
AllowedIPs = 10.234.0.1/32
Endpoint = 127.0.0.1:51820
""")
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": WGPY_DAEMON}

    def wg_quick(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(c.exec_argv(["wg-quick", action, path]), env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=30)

    up = wg_quick("up")
    netlab.defer(lambda: c.link_exists(ifname) and wg_quick("down"))
    assert up.returncode == 0, up.stdout + up.stderr
    # wg-quick took the MTU of the route to 127.0.0.1 (loopback); wgpy set brought it back.
    assert "MTU lowered from 65456 to 1420" in up.stderr, up.stderr
    assert _mtu(c, ifname) == 1420, up.stderr
    ping = _ping(c, "10.234.0.1")
    assert ping.returncode == 0, ping.stdout + ping.stderr + up.stderr + server.log()
    show = c.run(["wg", "show", ifname])
    assert show.returncode == 0 and "latest handshake" in show.stdout, show.stdout + show.stderr
    down = wg_quick("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not c.link_exists(ifname)
