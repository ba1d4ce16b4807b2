"""Traffic helpers for namespace tests: ping (one-shot, until-it-works, and a background stream
with timestamps), iperf3 (one TCP run, either direction, JSON parsed), UDP and TCP echo servers.

All of them run the Debian tools inside lab namespaces (netlab.Namespace); none of them touches
the root namespace. Functional checks, not benchmarks: keep runs short.
"""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .netlab import LabProcess, Namespace, NetLab, NetLabError

IPERF_PORT = 5201


def ping(ns: Namespace, dst: str, *, count: int = 3, interval: float = 0.2, wait: float = 2.0,
         src: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """`ping -c COUNT -i INTERVAL -W WAIT [-I SRC] DST` in `ns`; never raises on loss."""
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
    if src:
        argv += ["-I", src]
    argv.append(dst)
    if timeout is None:
        timeout = count * interval + wait + 5.0
    return ns.run(argv, check=False, timeout=timeout)


def received(cp: subprocess.CompletedProcess[str]) -> int:
    """How many replies a finished ping reported."""
    m = re.search(r"(\d+) received", cp.stdout)
    return int(m.group(1)) if m else 0


def wait_for_ping(ns: Namespace, dst: str, timeout: float, *, src: str | None = None,
                  per_try: float = 1.0) -> float | None:
    """Ping once per `per_try` seconds until one reply arrives. Returns the seconds it took, or
    None if none came within `timeout`."""
    start = time.monotonic()
    while True:
        cp = ping(ns, dst, count=1, wait=per_try, src=src)
        if cp.returncode == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        # ping -W returns at once on some errors (no route, unreachable): do not spin.
        time.sleep(max(0.0, per_try - 0.5))


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class PingStream:
    """`ping -D -i INTERVAL DST` running in the background: every reply is a timestamped line
    (Unix time, the clock of time.time()), so a test can ask when replies stopped and resumed.
    ping line-buffers its output, so the log is readable while it runs."""

    def __init__(self, ns: Namespace, dst: str, *, interval: float = 0.1, src: str | None = None) -> None:
        argv = ["ping", "-n", "-D", "-i", str(interval), "-W", "1"]
        if src:
            argv += ["-I", src]
        argv.append(dst)
        self.ns, self.dst = ns, dst
        self.proc: LabProcess = ns.popen(argv)

    def replies(self) -> list[tuple[float, int]]:
        """(Unix time, icmp_seq) of every reply so far."""
        out = []
        for line in self.proc.output().splitlines():
            m = _REPLY.match(line)
            if m:
                out.append((float(m.group(1)), int(m.group(2))))
        return out

    def wait_reply_after(self, t: float, timeout: float) -> float | None:
        """Wait for a reply stamped after Unix time `t`; returns its delay after `t`, or None."""
        deadline = time.monotonic() + timeout
        while True:
            later = [ts for ts, _ in self.replies() if ts > t]
            if later:
                return min(later) - t
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return None
            time.sleep(0.05)

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> None:
        self.proc.stop()


# ---------------------------------------------------------------------- iperf3


def wait_tcp_listening(ns: Namespace, port: int, timeout: float = 5.0,
                       proc: LabProcess | None = None) -> None:
    """Wait until something listens on TCP `port` in `ns` (asks `ss`, never connects: a probe
    connection would use up an `iperf3 -s -1`)."""
    deadline = time.monotonic() + timeout
    while True:
        cp = ns.run(["ss", "-H", "-l", "-t", "-n", f"sport = :{port}"], check=False)
        if cp.returncode == 0 and cp.stdout.strip():
            return
        if proc is not None and proc.poll() is not None:
            raise NetLabError(f"{proc.argv} exited with {proc.poll()} before listening:\n{proc.output()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.output()}" if proc is not None else ""
            raise NetLabError(f"nothing listening on TCP port {port} in {ns.name} after {timeout}s{extra}")
        time.sleep(0.05)


@dataclass
class IperfResult:
    bits_per_second: float      # as measured by the receiving end
    sent_bytes: int
    received_bytes: int
    retransmits: int | None
    reverse: bool
    raw: dict

    @property
    def mbps(self) -> float:
        return self.bits_per_second / 1e6

    def __str__(self) -> str:
        direction = "server->client" if self.reverse else "client->server"
        return (f"{direction}: {self.mbps:.1f} Mbit/s, {self.received_bytes} bytes received, "
                f"retransmits {self.retransmits}")


class IperfError(AssertionError):
    pass


def iperf3(server_ns: Namespace, client_ns: Namespace, server_addr: str, *, reverse: bool = False,
           seconds: float = 2.0, port: int = IPERF_PORT) -> IperfResult:
    """One TCP run of `seconds` between `client_ns` and `iperf3 -s -1 -B server_addr` in
    `server_ns` (reverse: the server sends). Raises IperfError (with both sides' output) when
    the run fails."""
    server = server_ns.popen(["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)])
    try:
        wait_tcp_listening(server_ns, port, proc=server)
        argv = ["iperf3", "-c", server_addr, "-p", str(port), "-t", str(seconds), "-J",
                "--connect-timeout", "3000"]
        if reverse:
            argv.append("-R")
        try:
            cp = client_ns.run(argv, check=False, timeout=seconds + 15.0)
        except NetLabError as exc:
            raise IperfError(f"iperf3 client hung: {exc}\nserver output:\n{server.output()}") from exc
        try:
            data = json.loads(cp.stdout)
        except ValueError:
            data = {}
        if cp.returncode != 0 or "error" in data or "end" not in data:
            raise IperfError(
                f"iperf3 {' '.join(argv)} failed ({cp.returncode}): {data.get('error', '')}\n"
                f"client stdout: {cp.stdout[-3000:]}\nclient stderr: {cp.stderr[-2000:]}\n"
                f"server output:\n{server.output()[-3000:]}"
            )
        end = data["end"]
        recv, sent = end.get("sum_received", {}), end.get("sum_sent", {})
        return IperfResult(
            bits_per_second=float(recv.get("bits_per_second", 0.0)),
            sent_bytes=int(sent.get("bytes", 0)),
            received_bytes=int(recv.get("bytes", 0)),
            retransmits=sent.get("retransmits"),
            reverse=reverse,
            raw=data,
        )
    finally:
        try:
            server.wait(3.0)
        except subprocess.TimeoutExpired:
            pass
        server.stop()


def link_stats(ns: Namespace, dev: str) -> dict:
    """Kernel counters of `dev` ({"rx": {"packets", "bytes", ...}, "tx": {...}})."""
    info = json.loads(ns.ip("-s", "-j", "link", "show", "dev", dev).stdout)[0]
    return info["stats64"]


# ---------------------------------------------------------------- echo servers (threads of the test)


def _serve_in_thread(lab: NetLab, loop: Callable[[threading.Event], None]) -> None:
    stop = threading.Event()
    t = threading.Thread(target=loop, args=(stop,), daemon=True)
    t.start()
    lab.defer(lambda: (stop.set(), t.join(2)))


def udp_echo(lab: NetLab, ns: Namespace, addr: tuple[str, int]) -> None:
    """A UDP echo server on `addr` in `ns`, served by a thread of this process until the lab
    closes (IPv6 when the host has a ':')."""
    sock = ns.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(addr)

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if select.select([sock], [], [], 0.1)[0]:
                    data, peer = sock.recvfrom(65535)
                    sock.sendto(data, peer)
            except (OSError, ValueError):  # the lab closed the socket
                return

    _serve_in_thread(lab, loop)


def tcp_echo(lab: NetLab, ns: Namespace, addr: tuple[str, int]) -> None:
    """A TCP echo server on `addr` in `ns`: one thread per connection, until the lab closes."""
    listener = ns.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(addr)
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if not select.select([listener], [], [], 0.1)[0]:
                    continue
                conn, _ = listener.accept()
            except (OSError, ValueError):
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    _serve_in_thread(lab, loop)
