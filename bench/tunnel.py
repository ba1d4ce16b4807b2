"""Tunnels between two network namespaces for `wgpy bench` (the tunnel, bridge and latency
scenarios): iperf3 TCP through them, with the CPU and memory the tunnel processes used. Root.

Each pair gets fresh namespaces joined by a veth (the raw link is measured too, as the ceiling),
two interfaces configured with `wg setconf`, optionally a bridge in between, and iperf3 in both
directions. Everything is removed afterwards, also on failure or Ctrl-C.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from bridge.spec import parse_bridge
from tunnel.keys import encode_base64_key, generate_private_key, public_key

WGPY_DAEMON = str(Path(sys.executable).with_name("wgpy-daemon"))
WGPY = str(Path(sys.executable).with_name("wgpy"))
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


# The hot loop's offloads and the busy poll, each with the environment switch that turns it off:
# `wgpy bench tunnel|latency --without FEATURE` measures a wgpy pair without it in the same run,
# i.e. what it buys.
FEATURES = {"tun-offload": "WGPY_TUN_OFFLOAD", "udp-gso": "WGPY_UDP_GSO", "udp-gro": "WGPY_UDP_GRO",
            "busy-poll": "WGPY_POLL_US"}
_variant_env: dict[str, dict[str, str]] = {}  # impl -> environment that turns features off


def add_variant(features: tuple[str, ...]) -> str:
    """This checkout's wgpy with `features` off, as an implementation of its own."""
    impl = "wgpy without " + "+".join(features)
    IMPLS[impl] = IMPLS["wgpy"]
    _variant_env[impl] = {FEATURES[f]: "0" for f in features}
    return impl


def _env(impl: str) -> dict[str, str]:
    env = {**os.environ, "LOG_LEVEL": "error"}
    if impl in _checkouts:
        env["PYTHONPATH"] = _checkouts[impl]
    else:  # this checkout's wgpy: every feature on unless the variant turns it off
        for name in FEATURES.values():
            env.pop(name, None)
        env.update(_variant_env.get(impl, {}))
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
    rss_mb: float | None = None  # the largest peak RSS among those processes
    # The largest anonymous RSS among them at the end: their own memory, without the pages of
    # shared libraries, whose count depends on the page cache (after a fresh `pip install`
    # every page of a library is cached, and each fault maps more of them).
    anon_mb: float | None = None


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


def cpu_seconds_fine(pids: list[int]) -> float:
    """The CPU time of the processes' live threads in nanoseconds' resolution (schedstat), for
    spans too short for the clock ticks of cpu_seconds (a few pings)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


class Lab:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.ns = [f"wgpyb-{self.tag}-a", f"wgpyb-{self.tag}-b"]
        self.procs: list[subprocess.Popen] = []
        self.tunnel_pids: list[int] = []  # daemons and bridge processes: what moving data costs
        self.sockets: list[str] = []
        self.keys: list[tuple[bytes, bytes]] = []  # (private, public) of sides a and b, once a tunnel is made
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

    def iperf_server(self, side: int, addr: str) -> subprocess.Popen:
        """A one-shot iperf3 server on `addr` in `side`'s namespace, listening when this returns."""
        srv = subprocess.Popen(self.exec(side, "iperf3", "-s", "-1", "-B", addr),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(srv)
        _wait_listening(self, side, 5201, "t", "iperf3 server", srv)
        return srv

    def iperf(self, server: int, client: int, addr: str, seconds: int, reverse: bool) -> tuple[float, int]:
        srv = self.iperf_server(server, addr)
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
LIBEV_METHODS = ("aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305")  # what ss-server here speaks



def bridge_password(method: str) -> str:
    """A password the method accepts: 2022 methods take a base64 key of the cipher's size."""
    if method.startswith("2022-"):
        size = 16 if "aes-128" in method else 32
        return base64.b64encode(hashlib.sha256(BRIDGE_PASSWORD.encode()).digest()[:size]).decode()
    return BRIDGE_PASSWORD


def bridge_uri(method: str, host: str = "10.231.0.2", port: int = 8388) -> str:
    """The `Bridge =` value for a method ("udp2tcp": udp-over-tcp)."""
    if method == "udp2tcp":
        return f"udp2tcp://{host}:{port}"
    return f"ss://{quote(method, safe='')}:{quote(bridge_password(method), safe='')}@{host}:{port}"


def bridge_mtu(method: str, outer: int = 1500, hops: int = 1) -> int:
    """The tunnel MTU that keeps the outer datagrams within `outer`: 80 bytes per WireGuard hop (as
    wg-quick reserves: IPv6 + UDP + WireGuard) and the Shadowsocks overhead of the method to an IPv4
    target, rounded down to 16 like WireGuard's padding."""
    over = parse_bridge(bridge_uri(method)).overhead(("127.0.0.1", 51821)) if method != "udp2tcp" else 0
    return (outer - 80 * hops - over) // 16 * 16


# How side a reaches side b through a bridge: "libev" = ss-tunnel (a local port) + ss-server;
# "wgpy" = side a's wgpy-daemon carries its datagrams itself (`wgpy set ... bridge`) to
# `wgpy bridge serve`; "wgpy+libev" = the same daemon carrier to libev's ss-server.
BRIDGES = {"libev": "libev", "wgpy": "wgpy", "wgpy+libev": "wgpy carrier + libev"}


def _wait_listening(lab: "Lab", side: int, port: int, proto: str, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while f":{port} " not in _run(*lab.exec(side, "ss", f"-Hl{proto}n"), check=False).stdout:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def _start_bridge(lab: "Lab", bridge: str, impl: str = "wgpy", method: str = BRIDGE_METHOD) -> str:
    """Start the bridge's processes; returns the endpoint side a's WireGuard must use (for the
    daemon's own carrier: the WireGuard port as the server sees it)."""
    password = bridge_password(method)
    if bridge in ("libev", "wgpy+libev"):
        server = ["ss-server", "-s", "10.231.0.2", "-p", "8388", "-k", password, "-m", method, "-U"]
        client = ["ss-tunnel", "-s", "10.231.0.2", "-p", "8388", "-k", password, "-m", method,
                  "-b", "127.0.0.1", "-l", "51999", "-L", "127.0.0.1:51821", "-U"]
        procs = ((1, server, 8388), (0, client, 51999)) if bridge == "libev" else ((1, server, 8388),)
        proto = "u"
    else:
        server = [*_wgpy(impl), "bridge", "serve", "--listen", bridge_uri(method), "--allow", "127.0.0.1:51821"]
        procs = ((1, server, 8388),)
        proto = "t" if method == "udp2tcp" else "u"
    for side, argv, port in procs:
        lab.procs.append(subprocess.Popen(lab.exec(side, *argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=_env(impl), cwd=_checkouts.get(impl)))
        lab.tunnel_pids.append(lab.procs[-1].pid)
        _wait_listening(lab, side, port, proto, f"bridge ({bridge}, {argv[0]})", lab.procs[-1])
    return "127.0.0.1:51999" if bridge == "libev" else "127.0.0.1:51821"


def pair_label(left: str, right: str, bridge: str | None = None, method: str = BRIDGE_METHOD) -> str:
    if left == "veth":
        return "veth (no tunnel)"
    label = f"{left} <-> {right}"
    if bridge:
        label += f" via {BRIDGES[bridge]} {'udp2tcp' if method == 'udp2tcp' else 'ss ' + method}"
    return label


@contextmanager
def pair_lab(left: str, right: str, bridge: str | None = None, method: str = BRIDGE_METHOD) -> Iterator[tuple[Lab, str]]:
    """Two namespaces with a tunnel between them (or just the veth, for left == "veth"); yields
    the lab and the address of side b to send to. Everything is removed on the way out."""
    with Lab() as lab:
        if left == "veth":
            yield lab, "10.231.0.2"
            return
        ka, kb = generate_private_key(), generate_private_key()
        lab.keys = [(ka, public_key(ka)), (kb, public_key(kb))]  # throwaway keys (the flood scenario replays a's)
        names = [f"wgb{lab.tag}a", f"wgb{lab.tag}b"]
        endpoint = _start_bridge(lab, bridge, right, method) if bridge else "10.231.0.2:51821"
        mtu = str(bridge_mtu(method) if bridge else 1420)
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
                                    "bridge", bridge_uri(method)), check=True, capture_output=True, timeout=30,
                           env=_env(left), cwd=_checkouts.get(left))
        _run(*lab.exec(0, "ping", "-c", "1", "-W", "5", "10.232.0.2"), timeout=15)
        yield lab, "10.232.0.2"


def memory_mb(pids: list[int], field: str = "VmHWM") -> float | None:
    """The largest value of a memory field of /proc/PID/status among the processes, in MB:
    VmHWM (the peak resident set) unless told, RssAnon (the anonymous part now), ..."""
    best = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        kb = int(line.split()[1])
                        best = kb / 1024 if best is None else max(best, kb / 1024)
        except (OSError, ValueError):
            continue
    return best


def throughput(lab: Lab, server: int, addr: str, label: str, seconds: int) -> list[Figure]:
    """iperf3 both directions from side 0 to `server`, with the tunnel processes' CPU and RSS."""
    figures = []
    for reverse in (False, True):
        cpu = cpu_seconds(lab.tunnel_pids)
        mbps, retr = lab.iperf(server, 0, addr, seconds, reverse)
        cpu = cpu_seconds(lab.tunnel_pids) - cpu
        gb = mbps * seconds / 8 / 1000
        figures.append(Figure(label, "a<-b" if reverse else "a->b", mbps, retr,
                              round(cpu / gb, 2) if gb > 0 and lab.tunnel_pids else None,
                              memory_mb(lab.tunnel_pids), memory_mb(lab.tunnel_pids, "RssAnon")))
    return figures


def measure_pair(left: str, right: str, seconds: int, bridge: str | None = None,
                 method: str = BRIDGE_METHOD) -> list[Figure]:
    with pair_lab(left, right, bridge, method) as (lab, addr):
        return throughput(lab, 1, addr, pair_label(left, right, bridge, method), seconds)


def missing_tools(*tools: str) -> list[str]:
    """What of `tools` is not on PATH, plus "root" when not running as root."""
    out = [] if os.geteuid() == 0 else ["root"]
    return out + [t for t in tools if shutil.which(t) is None]
