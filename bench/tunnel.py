"""`wgpy bench tunnel`: iperf3 TCP through a tunnel between two network namespaces, for each
implementation pair, in one run. Needs root, wireguard-go, wg and iperf3.

Each pair gets fresh namespaces joined by a veth (the raw link is measured too, as the ceiling),
two interfaces configured with `wg setconf`, and iperf3 in both directions. Everything is removed
afterwards, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunnel.keys import encode_base64_key, generate_private_key, public_key

WGPY_DAEMON = str(Path(sys.executable).with_name("wgpy-daemon"))
IMPLS = {"wgpy": [WGPY_DAEMON, "-f"], "wireguard-go": ["wireguard-go", "-f"]}
BASE = "wgpy@base"  # wgpy from another checkout (--against), run with this Python
_checkouts: dict[str, str] = {}  # impl -> checkout directory whose code it runs


def add_checkout(path: str) -> str:
    """Measure the wgpy of another checkout (e.g. the commit before a change) as BASE, with
    this run's Python and dependencies, so a change is compared with its parent in one run."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "tunnel", "daemon.py")):
        raise SystemExit(f"--against {path}: not a wgpy checkout (no tunnel/daemon.py)")
    _checkouts[BASE] = path
    IMPLS[BASE] = [sys.executable, "-m", "tunnel.daemon", "-f"]
    return BASE


def _env(impl: str) -> dict[str, str]:
    env = {**os.environ, "LOG_LEVEL": "error"}
    if impl in _checkouts:
        env["PYTHONPATH"] = _checkouts[impl]
    return env


def _wgpy(impl: str) -> list[str]:
    """The `wgpy` command of an implementation's checkout."""
    return [sys.executable, "-m", "tunnel.cli"] if impl in _checkouts else [WGPY]


@dataclass
class Figure:
    pair: str
    direction: str
    mbps: float
    retransmits: int
    # CPU seconds the two tunnel daemons (and bridge processes) spent per GB moved: steadier than
    # throughput on a small machine, where iperf3 and both daemons compete for the same cores.
    cpu_s_per_gb: float | None = None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICK


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


class Lab:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.ns = [f"wgpyb-{self.tag}-a", f"wgpyb-{self.tag}-b"]
        self.procs: list[subprocess.Popen] = []
        self.tunnel_pids: list[int] = []  # daemons and bridge processes: what moving data costs
        self.sockets: list[str] = []
        self.tmp = tempfile.mkdtemp(prefix="wgpy-bench-")

    def __enter__(self) -> "Lab":
        a, b = self.ns
        for n in self.ns:
            _run("ip", "netns", "add", n)
            _run("ip", "-n", n, "link", "set", "lo", "up")
        _run("ip", "-n", a, "link", "add", "bva", "type", "veth", "peer", "name", "bvb", "netns", b)
        _run("ip", "-n", a, "addr", "add", "10.231.0.1/24", "dev", "bva")
        _run("ip", "-n", b, "addr", "add", "10.231.0.2/24", "dev", "bvb")
        _run("ip", "-n", a, "link", "set", "bva", "up")
        _run("ip", "-n", b, "link", "set", "bvb", "up")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
        for n in self.ns:
            _run("ip", "netns", "del", n, check=False)
        for s in self.sockets:
            try:
                os.unlink(s)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def exec(self, side: int, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def start_interface(self, side: int, impl: str, ifname: str) -> None:
        p = subprocess.Popen(self.exec(side, *IMPLS[impl], ifname), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env(impl), cwd=_checkouts.get(impl))
        self.procs.append(p)
        self.tunnel_pids.append(p.pid)  # `ip netns exec` execs the daemon (-f: no fork)
        sock = f"/var/run/wireguard/{ifname}.sock"
        self.sockets.append(sock)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{impl} did not start for {ifname}")
            time.sleep(0.02)

    def iperf(self, server: int, client: int, addr: str, seconds: int, reverse: bool) -> tuple[float, int]:
        srv = subprocess.Popen(self.exec(server, "iperf3", "-s", "-1", "-B", addr),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(srv)
        deadline = time.monotonic() + 10
        while ":5201 " not in _run(*self.exec(server, "ss", "-Hltn"), check=False).stdout:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["iperf3", "-c", addr, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        r = _run(*self.exec(client, *argv), check=False, timeout=seconds + 30)
        if r.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            srv.terminate()
        end = json.loads(r.stdout)["end"]
        mbps = end["sum_received"]["bits_per_second"] / 1e6
        retr = end.get("sum_sent", {}).get("retransmits", 0)
        return mbps, retr


BRIDGE_METHOD = "aes-256-gcm"
BRIDGE_PASSWORD = "bench-only-password"
# 1500 - 80 (IPv6 + UDP + WireGuard) - 55 (Shadowsocks aes-256-gcm with an IPv4 target)
BRIDGE_MTU = 1365


WGPY = str(Path(sys.executable).with_name("wgpy"))
BRIDGE_URI = f"ss://{BRIDGE_METHOD}:{BRIDGE_PASSWORD}@10.231.0.2:8388"


# How side a reaches side b through Shadowsocks: "libev" = ss-tunnel (a local port) + ss-server;
# "wgpy" = side a's wgpy-daemon carries its datagrams itself (`wgpy set ... bridge`) to
# `wgpy bridge serve`; "wgpy+libev" = the same daemon carrier to libev's ss-server.
BRIDGES = {"libev": "libev", "wgpy": "wgpy (daemon + wgpy bridge serve)",
           "wgpy+libev": "wgpy daemon + libev ss-server"}


def _start_bridge(lab: "Lab", bridge: str, impl: str = "wgpy") -> str:
    """Start the bridge's processes; returns the endpoint side a's WireGuard must use (for the
    daemon's own carrier: the WireGuard port as the server sees it)."""
    if bridge in ("libev", "wgpy+libev"):
        server = ["ss-server", "-s", "10.231.0.2", "-p", "8388", "-k", BRIDGE_PASSWORD, "-m", BRIDGE_METHOD, "-U"]
        client = ["ss-tunnel", "-s", "10.231.0.2", "-p", "8388", "-k", BRIDGE_PASSWORD, "-m", BRIDGE_METHOD,
                  "-b", "127.0.0.1", "-l", "51999", "-L", "127.0.0.1:51821", "-U"]
        procs = ((1, server, 8388), (0, client, 51999)) if bridge == "libev" else ((1, server, 8388),)
    else:
        server = [*_wgpy(impl), "bridge", "serve", "--listen",
                  f"ss://{BRIDGE_METHOD}:{BRIDGE_PASSWORD}@10.231.0.2:8388", "--allow", "127.0.0.1:51821"]
        procs = ((1, server, 8388),)
    for side, argv, port in procs:
        lab.procs.append(subprocess.Popen(lab.exec(side, *argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=_env(impl), cwd=_checkouts.get(impl)))
        lab.tunnel_pids.append(lab.procs[-1].pid)
        deadline = time.monotonic() + 10
        while f":{port} " not in _run(*lab.exec(side, "ss", "-Hlun"), check=False).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridge ({bridge}) did not start: {argv[0]}")
            time.sleep(0.05)
    return "127.0.0.1:51999" if bridge == "libev" else "127.0.0.1:51821"


def measure_pair(left: str, right: str, seconds: int, bridge: str | None = None) -> list[Figure]:
    figures = []
    label = f"{left} <-> {right}" + (f" via ss {BRIDGES[bridge]}" if bridge else "")
    with Lab() as lab:
        if left == "veth":
            for reverse in (False, True):
                mbps, retr = lab.iperf(1, 0, "10.231.0.2", seconds, reverse)
                figures.append(Figure("veth (no tunnel)", "a<-b" if reverse else "a->b", mbps, retr))
            return figures
        ka, kb = generate_private_key(), generate_private_key()
        names = [f"wgb{lab.tag}a", f"wgb{lab.tag}b"]
        endpoint = _start_bridge(lab, bridge, right) if bridge else "10.231.0.2:51821"
        mtu = str(BRIDGE_MTU if bridge else 1420)
        for side, impl, key, other, port, peer_ep in (
            (0, left, ka, kb, 51820, endpoint),
            (1, right, kb, ka, 51821, None),
        ):
            lab.start_interface(side, impl, names[side])
            conf = os.path.join(lab.tmp, f"{names[side]}.conf")
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[Interface]\nPrivateKey = {encode_base64_key(key)}\nListenPort = {port}\n"
                        f"[Peer]\nPublicKey = {encode_base64_key(public_key(other))}\n"
                        f"AllowedIPs = 10.232.0.{2 - side}/32\n" + (f"Endpoint = {peer_ep}\n" if peer_ep else ""))
            _run(*lab.exec(side, "wg", "setconf", names[side], conf))
            _run("ip", "-n", lab.ns[side], "addr", "add", f"10.232.0.{side + 1}/24", "dev", names[side])
            _run("ip", "-n", lab.ns[side], "link", "set", names[side], "mtu", mtu, "up")
        if bridge in ("wgpy", "wgpy+libev"):
            subprocess.run(lab.exec(0, *_wgpy(left), "set", names[0], "peer", encode_base64_key(public_key(kb)),
                                    "bridge", BRIDGE_URI), check=True, capture_output=True, timeout=30,
                           env=_env(left), cwd=_checkouts.get(left))
        _run(*lab.exec(0, "ping", "-c", "1", "-W", "5", "10.232.0.2"))
        for reverse in (False, True):
            cpu = cpu_seconds(lab.tunnel_pids)
            mbps, retr = lab.iperf(1, 0, "10.232.0.2", seconds, reverse)
            cpu = cpu_seconds(lab.tunnel_pids) - cpu
            gb = mbps * seconds / 8 / 1000
            figures.append(Figure(label, "a<-b" if reverse else "a->b", mbps, retr,
                                  round(cpu / gb, 2) if gb > 0 else None))
    return figures


def require_tools(*extra: str) -> None:
    missing = [t for t in ("ip", "wg", "iperf3", "wireguard-go", "nft", *extra) if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        raise SystemExit(f"wgpy bench tunnel needs root and {', '.join(missing) or 'nothing else'}")


def run(pairs: list[tuple], seconds: int) -> list[Figure]:
    """`pairs`: (left, right) or (left, right, bridge) with bridge a key of BRIDGES."""
    require_tools(*(("ss-server", "ss-tunnel") if any(len(p) > 2 for p in pairs) else ()))
    out: list[Figure] = []
    for left, right, *bridge in pairs:
        out.extend(measure_pair(left, right, seconds, bridge[0] if bridge else None))
    return out


def format_table(figures: list[Figure], seconds: int, reference: str = "wireguard-go <-> wireguard-go",
                 setup: str = f"MTU 1420; {BRIDGE_MTU} through a Shadowsocks {BRIDGE_METHOD} bridge") -> str:
    ref: dict[str, float] = {}
    for f in figures:  # the first round's reference, for rows measured before it (veth)
        if f.pair == reference:
            ref.setdefault(f.direction, f.mbps)
    lines = [f"wgpy bench tunnel: iperf3 TCP, {seconds} s per direction, namespaces over veth ({setup})",
             f"{'pair':<62} {'dir':<5} {'Mbit/s':>9} {'retrans':>8} {'CPU s/GB':>9} {'vs ' + reference:>10}"]
    for f in figures:
        if f.pair == reference:
            ref[f.direction] = f.mbps  # with --rounds: each round against its own reference
        ratio = f"{f.mbps / ref[f.direction]:.2f}" if f.direction in ref else "-"
        cpu = f"{f.cpu_s_per_gb:.2f}" if f.cpu_s_per_gb is not None else "-"
        lines.append(f"{f.pair:<62} {f.direction:<5} {f.mbps:>9.1f} {f.retransmits:>8} {cpu:>9} {ratio:>10}")
    return "\n".join(lines)
