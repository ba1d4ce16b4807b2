"""The latency scenario of `wgpy bench`: ping round trips through a tunnel, idle and while
iperf3 fills it (a TCP stream from a to b), for each pair. Root, ping and iperf3.

Pings go every 50 ms (ping's minimum interval for root is 2 ms, but a busy 2-core machine makes
short intervals measure the scheduler). The figure is ping's average RTT; the loaded one starts
half a second into the transfer so TCP has reached its window. Next to the idle RTT: the CPU time
both tunnel processes spent per idle ping (what a faster round trip costs: wgpy's busy poll).
"""

from __future__ import annotations

import re
import subprocess
import time

from .tunnel import _run, cpu_seconds_fine, pair_lab

_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def ping_rtt(lab, side: int, addr: str, count: int) -> float:
    """Average RTT in ms of `count` pings from `side` (raises if fewer than half come back)."""
    r = _run(*lab.exec(side, "ping", "-q", "-n", "-c", str(count), "-i", "0.05", "-W", "2", addr),
             check=False, timeout=count * 0.05 + 15)
    m = _RTT.search(r.stdout)
    received = re.search(r"(\d+) received", r.stdout)
    if m is None or received is None or int(received.group(1)) * 2 < count:
        raise RuntimeError(f"ping through the tunnel failed: {r.stdout.strip()[-200:]}")
    return float(m.group(2))


def measure(left: str, right: str, seconds: int, count: int) -> tuple[float, float, float | None]:
    """(idle RTT ms, RTT ms under an iperf3 a->b transfer, CPU ms both tunnel processes spent per
    idle ping: what the RTT costs, e.g. wgpy's busy poll; None without tunnel processes)."""
    with pair_lab(left, right) as (lab, addr):
        cpu = cpu_seconds_fine(lab.tunnel_pids)
        idle = ping_rtt(lab, 0, addr, count)
        cpu_ms = (cpu_seconds_fine(lab.tunnel_pids) - cpu) * 1000 / count if lab.tunnel_pids else None
        lab.iperf_server(1, addr)
        load_seconds = max(seconds, int(count * 0.05) + 2)
        client = subprocess.Popen(lab.exec(0, "iperf3", "-c", addr, "-t", str(load_seconds)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.procs.append(client)
        time.sleep(0.5)
        try:
            loaded = ping_rtt(lab, 0, addr, count)
        finally:
            client.terminate()
        return idle, loaded, cpu_ms
