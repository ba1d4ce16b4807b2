"""Host network changes for `wgpy up`, each recorded with its exact inverse.

The journal is written to /run/wgpy/net-INODE/IFNAME.json (0600) after every step, so `wgpy down`,
or a failed `up` cleaning up after itself, undoes precisely what was done and nothing else, even
after a crash. INODE is the network namespace's (os.stat("/proc/self/ns/net")): /run is shared by
every namespace, and each has its own interfaces, so each gets its own journals.
Commands are run with `ip`, `sysctl` and `nft`, like wg-quick; their errors are reported verbatim.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

STATE_DIR = "/run/wgpy"
CAP_NET_ADMIN = 12
RESOLV_CONF = "/etc/resolv.conf"


class NetError(Exception):
    pass


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back for the block (delivered when it ends): a change to
    the host and its journal entry happen both or neither."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetError(f"`{argv[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetError(f"`{' '.join(argv)}` timed out") from None
    if check and r.returncode != 0:
        raise NetError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def netns_inode() -> int:
    """This process's network namespace, as the inode of /proc/self/ns/net."""
    return os.stat("/proc/self/ns/net").st_ino


def state_dir() -> str:
    """Where this network namespace's journals live: /run/wgpy/net-INODE."""
    return os.path.join(STATE_DIR, f"net-{netns_inode()}")


@dataclass
class Journal:
    ifname: str
    state_dir: str = ""  # default: this network namespace's (state_dir())
    undo: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = state_dir()

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, f"{self.ifname}.json")

    @classmethod
    def load(cls, ifname: str, state_dir: str = "") -> "Journal | None":
        j = cls(ifname, state_dir)
        try:
            with open(j.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NetError(f"{j.path}: unreadable state: {exc}") from None
        j.undo, j.meta = list(data.get("undo", [])), dict(data.get("meta", {}))
        return j

    def save(self) -> None:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"undo": self.undo, "meta": self.meta}, f)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.state_dir.startswith(STATE_DIR + "/net-"):
            try:
                os.rmdir(self.state_dir)  # the namespace's last tunnel: leave nothing behind
            except OSError:
                pass

    def record(self, entry: dict) -> None:
        self.undo.append(entry)
        self.save()

    def cmd(self, argv: list[str], undo: list[str] | None, *, input: str | None = None,
            may_fail: bool = False) -> None:
        """Run `argv` and record `undo` (run in reverse order by `rollback`). `may_fail`: the undo
        may find its work already done (e.g. an address gone with its link).

        The undo is written down before the command runs (as one that may fail, since the
        command may not have run), so a SIGKILL between the two, which signals_deferred cannot
        hold back, still leaves `wgpy down` a record of it; once the command succeeded the entry
        gets its real `may_fail`, and a command that failed takes its entry back out."""
        with signals_deferred():
            if undo is None:
                run(argv, input=input)
                return
            self.record({"cmd": undo, "may_fail": True})
            try:
                run(argv, input=input)
            except BaseException:
                self.undo.pop()
                self.save()
                raise
            if not may_fail:
                self.undo[-1] = {"cmd": undo}
                self.save()

    def rollback(self) -> list[str]:
        """Undo everything, newest first. Returns what could not be undone (never raises)."""
        problems = []
        while self.undo:
            entry = self.undo.pop()
            try:
                if "cmd" in entry:
                    r = run(entry["cmd"], check=False)
                    if r.returncode != 0 and not entry.get("may_fail"):
                        problems.append(f"`{' '.join(entry['cmd'])}`: {(r.stderr or r.stdout).strip()}")
                elif "restore_file" in entry:
                    restore_file(entry)
                elif "sysctl" in entry:
                    write_sysctl(entry["sysctl"], entry["value"])
            except (OSError, NetError) as exc:
                problems.append(str(exc))
            self.save()
        return problems


# ---------------------------------------------------------------- sysctl

def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(name: str) -> str:
    with open(_sysctl_path(name)) as f:
        return f.read().strip()


def write_sysctl(name: str, value: str) -> None:
    with open(_sysctl_path(name), "w") as f:
        f.write(value)


def set_sysctl(journal: Journal, name: str, value: str) -> None:
    old = read_sysctl(name)
    if old == value:
        return
    with signals_deferred():
        write_sysctl(name, value)
        journal.record({"sysctl": name, "value": old})


# ---------------------------------------------------------------- files (resolv.conf)

def replace_file(journal: Journal, path: str, content: str) -> None:
    """Write `content` to `path`, remembering exactly what was there (a file with its content and
    mode, a symlink, or nothing). Writes in place when `path` is a regular file, so a bind mount
    (as `ip netns exec` makes for /etc/netns/NS/resolv.conf) keeps working."""
    backup_dir = journal.state_dir
    os.makedirs(backup_dir, mode=0o700, exist_ok=True)
    entry: dict = {"restore_file": path}
    if os.path.islink(path):
        entry["symlink"] = os.readlink(path)
        journal.record(entry)
        os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return
    if os.path.exists(path):
        backup = os.path.join(backup_dir, f"{journal.ifname}.{os.path.basename(path)}.orig")
        shutil.copyfile(path, backup)
        entry["backup"] = backup
        entry["mode"] = os.stat(path).st_mode & 0o7777
        journal.record(entry)
        with open(path, "r+") as f:
            f.seek(0)
            f.write(content)
            f.truncate()
        return
    entry["absent"] = True
    journal.record(entry)
    with open(path, "w") as f:
        f.write(content)


def restore_file(entry: dict) -> None:
    path = entry["restore_file"]
    if "symlink" in entry:
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(entry["symlink"], path)
    elif entry.get("absent"):
        if os.path.lexists(path):
            os.unlink(path)
    else:
        with open(entry["backup"], "rb") as src:
            data = src.read()
        with open(path, "r+b") as f:
            f.seek(0)
            f.write(data)
            f.truncate()
        os.chmod(path, entry["mode"])
        os.unlink(entry["backup"])


# ---------------------------------------------------------------- queries

def link_exists(ifname: str) -> bool:
    """Whether this network namespace has a link `ifname` (asked over netlink: /sys may show
    another namespace's links, e.g. after `nsenter --net` without remounting it)."""
    return link_kind(ifname) is not None


def link_kind(ifname: str) -> str | None:
    """None if there is no such link in this namespace; else its kind as `ip -d link` names it
    ("tun" for a TUN device such as wgpy-daemon's and wireguard-go's, "wireguard" for the
    kernel's, "veth", "bridge"..., "" for a plain device such as lo)."""
    r = run(["ip", "-d", "-j", "link", "show", "dev", ifname], check=False)
    if r.returncode != 0:
        if "does not exist" in r.stderr or "Cannot find device" in r.stderr:
            return None
        raise NetError(f"`ip link show dev {ifname}` failed: {(r.stderr or r.stdout).strip()}")
    try:
        info = json.loads(r.stdout)[0].get("linkinfo", {})
    except (ValueError, IndexError, AttributeError):
        return ""
    return str(info.get("info_kind", ""))


def probe_socket(path: str) -> tuple[str, int | None]:
    """A UAPI socket's state: ("absent", None), ("stale", None) (nobody listens: its daemon
    died), ("live", PID of the process that listens) or ("other", None) (not a socket).
    Raises OSError (e.g. EACCES when not root)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent", None
    if not stat.S_ISSOCK(st.st_mode):
        return "other", None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return "stale", None
    except FileNotFoundError:
        return "absent", None
    except socket.timeout:
        return "live", None  # a backlog full of clients: someone listens
    else:
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return "live", struct.unpack("3i", creds)[0] or None
    finally:
        probe.close()


def remove_stale_socket(path: str) -> bool:
    """Remove `path` if it is a UAPI socket nobody listens on (left by a daemon that was killed).
    True if it was removed."""
    state, _ = probe_socket(path)
    if state != "stale":
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


def same_netns(pid: int) -> bool | None:
    """Whether process `pid` lives in this network namespace (None: cannot tell)."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def have_net_admin() -> bool:
    """Root, or CAP_NET_ADMIN in the effective set: what creating links and routes takes."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def is_permission_error(exc: BaseException) -> bool:
    """An OSError or a command's failure that comes from missing privileges."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.EACCES, errno.EPERM)
    text = str(exc)
    return any(s in text for s in ("Operation not permitted", "Permission denied", "[Errno 13]", "[Errno 1]"))


def route_mtu_towards(address: str | None, mark: int = 0) -> int | None:
    """The MTU wg-quick would use: the route's own mtu, else its device's (for `address`, or the
    default route when None). `mark`: the route packets with that fwmark take (a full tunnel's
    own packets, which policy routing keeps out of the tunnel)."""
    if address is None:
        r = run(["ip", "route", "show", "default"], check=False)
        words = r.stdout.split("\n", 1)[0].split()
    else:
        r = run(["ip", "route", "get", address] + (["mark", str(mark)] if mark else []), check=False)
        words = r.stdout.split()
    if r.returncode != 0 or not words:
        return None
    if "mtu" in words and words.index("mtu") + 1 < len(words):
        try:
            return int(words[words.index("mtu") + 1])
        except ValueError:
            pass
    if "dev" in words and words.index("dev") + 1 < len(words):
        dev = words[words.index("dev") + 1]
        try:
            with open(f"/sys/class/net/{dev}/mtu") as f:
                return int(f.read())
        except (OSError, ValueError):
            return None
    return None


def route_exists_on(ifname: str, network: str, family: str) -> bool:
    r = run(["ip", family, "route", "show", "dev", ifname, "match", network], check=False)
    return bool(r.stdout.strip())


def table_in_use(table: int) -> bool:
    for fam in ("-4", "-6"):
        if run(["ip", fam, "route", "show", "table", str(table)], check=False).stdout.strip():
            return True
    return False
