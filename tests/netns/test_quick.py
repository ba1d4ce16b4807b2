"""`wgpy up` / `wgpy down` in network namespaces: host state restored exactly, full tunnels that do
not loop, config errors that apply nothing, and `make demo`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .netlab import Namespace, NetLab, missing_requirements, unique_ifname
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
WGPY = str(Path(sys.executable).with_name("wgpy"))


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("wg", "ping", "nft"), need_tun=True)
    if reason:
        pytest.skip(reason)


def wgpy(ns: Namespace, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    r = ns.run([WGPY, *args], check=False, timeout=60)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def isolated_resolv_conf(lab: NetLab, ns: Namespace, content: str) -> str:
    """`ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf: the test's
    DNS changes stay inside its namespace."""
    d = f"/etc/netns/{ns.name}"
    os.makedirs(d, exist_ok=True)
    path = f"{d}/resolv.conf"
    with open(path, "w") as f:
        f.write(content)

    def cleanup():
        for p in (path,):
            if os.path.exists(p):
                os.unlink(p)
        if os.path.isdir(d):
            os.rmdir(d)

    lab.defer(cleanup)
    return path


def snapshot(ns: Namespace) -> dict[str, str]:
    """Everything `up` may touch in a namespace (after IPv6 duplicate address detection settled,
    so the kernel's own progress is not mistaken for a change)."""
    import time

    deadline = time.monotonic() + 5
    while ns.run(["ip", "-6", "addr", "show", "tentative"], check=False).stdout.strip():
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cmds = {
        "addr": ["ip", "addr"],
        "route4": ["ip", "-4", "route", "show", "table", "all"],
        "route6": ["ip", "-6", "route", "show", "table", "all"],
        "rule4": ["ip", "-4", "rule"],
        "rule6": ["ip", "-6", "rule"],
        "resolv": ["cat", "/etc/resolv.conf"],
        "nft": ["nft", "list", "ruleset"],
        "src_valid_mark": ["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"],
        "links": ["ip", "-brief", "link"],
    }
    return {k: ns.run(v, check=False).stdout for k, v in cmds.items()}


def write_conf(lab: NetLab, ifname: str, text: str, mode: int = 0o600, directory: str | None = None) -> str:
    path = os.path.join(directory or lab.tmpdir, f"{ifname}.conf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    ifn = ifname
    lab.defer(lambda: subprocess.run(["pkill", "-f", f"wgpy-daemon {ifn}$"], capture_output=True))
    lab.defer(lambda: os.path.exists(f"/run/wgpy/{ifn}.json") and os.unlink(f"/run/wgpy/{ifn}.json"))
    return path


def two_hosts(lab: NetLab):
    a, b = lab.netns("qa"), lab.netns("qb")
    lab.veth(a, b, addrs_a=["10.210.0.1/24", "fd10::1/64"], addrs_b=["10.210.0.2/24", "fd10::2/64"])
    return a, b


def test_up_down_restores_everything(netlab):
    a, b = two_hosts(netlab)
    resolv = "nameserver 192.0.2.53\nsearch example.org\n"
    isolated_resolv_conf(netlab, a, resolv)
    peer = WgInterface(netlab, b, "wireguard-go").start()
    ka = Keys()
    ifname = unique_ifname("wgq")
    peer.setconf(listen_port=51821, peers=[PeerConf(ka.public_b64, ["10.211.0.1/32", "fd11::1/128"])])
    peer.address("10.211.0.2/24", "fd11::2/64")
    path = write_conf(netlab, ifname, f"""
[Interface]
PrivateKey = {ka.private_b64}
ListenPort = 51820
Address = 10.211.0.1/24
Address = fd11::1/64
DNS = 10.211.0.53, fd11::53, tunnel.example
MTU = 1380

[Peer]
PublicKey = {peer.keys.public_b64}
AllowedIPs = 10.211.0.2/32, fd11::2/128, 10.99.0.0/16
Endpoint = 10.210.0.2:51821
PersistentKeepalive = 25
""")
    before = snapshot(a)
    wgpy(a, "up", path, check=True)
    during = snapshot(a)
    assert ifname in during["links"]
    assert "10.211.0.1/24" in during["addr"] and "fd11::1/64" in during["addr"]
    assert "mtu 1380" in a.run(["ip", "link", "show", ifname]).stdout
    assert "10.99.0.0/16 dev " + ifname in during["route4"]
    assert "nameserver 10.211.0.53" in during["resolv"] and "search tunnel.example" in during["resolv"]
    r = a.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.211.0.2"], check=False)
    assert r.returncode == 0, r.stdout + peer.log()
    show = wgpy(a, "show", ifname, check=True).stdout
    assert f"peer: {peer.keys.public_b64}" in show and "latest handshake:" in show
    js = wgpy(a, "show", ifname, "--json", check=True).stdout
    assert '"listen_port": 51820' in js
    # up again on the same interface: refused, nothing changed
    again = wgpy(a, "up", path)
    assert again.returncode == 1 and "already exists" in again.stderr
    wgpy(a, "down", path, check=True)
    after = snapshot(a)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")


def test_failed_post_up_undoes_everything(netlab):
    a, b = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgq")
    marker = os.path.join(netlab.tmpdir, "preup-ran")
    path = write_conf(netlab, ifname, f"""
[Interface]
PrivateKey = {Keys().private_b64}
Address = 10.212.0.1/24
DNS = 10.212.0.53
PreUp = touch {marker}
PostUp = ip link show %i > /dev/null && exit 1

[Peer]
PublicKey = {Keys().public_b64}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 10.210.0.2:51821
""")
    before = snapshot(a)
    r = wgpy(a, "up", path)
    assert r.returncode == 1 and "PostUp" in r.stderr, r.stderr
    assert os.path.exists(marker)
    after = snapshot(a)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not os.path.exists(f"/run/wgpy/{ifname}.json")


def test_full_tunnel_reaches_host_behind_server_without_looping(netlab):
    """Client (0.0.0.0/0, ::/0) -> server -> a host behind it. The client's route to the server's
    endpoint is its default route: only fwmark policy routing keeps the encrypted packets out of
    the tunnel."""
    c, s, h = netlab.netns("cli"), netlab.netns("srv"), netlab.netns("host")
    netlab.veth(c, s, addrs_a=["10.213.0.2/24"], addrs_b=["10.213.0.1/24"])
    netlab.veth(s, h, addrs_a=["192.168.213.1/24", "fd13:1::1/64"], addrs_b=["192.168.213.2/24", "fd13:1::2/64"])
    s.ip("addr", "add", "10.214.0.1/32", "dev", "lo")  # the endpoint: reachable only via c's default route
    c.ip("route", "add", "default", "via", "10.213.0.1")
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        s.run(["sysctl", "-q", "-w", key])
    h.ip("route", "add", "10.215.0.0/24", "via", "192.168.213.1")
    h.ip("-6", "route", "add", "fd15::/64", "via", "fd13:1::1")
    isolated_resolv_conf(netlab, c, "nameserver 192.0.2.53\n")
    kc, ks = Keys(), Keys()
    c_if, s_if = unique_ifname("wgc"), unique_ifname("wgs")
    s_path = write_conf(netlab, s_if, f"""
[Interface]
PrivateKey = {ks.private_b64}
ListenPort = 51820
Address = 10.215.0.1/24, fd15::1/64

[Peer]
PublicKey = {kc.public_b64}
AllowedIPs = 10.215.0.2/32, fd15::2/128
""")
    c_path = write_conf(netlab, c_if, f"""
[Interface]
PrivateKey = {kc.private_b64}
Address = 10.215.0.2/24, fd15::2/64

[Peer]
PublicKey = {ks.public_b64}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 10.214.0.1:51820
""")
    before = snapshot(c)
    wgpy(s, "up", s_path, check=True)
    wgpy(c, "up", c_path, check=True)
    rules = c.run(["ip", "rule"]).stdout
    assert "suppress_prefixlength 0" in rules and "not from all fwmark" in rules
    for target in ("192.168.213.2", "fd13:1::2"):
        r = c.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", target], check=False)
        assert r.returncode == 0, f"{target}: {r.stdout}{r.stderr}\n" + c.run(["ip", "rule"]).stdout
    # the host saw the tunnel address, not the underlay: the packets went through the tunnel
    got = h.run(["ip", "neigh"]).stdout
    assert "192.168.213.1" in got
    route = c.run(["ip", "route", "get", "192.168.213.2"]).stdout
    assert f"dev {c_if}" in route
    route_mark = c.run(["ip", "route", "get", "10.214.0.1", "mark",
                        str(int(wgpy(c, "show", c_if, "--json", check=True).stdout.split('"fwmark": ')[1].split(",")[0]))]).stdout
    assert "dev " + c_if not in route_mark  # marked (encrypted) packets leave by the underlay
    wgpy(c, "down", c_path, check=True)
    wgpy(s, "down", s_path, check=True)
    after = snapshot(c)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


BAD_CONFIGS = [
    ("unknown key", "[Interface]\nPrivateKey = {k}\nListenPrt = 1\n", 3),
    ("bad key encoding", "[Interface]\nPrivateKey = notbase64\n", 2),
    ("bad CIDR", "[Interface]\nPrivateKey = {k}\nAddress = 10.0.0.300/24\n", 3),
    ("port out of range", "[Interface]\nPrivateKey = {k}\nListenPort = 70000\n", 3),
    ("duplicate peer", "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nAllowedIPs = 10.0.0.2/32\n"
                       "[Peer]\nPublicKey = {p}\nAllowedIPs = 10.0.0.3/32\n", 7),
    ("missing PrivateKey", "[Interface]\nListenPort = 51820\n", None),
    ("bad endpoint", "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nEndpoint = 10.0.0.1\n", 5),
    ("bad peer CIDR", "[Interface]\nPrivateKey = {k}\n[Peer]\nPublicKey = {p}\nAllowedIPs = 10.0.0.0/33\n", 5),
]


@pytest.mark.parametrize("what,text,line", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_config_errors_apply_nothing(netlab, what, text, line):
    a = netlab.netns("bad")
    ifname = unique_ifname("wgbad")
    k = Keys()
    path = write_conf(netlab, ifname, text.format(k=k.private_b64, p=Keys().public_b64))
    before = snapshot(a)
    r = wgpy(a, "up", path)
    assert r.returncode == 1, r.stdout + r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert first.startswith(f"{path}:"), r.stderr
    if line is not None:
        assert first.startswith(f"{path}:{line}:"), r.stderr
    assert "Traceback" not in r.stderr and k.private_b64 not in r.stderr
    assert snapshot(a) == before
    assert not os.path.exists(f"/run/wgpy/{ifname}.json")
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")


def test_world_readable_config_warns(netlab):
    a = netlab.netns("warn")
    ifname = unique_ifname("wgw")
    # wg-quick warns when both the file and its directory are open to others
    shared = os.path.join(netlab.tmpdir, "shared")
    os.mkdir(shared, 0o755)
    os.chmod(shared, 0o755)
    path = write_conf(netlab, ifname, f"[Interface]\nPrivateKey = {Keys().private_b64}\nAddress = 10.216.0.1/24\n",
                      mode=0o644, directory=shared)
    r = wgpy(a, "up", path, check=True)
    assert "world accessible" in r.stderr
    wgpy(a, "down", path, check=True)


def test_make_demo_runs():
    """`make demo`'s program, as a new user would run it (the Makefile only adds the venv)."""
    r = subprocess.run([sys.executable, "-m", "tunnel.demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0% packet loss" in r.stdout and "latest handshake" in r.stdout
    assert "wgpydemo" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_save_config_writes_running_state_back(netlab):
    a, b = two_hosts(netlab)
    peer = WgInterface(netlab, b, "wireguard-go").start()
    ka = Keys()
    ifname = unique_ifname("wgsv")
    peer.setconf(listen_port=51821, peers=[PeerConf(ka.public_b64, ["10.217.0.1/32"], "10.210.0.1:51820")])
    peer.address("10.217.0.2/24")
    path = write_conf(netlab, ifname, f"""
[Interface]
PrivateKey = {ka.private_b64}
ListenPort = 51820
Address = 10.217.0.1/24
PostUp = true
SaveConfig = true

[Peer]
PublicKey = {peer.keys.public_b64}
AllowedIPs = 10.217.0.2/32
""")
    wgpy(a, "up", path, check=True)
    # while up: a new address, a new allowed ip, and the peer's endpoint learned from its handshake
    a.ip("address", "add", "10.218.0.1/24", "dev", ifname)
    a.run(["wg", "set", ifname, "peer", peer.keys.public_b64, "allowed-ips", "10.217.0.2/32,10.219.0.0/24"])
    r = b.run(["ping", "-c", "1", "-W", "3", "10.217.0.1"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    wgpy(a, "down", path, check=True)
    from tunnel.config import load_config

    saved, _ = load_config(path)
    assert [str(x) for x in saved.interface.addresses] == ["10.217.0.1/24", "10.218.0.1/24"]
    assert saved.interface.post_up == ["true"] and saved.interface.save_config
    assert saved.interface.private_key == ka.private and saved.interface.listen_port == 51820
    (p,) = saved.peers
    assert sorted(str(n) for n in p.allowed_ips) == ["10.217.0.2/32", "10.219.0.0/24"]
    assert p.endpoint == ("10.210.0.2", 51821)
    assert os.stat(path).st_mode & 0o777 == 0o600
