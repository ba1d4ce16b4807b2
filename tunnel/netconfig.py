"""Host network changes for `wgpy up`, each recorded with its exact inverse.

The journal is written to /run/wgpy/IFNAME.json (0600) after every step, so `wgpy down`, or a failed
`up` cleaning up after itself, undoes precisely what was done and nothing else, even after a crash.
Commands are run with `ip`, `sysctl` and `nft`, like wg-quick; their errors are reported verbatim.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

STATE_DIR = "/run/wgpy"
RESOLV_CONF = "/etc/resolv.conf"


class NetError(Exception):
    pass


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


@dataclass
class Journal:
    ifname: str
    state_dir: str = STATE_DIR
    undo: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, f"{self.ifname}.json")

    @classmethod
    def load(cls, ifname: str, state_dir: str = STATE_DIR) -> "Journal | None":
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

    def record(self, entry: dict) -> None:
        self.undo.append(entry)
        self.save()

    def cmd(self, argv: list[str], undo: list[str] | None, *, input: str | None = None,
            may_fail: bool = False) -> None:
        """Run `argv`; on success record `undo` (run in reverse order by `rollback`). `may_fail`:
        the undo may find its work already done (e.g. an address gone with its link)."""
        run(argv, input=input)
        if undo is not None:
            self.record({"cmd": undo, "may_fail": may_fail} if may_fail else {"cmd": undo})

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
    return os.path.exists(f"/sys/class/net/{ifname}")


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
