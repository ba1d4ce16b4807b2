"""A small network lab for tests: throwaway network namespaces, veth pairs, processes and sockets
inside them, and cleanup that always runs.

Nothing here touches the root namespace's network configuration: every link is created with both
ends placed in namespaces the lab created (a veth is created directly inside its first namespace,
its peer end directly inside the second), and every namespace is deleted on close.

    with NetLab() as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, addrs_a=["10.201.1.1/24"], addrs_b=["10.201.1.2/24"])
        proc = b.popen(["wireguard-go", "-f", "wgt0"], log=True)
        b.run(["ip", "addr", "show"])
        sock = a.socket(socket.AF_INET, socket.SOCK_DGRAM)   # a socket living in namespace a
        with a.entered():                                      # this thread is inside a for a while
            ...

Everything a lab creates (namespaces, processes, sockets, log files, callbacks registered with
`defer`) is undone by `close()` in reverse order of creation, whatever happened before; `close()`
is idempotent and is also run at interpreter exit for labs that were never closed. Namespace names
carry the creating pid (wgpyt-<pid>-<token>-<tag>-<rand>); when a run is killed outright (SIGKILL,
no cleanup possible), the next NetLab deletes its leftovers (`sweep_stale`: creator pid dead),
never touching a live concurrent run's. The pytest fixture `netlab` (tests/netns/conftest.py)
wraps this and skips when the machine cannot run it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

PREFIX = "wgpyt-"
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
IFNAMSIZ = 15  # usable characters in an interface name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetLabError(RuntimeError):
    pass


def missing_requirements(tools: Iterable[str] = ("ip",), need_tun: bool = False) -> str | None:
    """Why this machine cannot run a lab (None when it can): not root, a tool missing, or no TUN."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return "missing tools: " + ", ".join(missing)
    if need_tun and not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def random_suffix(n: int = 6) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def unique_ifname(prefix: str) -> str:
    """An interface name unlikely to collide with a concurrent test's. Matters for names that leak
    out of the namespace, e.g. wireguard-go's /var/run/wireguard/IFNAME.sock is a file shared by
    all namespaces."""
    name = prefix + random_suffix(8)
    return name[:IFNAMSIZ]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 10.0,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise NetLabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and cp.returncode != 0:
        raise NetLabError(
            f"command failed ({cp.returncode}): {' '.join(argv)}\n"
            f"stdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
        )
    return cp


class LabProcess:
    """A process started by the lab. `output()` returns what it wrote so far (when started with
    log=True: stdout and stderr go to a temporary file, readable at any time)."""

    def __init__(self, popen: subprocess.Popen, argv: list[str], logfile: str | None) -> None:
        self.popen = popen
        self.argv = argv
        self.logfile = logfile

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def output(self) -> str:
        if self.logfile is None:
            return ""
        try:
            with open(self.logfile, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM its process group, then SIGKILL after `timeout`; always reaps it."""
        p = self.popen
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                except PermissionError:
                    p.send_signal(sig)
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(Exception):
            p.wait(0.1)
        # Anything left in its group (it may have forked children) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


class Namespace:
    """A network namespace made by a NetLab (named PREFIX + tag + random suffix)."""

    def __init__(self, lab: "NetLab", name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.name)

    # ---- commands

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (bounded by `timeout`)."""
        return _run(self.exec_argv(argv), check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NAME ARGS...`"""
        return _run(["ip", "-n", self.name, *args], check=check)

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log: bool = True) -> LabProcess:
        """Start a background process inside the namespace. It is stopped on lab close."""
        return self.lab.popen(self.exec_argv(argv), env=env, log=log)

    # ---- links and addresses

    def link_up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def addr_add(self, dev: str, cidr: str, *extra: str) -> None:
        args = ["addr", "add", cidr, "dev", dev, *extra]
        if ":" in cidr and "nodad" not in extra:
            args.append("nodad")  # usable at once: no duplicate address detection delay
        self.ip(*args)

    def link_address(self, dev: str) -> str:
        """The link-layer (MAC) address of `dev`."""
        return json.loads(self.ip("-j", "link", "show", "dev", dev).stdout)[0]["address"]

    def link_exists(self, dev: str) -> bool:
        return self.ip("link", "show", "dev", dev, check=False).returncode == 0

    def wait_for_link(self, dev: str, timeout: float = 5.0, proc: LabProcess | None = None) -> None:
        """Wait until `dev` exists in the namespace (e.g. a TUN a daemon creates). Fails early if
        `proc` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            if self.link_exists(dev):
                return
            if proc is not None and proc.poll() is not None:
                raise NetLabError(
                    f"{proc.argv} exited with {proc.poll()} before {dev} appeared in {self.name}:\n"
                    f"{proc.output()}"
                )
            if time.monotonic() > deadline:
                extra = f"\nprocess output:\n{proc.output()}" if proc is not None else ""
                raise NetLabError(f"{dev} did not appear in {self.name} within {timeout}s{extra}")
            time.sleep(0.02)

    # ---- entering from this process

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the duration of the block (setns on
        the current thread only; other threads are unaffected), and back afterwards. Sockets
        created inside stay in this namespace after the block ends."""
        with open("/proc/thread-self/ns/net", "rb") as orig, open(self.path, "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(orig.fileno())

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket created inside this namespace (usable from any thread). Closed on lab close."""
        with self.entered():
            sock = socket.socket(family, type, proto)
        self.lab._track_socket(sock)
        return sock


class NetLab:
    """Creates namespaces, links and processes, and removes all of them on close()."""

    def __init__(self, prefix: str = PREFIX, sweep: bool = True) -> None:
        self.prefix = prefix
        # Names carry our pid, so a later lab can recognise namespaces whose creator died
        # without cleaning up (SIGKILL, power loss) and remove them (sweep_stale).
        self.token = f"{os.getpid()}-{random_suffix(6)}"
        if sweep:
            sweep_stale(prefix)
        self.namespaces: list[Namespace] = []
        self.processes: list[LabProcess] = []
        self._sockets: list[socket.socket] = []
        self._deferred: list[Callable[[], object]] = []
        self._tmpdir = tempfile.mkdtemp(prefix=f"{prefix}{self.token}-")
        self._lock = threading.Lock()
        self._closed = False
        self.cleanup_errors: list[str] = []
        _open_labs.add(self)

    @property
    def tmpdir(self) -> str:
        """A private directory removed on close (key files, logs)."""
        return self._tmpdir

    # ---- context manager

    def __enter__(self) -> "NetLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- creation

    def netns(self, tag: str = "") -> Namespace:
        """A new namespace with its loopback up."""
        tag = "".join(c for c in tag if c.isalnum())[:8]
        name = f"{self.prefix}{self.token}-{tag + '-' if tag else ''}{random_suffix(4)}"
        ns = Namespace(self, name)
        # Registered before creation: close() then deletes even a half-created namespace.
        self.namespaces.append(ns)
        _run(["ip", "netns", "add", name])
        ns.link_up("lo")
        return ns

    def veth(self, a: Namespace, b: Namespace, *, addrs_a: Sequence[str] = (),
             addrs_b: Sequence[str] = (), name_a: str | None = None, name_b: str | None = None,
             up: bool = True, static_neighbors: bool = True) -> tuple[str, str]:
        """A veth pair with one end in `a`, the other in `b` (created there directly, never in the
        root namespace), addresses assigned and links up. Returns (name in a, name in b).

        static_neighbors: add permanent ARP/NDP entries for the other end's addresses. Without
        them the first IPv6 packet over a fresh veth waits about 1 s (the first neighbour
        solicitation is lost while the link settles, and the retransmit timer is 1 s)."""
        name_a = name_a or unique_ifname("vetha")
        name_b = name_b or unique_ifname("vethb")
        _run(["ip", "-n", a.name, "link", "add", name_a, "type", "veth",
              "peer", "name", name_b, "netns", b.name])
        for cidr in addrs_a:
            a.addr_add(name_a, cidr)
        for cidr in addrs_b:
            b.addr_add(name_b, cidr)
        if static_neighbors:
            mac_a, mac_b = a.link_address(name_a), b.link_address(name_b)
            for cidr in addrs_b:
                a.ip("neigh", "replace", cidr.split("/")[0], "lladdr", mac_b, "dev", name_a, "nud", "permanent")
            for cidr in addrs_a:
                b.ip("neigh", "replace", cidr.split("/")[0], "lladdr", mac_a, "dev", name_b, "nud", "permanent")
        if up:
            a.link_up(name_a)
            b.link_up(name_b)
        return name_a, name_b

    def popen(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log: bool = True) -> LabProcess:
        """Start a background process (in its own process group); stopped on close()."""
        logfile = None
        out = subprocess.DEVNULL
        if log:
            fd, logfile = tempfile.mkstemp(prefix="proc-", suffix=".log", dir=self._tmpdir)
            out = fd
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        finally:
            if log:
                os.close(fd)
        proc = LabProcess(p, list(argv), logfile)
        self.processes.append(proc)
        return proc

    def defer(self, fn: Callable[[], object]) -> None:
        """Run `fn` on close (before namespaces are deleted; last registered runs first)."""
        self._deferred.append(fn)

    def _track_socket(self, sock: socket.socket) -> None:
        self._sockets.append(sock)

    # ---- cleanup

    def close(self) -> None:
        """Stop processes, close sockets, run deferred callbacks, delete namespaces (and with
        them every link inside), remove the temporary directory. Never raises; problems are
        collected in `cleanup_errors`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _open_labs.discard(self)

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # cleanup must go on
                self.cleanup_errors.append(f"{what}: {exc!r}")

        for proc in reversed(self.processes):
            attempt(f"stop {proc.argv}", proc.stop)
        for sock in reversed(self._sockets):
            attempt("close socket", sock.close)
        for fn in reversed(self._deferred):
            attempt(f"deferred {fn!r}", fn)
        for ns in reversed(self.namespaces):
            attempt(f"delete {ns.name}", lambda ns=ns: self._delete_netns(ns))
        attempt("remove tmpdir", lambda: shutil.rmtree(self._tmpdir, ignore_errors=True))

    @staticmethod
    def _delete_netns(ns: Namespace) -> None:
        delete_netns(ns.name)


def delete_netns(name: str) -> None:
    """Kill every process inside namespace `name`, delete its links, then the namespace."""
    if not os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
        return

    def pids() -> list[int]:
        out = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    # Anything still running inside (e.g. a daemon that forked away from our process group):
    # SIGTERM first so daemons can clean up (wireguard-go removes its UAPI socket), then SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = pids()
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 1.0
        while pids() and time.monotonic() < deadline:
            time.sleep(0.02)
    # Delete the links explicitly (frees their names at once), then the namespace.
    links = _run(["ip", "-n", name, "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            dev = parts[1].strip().split("@")[0]
            if dev != "lo":
                _run(["ip", "-n", name, "link", "del", dev], check=False)
    _run(["ip", "netns", "del", name])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named PREFIX<pid>-... whose creating process no longer exists (left by
    a test run that was killed). Namespaces of live processes (concurrent runs) are left alone.
    Returns the names deleted."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(Exception):
            delete_netns(name)
            removed.append(name)
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            pid = name[len(prefix):].split("-", 1)[0]
            if name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return removed


_open_labs: "set[NetLab]" = set()  # strong refs: a forgotten lab is still cleaned at exit


@atexit.register
def _close_leftover_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


@contextlib.contextmanager
def netlab(prefix: str = PREFIX) -> Iterator[NetLab]:
    lab = NetLab(prefix)
    try:
        yield lab
    finally:
        lab.close()
