"""What a killed daemon, a signal, a typo, a missing privilege or a second network namespace does
to `wgpy up` / `wgpy down` (issue 12: host and CLI). Every test leaves the host as it found it:
namespaces from tests/netns/netlab.py, interface names unique to the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .netlab import Namespace, NetLab, missing_requirements, unique_ifname
from .test_quick import isolated_resolv_conf, snapshot, two_hosts, wgpy, write_conf
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
BIN = Path(sys.executable).parent
WGPY = str(BIN / "wgpy")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("wg", "ping", "nft", "setpriv"), need_tun=True)
    if reason:
        pytest.skip(reason)


def diff(before: dict, after: dict) -> dict:
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def client_conf(lab: NetLab, ifname: str, extra: str = "", dns: bool = True) -> str:
    """A client with an address, DNS, a route and a full tunnel's rules and nftables table:
    everything `down` has to undo."""
    return write_conf(lab, ifname, f"""
[Interface]
PrivateKey = {Keys().private_b64}
Address = 10.221.0.1/24
{"DNS = 10.221.0.53" if dns else ""}
{extra}

[Peer]
PublicKey = {Keys().public_b64}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 10.210.0.2:51821
""")


def daemon_pids(ns: Namespace, ifname: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wgpy-daemon") for a in argv) and ifname.encode() in argv:
            pids.append(int(pid))
    return pids


def kill_daemon(ns: Namespace, ifname: str) -> None:
    pids = daemon_pids(ns, ifname)
    assert pids, f"no wgpy-daemon for {ifname} in {ns.name}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while ns.link_exists(ifname) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ns.link_exists(ifname)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- 1: down acts on its own only

@pytest.mark.parametrize("kind", ["veth", "bridge"])
def test_down_refuses_a_link_wgpy_did_not_bring_up(netlab, kind):
    a = netlab.netns("dn")
    ifname = unique_ifname("wgv")
    if kind == "veth":
        a.ip("link", "add", ifname, "type", "veth", "peer", "name", unique_ifname("vp"))
    else:
        a.ip("link", "add", ifname, "type", "bridge")
    before = snapshot(a)
    r = wgpy(a, "down", ifname)
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "not a WireGuard interface brought up by wgpy" in line and kind in line, line
    assert a.link_exists(ifname)
    assert snapshot(a) == before


# ---------------------------------------------------------------- 2: a daemon killed with SIGKILL

def test_down_after_daemon_killed_restores_host_and_frees_the_name(netlab):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgk")
    path = client_conf(netlab, ifname)
    sock = f"/var/run/wireguard/{ifname}.sock"
    before = snapshot(a)
    wgpy(a, "up", path, check=True)
    kill_daemon(a, ifname)
    assert os.path.exists(sock)  # what a killed daemon leaves behind
    r = wgpy(a, "down", path)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(sock)
    assert snapshot(a) == before, diff(before, snapshot(a))
    wgpy(a, "up", path, check=True)  # the name is usable again
    wgpy(a, "down", path, check=True)
    assert snapshot(a) == before, diff(before, snapshot(a))


def test_up_after_daemon_killed_replaces_the_stale_socket(netlab):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgk")
    path = client_conf(netlab, ifname)
    before = snapshot(a)
    wgpy(a, "up", path, check=True)
    kill_daemon(a, ifname)
    r = wgpy(a, "up", path)
    assert r.returncode == 0, r.stderr
    assert "already exists" not in r.stderr
    wgpy(a, "down", path, check=True)
    assert snapshot(a) == before, diff(before, snapshot(a))
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")


# ---------------------------------------------------------------- 3: Ctrl-C / SIGTERM during up

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_up_rolls_back(netlab, signum):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgi")
    marker = os.path.join(netlab.tmpdir, "postup-started")
    path = client_conf(netlab, ifname, f"PostUp = touch {marker}; sleep 20")
    before = snapshot(a)
    proc = subprocess.Popen(a.exec_argv([WGPY, "up", path]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(marker):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert a.link_exists(ifname)  # half-built: the slow PostUp runs
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "interrupted" in err and "undone" in err and "Traceback" not in err, err
    assert not a.link_exists(ifname)
    after = snapshot(a)
    assert after == before, diff(before, after)
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")


# ---------------------------------------------------------------- 4: SaveConfig that cannot save

def test_down_with_failing_save_config_still_rolls_back(netlab):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgs")
    path = client_conf(netlab, ifname, "SaveConfig = true")
    original = open(path).read()
    before = snapshot(a)
    wgpy(a, "up", path, check=True)
    a.run(["wg", "set", ifname, "private-key", "/dev/null"])  # the daemon now has no private key
    r = wgpy(a, "down", path)
    assert r.returncode != 0 and "SaveConfig" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(a) == before, diff(before, snapshot(a))
    assert open(path).read() == original


def test_down_with_save_config_after_daemon_killed_still_rolls_back(netlab):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgs")
    path = client_conf(netlab, ifname, "SaveConfig = true")
    before = snapshot(a)
    wgpy(a, "up", path, check=True)
    kill_daemon(a, ifname)
    r = wgpy(a, "down", path)
    assert r.returncode != 0 and "SaveConfig" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(a) == before, diff(before, snapshot(a))
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")


# ---------------------------------------------------------------- 5: not root

NOT_ROOT = [
    ("up", [WGPY, "up", "{path}"]),
    ("down", [WGPY, "down", "{ifname}"]),
    ("show", [WGPY, "show"]),
    ("show-one", [WGPY, "show", "{ifname}"]),
    ("set", [WGPY, "set", "{ifname}", "peer", Keys().public_b64, "bridge", "off"]),
    ("daemon", [str(BIN / "wgpy-daemon"), "{ifname}"]),
]


@pytest.mark.parametrize("what,argv", NOT_ROOT, ids=[n[0] for n in NOT_ROOT])
def test_not_root_is_one_clear_line(netlab, what, argv):
    a = netlab.netns("user")
    ifname = unique_ifname("wgu")
    path = os.path.join(netlab.tmpdir, f"{ifname}.conf")
    with open(path, "w") as f:
        f.write(f"[Interface]\nPrivateKey = {Keys().private_b64}\n")
    os.chmod(netlab.tmpdir, 0o755)
    os.chmod(path, 0o644)  # readable: the refusal must be about privileges, not the file
    before = snapshot(a)
    r = a.run(NOBODY + [w.format(path=path, ifname=ifname) for w in argv], check=False, timeout=30)
    assert r.returncode != 0, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert "needs root (CAP_NET_ADMIN)" in line, line
    assert snapshot(a) == before
    assert not os.path.exists(f"/var/log/wgpy/{ifname}.log")


# ---------------------------------------------------------------- 6: two network namespaces

def test_down_in_another_namespace_leaves_state_alone(netlab):
    a, _ = two_hosts(netlab)
    b = netlab.netns("other")
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    isolated_resolv_conf(netlab, b, "nameserver 192.0.2.54\n")
    ifname = unique_ifname("wgn")
    path = client_conf(netlab, ifname)
    before_a, before_b = snapshot(a), snapshot(b)
    wgpy(a, "up", path, check=True)
    r = wgpy(b, "down", path)  # no such interface here: refused, nothing of a's touched
    assert r.returncode != 0 and "nothing was changed" in one_line(r.stderr), r.stderr
    assert snapshot(b) == before_b
    assert a.link_exists(ifname)
    r = wgpy(a, "down", path)  # a's journal is intact: an exact restore
    assert r.returncode == 0 and "not brought up by wgpy" not in r.stderr, r.stderr
    assert snapshot(a) == before_a, diff(before_a, snapshot(a))


def test_up_of_a_name_taken_in_another_namespace_says_why(netlab):
    a, _ = two_hosts(netlab)
    b = netlab.netns("other")
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\n")
    ifname = unique_ifname("wgn")
    path = client_conf(netlab, ifname, dns=False)
    before_b = snapshot(b)
    wgpy(a, "up", path, check=True)
    # /var/run/wireguard/NAME.sock is shared by every namespace: the name cannot be used twice
    r = wgpy(b, "up", path)
    assert r.returncode != 0 and "another network namespace" in one_line(r.stderr), r.stderr
    assert snapshot(b) == before_b
    wgpy(a, "down", path, check=True)


# ---------------------------------------------------------------- 14: up --wait

def test_up_wait_for_handshake(netlab):
    a, b = two_hosts(netlab)
    peer = WgInterface(netlab, b, "wireguard-go").start()
    ka = Keys()
    peer.setconf(listen_port=51821, peers=[PeerConf(ka.public_b64, ["10.222.0.1/32"])])
    peer.address("10.222.0.2/24")
    good, bad = unique_ifname("wgw"), unique_ifname("wgw")
    conf = """
[Interface]
PrivateKey = {key}
Address = 10.222.0.1/24

[Peer]
PublicKey = {peer}
AllowedIPs = 10.222.0.2/32
Endpoint = 10.210.0.2:51821
"""
    path = write_conf(netlab, good, conf.format(key=ka.private_b64, peer=peer.keys.public_b64))
    r = wgpy(a, "up", path, "--wait", "10")
    assert r.returncode == 0, r.stderr
    assert "latest handshake" in wgpy(a, "show", good, check=True).stdout
    wgpy(a, "down", path, check=True)
    # a key the peer does not know: no handshake, a non-zero exit that says so
    path = write_conf(netlab, bad, conf.format(key=Keys().private_b64, peer=peer.keys.public_b64))
    started = time.monotonic()
    r = wgpy(a, "up", path, "--wait", "2")
    assert r.returncode != 0 and "no handshake within 2 s" in r.stderr, r.stderr
    assert time.monotonic() - started < 15
    wgpy(a, "down", path, check=True)


# ---------------------------------------------------------------- 15: no empty log files

def test_daemon_leaves_no_empty_log(netlab):
    a = netlab.netns("log")
    ifname = unique_ifname("wgl")
    log = f"/var/log/wgpy/{ifname}.log"
    netlab.defer(lambda: os.path.exists(log) and os.unlink(log))
    r = a.run([str(BIN / "wgpy-daemon"), ifname], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    a.ip("link", "del", ifname)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/var/run/wireguard/{ifname}.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(log)
