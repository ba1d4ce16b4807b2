"""Fault tests (issue 12): loss on the underlay, kill -9 and restart of either side's daemon, a link
flap mid-transfer, and kill -9 of `wgpy up` at each of its steps followed by `wgpy down NAME`.

Each scenario runs for wgpy-daemon and, as the reference, for wireguard-go, in the test's own
namespaces. The figures (throughput, ping loss, recovery time) are printed (`pytest -s`) on lines
starting with "RECOVERY"; the assertions are functional only (a transfer completes, pings get
answers, traffic flows again within a bound), never about speed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from .netlab import NetLab, missing_requirements, unique_ifname
from .test_quick import WGPY, isolated_resolv_conf, snapshot, two_hosts, write_conf
from .traffic import PingStream, iperf3, ping, received, wait_for_ping
from .wg_peers import Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns
KINDS = ["wgpy", "wireguard-go"]
A_IN, B_IN = "10.240.0.1", "10.240.0.2"
PORT = 51820
RECOVERY_BOUND = 30.0  # seconds: a re-handshake after 15 s of silence, plus margin


@pytest.fixture(autouse=True)
def _needs_tools():
    reason = missing_requirements(("wg", "ping", "nft", "iperf3", "wireguard-go", "ss"), need_tun=True)
    if reason:
        pytest.skip(reason)


def report(scenario: str, kind: str, **figures) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\nRECOVERY | {scenario} | {kind} | {shown}", flush=True)


class Tunnel:
    """Two namespaces joined by a veth (10.210.0.1 <-> 10.210.0.2), a WireGuard interface of
    `kind` in each (tunnel 10.240.0.1 <-> 10.240.0.2); either side can be killed and restarted
    with the same keys, name and configuration."""

    def __init__(self, lab: NetLab, kind: str) -> None:
        self.lab, self.kind = lab, kind
        self.a, self.b = lab.netns("ra"), lab.netns("rb")
        self.veth_a, self.veth_b = lab.veth(self.a, self.b, addrs_a=["10.210.0.1/24"], addrs_b=["10.210.0.2/24"])
        self.keys = {"a": Keys(), "b": Keys()}
        self.names = {"a": unique_ifname("wgra"), "b": unique_ifname("wgrb")}
        self.ifs: dict[str, WgInterface] = {}
        for side in ("a", "b"):
            self.start(side)

    def ns(self, side: str):
        return self.a if side == "a" else self.b

    def start(self, side: str) -> None:
        other = "b" if side == "a" else "a"
        wg = WgInterface(self.lab, self.ns(side), self.kind, keys=self.keys[side], ifname=self.names[side]).start()
        inner = {"a": A_IN, "b": B_IN}
        outer = {"a": "10.210.0.1", "b": "10.210.0.2"}
        peer = PeerConf(self.keys[other].public_b64, [f"{inner[other]}/32"], f"{outer[other]}:{PORT}")
        wg.setconf(listen_port=PORT, peers=[peer])
        wg.address(f"{inner[side]}/24")
        self.ifs[side] = wg

    def kill(self, side: str) -> None:
        """kill -9 of that side's daemon; returns once its link is gone."""
        wg = self.ifs[side]
        os.kill(wg.proc.pid, signal.SIGKILL)
        wg.proc.wait(5)
        deadline = time.monotonic() + 5
        while self.ns(side).link_exists(wg.ifname):
            assert time.monotonic() < deadline, f"{wg.ifname} still there after kill -9"
            time.sleep(0.02)
        if os.path.exists(wg.socket_path):
            # What a killed daemon leaves. Both daemons replace it at start, but the harness
            # waits for the file to appear: remove it, so it waits for the new daemon's.
            assert stat.S_ISSOCK(os.lstat(wg.socket_path).st_mode)
            os.unlink(wg.socket_path)

    def loss(self, percent: int) -> None:
        """Drop `percent`% of the underlay's UDP on receive, in both namespaces (so both ways)."""
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            ns.run(["nft", "-f", "-"], input=f"""table inet lossy {{
  chain in {{ type filter hook input priority 0; iifname "{dev}" meta l4proto udp numgen random mod 100 < {percent} drop; }}
}}
""")



# ---------------------------------------------------------------------------- loss


@pytest.mark.parametrize("percent", [5, 20])
@pytest.mark.parametrize("kind", KINDS)
def test_loss_on_the_underlay(netlab, kind, percent):
    t = Tunnel(netlab, kind)
    t.loss(percent)
    # 60 s: at 20% loss each way a handshake gets through 64% of the time, so 4 attempts in
    # 20 s all fail once in 60 runs; 12 attempts essentially never.
    took = wait_for_ping(t.a, B_IN, timeout=60)
    assert took is not None, t.ifs["a"].log()[-3000:] + t.ifs["b"].log()[-3000:]
    pings = ping(t.a, B_IN, count=30, interval=0.05, wait=1)
    answered = received(pings)
    assert answered > 0, pings.stdout
    result = iperf3(t.b, t.a, B_IN, seconds=3)  # raises unless the TCP transfer completes
    assert result.received_bytes > 0
    report(f"loss {percent}% each way", kind, first_ping_s=took, ping_answered=f"{answered}/30",
           tcp_mbit_s=result.mbps, retransmits=result.retransmits,
           cmd=f"nft numgen random mod 100 < {percent} drop (udp, both veth ends); iperf3 -t 3; ping -c 30 -i 0.05")


# ---------------------------------------------------------------------------- kill -9 and restart


@pytest.mark.parametrize("side", ["a", "b"], ids=["pinger", "pinged"])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_and_restart(netlab, kind, side):
    """kill -9 of one side's daemon under a ping stream from a, restart (daemon + wg setconf +
    address): traffic flows again. When the restarted side is the pinged one, the other keeps
    sending on the old session until 15 s of silence make it handshake again (the protocol's
    rule, wireguard-go's too); when it is the pinger, its new session starts at once."""
    t = Tunnel(netlab, kind)
    assert wait_for_ping(t.a, B_IN, timeout=10) is not None
    stream = PingStream(t.a, B_IN, interval=0.1)
    try:
        assert stream.wait_reply_after(time.time(), 5) is not None
        killed = time.time()
        t.kill(side)
        time.sleep(1.0)
        t.start(side)
        restarted = time.time()
        delay = stream.wait_reply_after(restarted, RECOVERY_BOUND)
        assert delay is not None, (f"no reply within {RECOVERY_BOUND} s of restarting {side}\n"
                                   + stream.output()[-2000:] + t.ifs[side].log()[-3000:])
    finally:
        stream.stop()
    report(f"kill -9 of the {'pinger' if side == 'a' else 'pinged side'} + restart", kind,
           after_restart_s=delay, after_kill_s=restarted + delay - killed, restart_took_s=restarted - killed - 1.0,
           cmd="kill -9 daemon; 1 s; daemon -f + wg setconf + ip addr/up; ping -i 0.1 from the pinger")


# ---------------------------------------------------------------------------- link flap


@pytest.mark.parametrize("kind", KINDS)
def test_link_flap_mid_transfer(netlab, kind):
    """The underlay veth goes down for 2 s in the middle of a TCP transfer: the transfer
    completes, and pings come back soon after the link does."""
    t = Tunnel(netlab, kind)
    assert wait_for_ping(t.a, B_IN, timeout=10) is not None
    outcome: dict = {}

    def transfer():
        try:
            outcome["result"] = iperf3(t.b, t.a, B_IN, seconds=8)
        except AssertionError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=transfer, daemon=True)
    stream = PingStream(t.a, B_IN, interval=0.1)
    try:
        worker.start()
        time.sleep(2.5)
        t.a.ip("link", "set", t.veth_a, "down")
        time.sleep(2.0)
        t.a.ip("link", "set", t.veth_a, "up")
        up = time.time()
        delay = stream.wait_reply_after(up, RECOVERY_BOUND)
        worker.join(40)
    finally:
        stream.stop()
    assert delay is not None, stream.output()[-2000:]
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.received_bytes > 0
    report("veth down 2 s mid-transfer", kind, ping_back_after_link_up_s=delay, tcp_mbit_s=result.mbps,
           retransmits=result.retransmits, cmd="iperf3 -t 8; at +2.5 s ip link set VETH down; 2 s; up")


# ---------------------------------------------------------------------------- kill -9 of `wgpy up`

STALL_IP = """#!/bin/sh
# `ip` for `wgpy up` under test: runs the real one, then, for the command the test waits for,
# says so and stalls (the test kills `wgpy up` there).
"{real}" "$@"
rc=$?
case " $* " in
  *"{pattern}"*) echo $$ > "{marker}"; sleep 60 ;;
esac
exit $rc
"""


def state_files(ns, ifname: str) -> list[str]:
    out = ns.run(["sh", "-c", "ls -1 /run/wgpy/net-$(stat -L -c %i /proc/self/ns/net) 2>/dev/null"],
                 check=False).stdout.split()
    return sorted(n for n in out if ifname in n)


def host_state(ns, ifname: str) -> dict:
    snap = snapshot(ns)
    snap["state_files"] = "\n".join(state_files(ns, ifname))
    snap["socket"] = str(os.path.exists(f"/var/run/wireguard/{ifname}.sock"))
    return snap


# (step id, what `ip` command to stall after, or None for the PostUp hook)
STEPS = [
    ("after-daemon-and-setconf", "address add"),
    ("after-address", "link set mtu"),
    ("after-policy-rule", "rule add"),  # failed before Journal.cmd recorded the undo first
    ("after-routes", "route add 0.0.0.0/0"),
    ("during-postup", None),
]


@pytest.mark.parametrize("step,pattern", STEPS, ids=[s[0] for s in STEPS])
def test_kill_9_of_up_at_each_step_then_down_restores(netlab, step, pattern):
    a, _ = two_hosts(netlab)
    isolated_resolv_conf(netlab, a, "nameserver 192.0.2.53\nsearch example.org\n")
    ifname = unique_ifname("wgu")
    marker = os.path.join(netlab.tmpdir, "stalled")
    post_up = f"PostUp = echo $$ > {marker}; sleep 60" if pattern is None else ""
    path = write_conf(netlab, ifname, f"""[Interface]
PrivateKey = {Keys().private_b64}
Address = 10.221.0.1/24
DNS = 10.221.0.53
{post_up}

[Peer]
PublicKey = {Keys().public_b64}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 10.210.0.2:51821
""")
    bindir = os.path.join(netlab.tmpdir, "bin")
    os.makedirs(bindir, exist_ok=True)
    real_ip = subprocess.run(["sh", "-c", "command -v ip"], capture_output=True, text=True).stdout.strip()
    if pattern is not None:
        with open(os.path.join(bindir, "ip"), "w") as f:
            f.write(STALL_IP.format(real=real_ip, pattern=pattern, marker=marker))
        os.chmod(os.path.join(bindir, "ip"), 0o755)
    before = host_state(a, ifname)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    proc = subprocess.Popen(a.exec_argv([WGPY, "up", path]), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(marker) and open(marker).read().strip()):
            assert proc.poll() is None, f"`wgpy up` ended before {step}: {proc.communicate()}"
            assert time.monotonic() < deadline, f"`wgpy up` never reached {step}"
            time.sleep(0.02)
        assert a.link_exists(ifname)
        half_built = host_state(a, ifname)
        # SIGKILL to `wgpy up` and what it was running (the stalled `ip` or PostUp shell, in
        # its process group; the daemon has a session of its own): no handler runs, nothing is undone.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert half_built != before  # the kill left something to undo
    r = a.run([WGPY, "down", ifname], check=False, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    after = host_state(a, ifname)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    report(f"kill -9 of wgpy up {step}", "wgpy", restored="exactly",
           left_before_down=",".join(k for k in before if before[k] != half_built[k]))
