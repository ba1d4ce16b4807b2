"""The userspace contract (docs: /work/shared/reference/wireguard.md, "The userspace contract"):
wgpy-daemon must be driven by `wg` and `wg-quick` exactly like wireguard-go.

1. wg-quick: WG_QUICK_USERSPACE_IMPLEMENTATION=wgpy-daemon `wg-quick up` brings the interface up
   with its addresses and peer (traffic flows); `wg-quick down` removes it and the daemon exits.
2. Daemon lifecycle: background start returns only when the TUN and the socket exist; socket and
   log permissions; no key material in the log; clean exit on SIGTERM/SIGINT, on link deletion
   and on socket removal; a second daemon for the same name and invalid names fail in one line.
3. UAPI abuse: malformed hex, unknown keys, over-long lines, half-open clients, garbage bytes,
   connection floods get errno replies or a closed connection; the tunnel keeps passing traffic
   and the configuration is unchanged; a set request is all or nothing.

Daemons started in the background escape the lab's process groups: every test registers (with
lab.defer) a clean-up that kills any `wgpy-daemon IFNAME` process and removes the interface's
socket and log file; deleting the namespace kills whatever is left inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import time

import pytest

from tunnel.keys import encode_base64_key, generate_psk

from . import uapi_client
from .netlab import Namespace, NetLab, missing_requirements, unique_ifname
from .uapi_client import UapiClient
from .wg_peers import SOCKET_DIR, WGPY_DAEMON, Keys, PeerConf, WgInterface

pytestmark = pytest.mark.netns

LOG_DIR = "/var/log/wgpy"

# Outer (veth) and inner (tunnel) addresses; every test has its own namespaces.
A_OUT, B_OUT = "10.203.0.1", "10.203.0.2"
A_IN4, B_IN4 = "10.204.0.1", "10.204.0.2"
A_IN6, B_IN6 = "fd00:204::1", "fd00:204::2"


# ---------------------------------------------------------------------------- helpers


def _need(*tools: str) -> None:
    reason = missing_requirements(("ip", *tools), need_tun=True)
    if reason:
        pytest.skip(reason)
    if not os.access(WGPY_DAEMON, os.X_OK):
        pytest.skip(f"{WGPY_DAEMON} not installed (make venv)")


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as exited)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def daemon_pids(ifname: str) -> list[int]:
    """Live processes whose command line is `... wgpy-daemon [-f] IFNAME` (what `pgrep -f
    "wgpy-daemon IFNAME"` finds, without matching other names that merely start alike)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if (argv and argv[-1] == ifname and os.path.basename(argv[0]) != "ip"
                and any(os.path.basename(a) == "wgpy-daemon" for a in argv)
                and _alive(int(entry))):
            pids.append(int(entry))
    return pids


def _wait_until(pred, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _socket_path(ifname: str) -> str:
    return os.path.join(SOCKET_DIR, f"{ifname}.sock")


def _log_path(ifname: str) -> str:
    return os.path.join(LOG_DIR, f"{ifname}.log")


def _read(path: str) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _cleanup_ifname(ifname: str) -> None:
    """Kill every `wgpy-daemon IFNAME`, then remove its socket and log file."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
        pids = daemon_pids(ifname)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _wait_until(lambda: not any(_alive(p) for p in pids), grace)
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(_socket_path(ifname)).st_mode):
            os.unlink(_socket_path(ifname))
    with contextlib.suppress(OSError):
        os.unlink(_log_path(ifname))


def _new_ifname(lab: NetLab, prefix: str) -> str:
    """A fresh interface name (socket and log files are shared by all namespaces) whose daemon,
    socket and log are removed when the lab closes, pass or fail."""
    ifname = unique_ifname(prefix)
    lab.defer(lambda: _cleanup_ifname(ifname))
    return ifname


def _run_in(ns: Namespace, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run in `ns` with extra environment. stdout/stderr are pipes: a daemon that keeps them
    open after backgrounding itself makes this time out (and the test fail)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(ns.exec_argv(argv), env=full_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _write_conf(lab: NetLab, ifname: str, text: str) -> str:
    path = os.path.join(lab.tmpdir, f"{ifname}.conf")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _assert_one_line_error(cp: subprocess.CompletedProcess[str], what: str) -> None:
    out = (cp.stdout or "") + (cp.stderr or "")
    assert cp.returncode == 1, f"{what}: exit {cp.returncode}, expected 1\n{out}"
    msg = out.strip()
    assert msg, f"{what}: no message"
    assert "\n" not in msg, f"{what}: message is not one line:\n{out}"
    assert "Traceback" not in out, f"{what}: traceback:\n{out}"


def _addresses(ns: Namespace, dev: str) -> set[str]:
    info = json.loads(ns.ip("-j", "addr", "show", "dev", dev).stdout)
    return {f"{a['local']}/{a['prefixlen']}" for i in info for a in i.get("addr_info", [])}


def _start_fg(lab: NetLab, ns: Namespace, prefix: str) -> WgInterface:
    """A foreground wgpy-daemon (`-f`, LOG_LEVEL=debug, output captured) with its socket up."""
    ifname = _new_ifname(lab, prefix)
    return WgInterface(lab, ns, "wgpy", ifname=ifname).start()


def _wait_exit(proc, timeout: float = 5.0) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------------------- 1. wg-quick


def test_wg_quick_up_down(netlab):
    _need("wg", "wg-quick", "wireguard-go", "ping")
    lab = netlab
    a_ns, b_ns = lab.netns("quick"), lab.netns("peer")
    lab.veth(a_ns, b_ns, addrs_a=[f"{A_OUT}/24"], addrs_b=[f"{B_OUT}/24"])
    ifname = _new_ifname(lab, "wgq")
    keys = Keys()

    peer = WgInterface(lab, b_ns, "wireguard-go").start()
    peer.setconf(listen_port=51821, peers=[PeerConf(keys.public_b64, [f"{A_IN4}/32", f"{A_IN6}/128"])])
    peer.address(f"{B_IN4}/24", f"{B_IN6}/64")

    conf = (
        "[Interface]\n"
        f"PrivateKey = {keys.private_b64}\n"
        f"Address = {A_IN4}/24, {A_IN6}/64\n"
        "ListenPort = 51820\n"
        "\n[Peer]\n"
        f"PublicKey = {peer.keys.public_b64}\n"
        f"AllowedIPs = {B_IN4}/32, {B_IN6}/128\n"
        f"Endpoint = {B_OUT}:51821\n"
    )
    path = _write_conf(lab, ifname, conf)
    env = {"WG_QUICK_USERSPACE_IMPLEMENTATION": WGPY_DAEMON, "LOG_LEVEL": "debug"}

    up = _run_in(a_ns, ["wg-quick", "up", path], env=env, timeout=20)
    log = lambda: f"\nwg-quick: {up.stdout}{up.stderr}\ndaemon log:\n{_read(_log_path(ifname))}"  # noqa: E731
    assert up.returncode == 0, f"wg-quick up failed ({up.returncode}){log()}"

    pids = daemon_pids(ifname)
    assert len(pids) == 1, f"expected one `wgpy-daemon {ifname}` process, found {pids}{log()}"
    assert a_ns.link_exists(ifname)
    flags = json.loads(a_ns.ip("-j", "link", "show", "dev", ifname).stdout)[0]["flags"]
    assert "UP" in flags, flags
    assert {f"{A_IN4}/24", f"{A_IN6}/64"} <= _addresses(a_ns, ifname), log()

    show = a_ns.run(["wg", "show", ifname], check=False)
    assert show.returncode == 0, show.stderr + log()
    assert f"peer: {peer.keys.public_b64}" in show.stdout, show.stdout
    assert a_ns.run(["wg", "show", ifname, "listen-port"]).stdout.strip() == "51820"
    assert a_ns.run(["wg", "show", ifname, "private-key"]).stdout.strip() == keys.private_b64

    for dst in (B_IN4, B_IN6):
        r = a_ns.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", dst], check=False, timeout=15)
        assert r.returncode == 0, f"ping {dst} through the tunnel failed:\n{r.stdout}{r.stderr}{log()}{peer.log()}"

    down = _run_in(a_ns, ["wg-quick", "down", path], env=env, timeout=20)
    assert down.returncode == 0, f"wg-quick down failed ({down.returncode}): {down.stdout}{down.stderr}{log()}"
    assert not a_ns.link_exists(ifname), "wg-quick down left the link"
    assert _wait_until(lambda: not any(_alive(p) for p in pids), 5.0), \
        f"wgpy-daemon {pids} still running 5 s after wg-quick down{log()}"
    assert not os.path.exists(_socket_path(ifname)), f"socket left behind after wg-quick down{log()}"


# ---------------------------------------------------------------------------- 2. lifecycle


def test_background_start_permissions_and_log(netlab):
    _need("wg")
    lab = netlab
    ns = lab.netns("bg")
    ifname = _new_ifname(lab, "wgb")
    sock = _socket_path(ifname)

    r = _run_in(ns, [WGPY_DAEMON, ifname], env={"LOG_LEVEL": "debug"})
    # Checked at once: the command must not return before both exist.
    try:
        sock_st = os.lstat(sock)
    except FileNotFoundError:
        sock_st = None
    link_there = ns.link_exists(ifname)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}{r.stderr}"
    assert "Traceback" not in r.stdout + r.stderr
    assert sock_st is not None and stat.S_ISSOCK(sock_st.st_mode), "socket missing when wgpy-daemon returned"
    assert link_there, "TUN device missing when wgpy-daemon returned"
    assert stat.S_IMODE(sock_st.st_mode) == 0o700, oct(sock_st.st_mode)
    dir_st = os.stat(SOCKET_DIR)
    assert stat.S_IMODE(dir_st.st_mode) == 0o755, oct(dir_st.st_mode)
    pids = daemon_pids(ifname)
    assert len(pids) == 1, pids

    log_path = _log_path(ifname)
    log_st = os.stat(log_path)
    assert stat.S_ISREG(log_st.st_mode)
    assert stat.S_IMODE(log_st.st_mode) == 0o600, oct(log_st.st_mode)

    keys, peer, psk = Keys(), Keys(), generate_psk()
    conf = (
        f"[Interface]\nPrivateKey = {keys.private_b64}\nListenPort = 51830\n"
        f"\n[Peer]\nPublicKey = {peer.public_b64}\nPresharedKey = {encode_base64_key(psk)}\n"
        f"AllowedIPs = 10.204.9.0/24\nEndpoint = 10.203.9.9:51831\n"
    )
    ns.run(["wg", "setconf", ifname, _write_conf(lab, ifname, conf)])
    assert ns.run(["wg", "show", ifname, "private-key"]).stdout.strip() == keys.private_b64
    # A refused request carrying key material before its bad line (logged as refused).
    reply = uapi_client.request(sock, (f"set=1\nprivate_key={keys.private.hex()}\n"
                                       f"public_key={peer.public.hex()}\npreshared_key={psk.hex()}\n"
                                       "listen_port=99999\n\n").encode())
    assert reply.errno == -22, reply
    # A protocol error right after a key.
    reply = uapi_client.request(sock, f"{keys.private.hex()}\n\n".encode())
    assert reply.closed or (reply.errno or 0) < 0, reply

    assert _wait_until(lambda: os.path.getsize(log_path) > 0, 2.0), "LOG_LEVEL=debug log is empty"
    text = _read(log_path)
    for name, secret in (("private key (base64)", keys.private_b64), ("private key (hex)", keys.private.hex()),
                         ("preshared key (base64)", encode_base64_key(psk)), ("preshared key (hex)", psk.hex())):
        assert secret not in text and secret.upper() not in text, f"{name} in {log_path}:\n{text}"

    # Background daemon, link deleted (what `wg-quick down` does) -> it exits, socket removed.
    ns.ip("link", "del", ifname)
    assert _wait_until(lambda: not any(_alive(p) for p in pids), 5.0), \
        f"daemon still running after `ip link del`:\n{_read(log_path)}"
    assert not os.path.exists(sock), "socket left behind"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_foreground_exits_cleanly_on_signal(netlab, signame):
    _need()
    ns = netlab.netns("sig")
    wg = _start_fg(netlab, ns, "wgs")
    assert ns.link_exists(wg.ifname)
    os.kill(wg.proc.pid, getattr(signal, signame))
    code = _wait_exit(wg.proc)
    out = wg.log()
    assert code == 0, f"exit code {code} after {signame}:\n{out}"
    assert "Traceback" not in out, out
    assert not os.path.exists(wg.socket_path), "socket left behind"
    assert not ns.link_exists(wg.ifname), "link left behind"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_background_exits_cleanly_on_signal(netlab, signame):
    _need()
    ns = netlab.netns("bgsig")
    ifname = _new_ifname(netlab, "wgs")
    r = _run_in(ns, [WGPY_DAEMON, ifname], env={"LOG_LEVEL": "debug"})
    assert r.returncode == 0, r.stdout + r.stderr
    pids = daemon_pids(ifname)
    assert len(pids) == 1, pids
    os.kill(pids[0], getattr(signal, signame))
    assert _wait_until(lambda: not _alive(pids[0]), 5.0), f"still running after {signame}"
    log = _read(_log_path(ifname))
    assert "Traceback" not in log, log
    assert not os.path.exists(_socket_path(ifname)), "socket left behind"
    assert not ns.link_exists(ifname), "link left behind"


def test_exits_when_link_deleted(netlab):
    _need()
    ns = netlab.netns("linkdel")
    wg = _start_fg(netlab, ns, "wgl")
    ns.ip("link", "del", wg.ifname)
    code = _wait_exit(wg.proc)
    assert code == 0, f"exit code {code} after `ip link del`:\n{wg.log()}"
    assert not os.path.exists(wg.socket_path), "socket left behind"


def test_exits_when_socket_removed(netlab):
    _need()
    ns = netlab.netns("sockrm")
    wg = _start_fg(netlab, ns, "wgr")
    os.unlink(wg.socket_path)
    code = _wait_exit(wg.proc)
    assert code == 0, f"exit code {code} after removing the socket:\n{wg.log()}"
    assert not ns.link_exists(wg.ifname), "link left behind"
    assert not os.path.exists(wg.socket_path)


def test_second_daemon_same_name_fails_without_disturbing_first(netlab):
    _need("wg")
    lab = netlab
    ns, other = lab.netns("first"), lab.netns("second")
    first = _start_fg(lab, ns, "wgd")
    ifname = first.ifname
    first.wg("set", ifname, "listen-port", "51840")
    ino = os.lstat(first.socket_path).st_ino

    cases = [
        ("same namespace, background", ns, [WGPY_DAEMON, ifname]),
        ("same namespace, foreground", ns, [WGPY_DAEMON, "-f", ifname]),
        ("other namespace, background", other, [WGPY_DAEMON, ifname]),
        ("other namespace, foreground", other, [WGPY_DAEMON, "-f", ifname]),
    ]
    for what, where, argv in cases:
        r = _run_in(where, argv, env={"LOG_LEVEL": "debug"})
        _assert_one_line_error(r, f"second daemon ({what})")
        assert first.proc.poll() is None, f"first daemon exited after second daemon ({what}):\n{first.log()}"
        st = os.lstat(first.socket_path)
        assert st.st_ino == ino, f"socket replaced by second daemon ({what})"
        assert ns.link_exists(ifname), f"first daemon's link gone after second daemon ({what})"
        assert first.wg("show", ifname, "listen-port").stdout.strip() == "51840", what
        assert not other.link_exists(ifname), f"second daemon left a link behind ({what})"
    # Still fully working: a set and a get, and only one daemon for the name.
    first.wg("set", ifname, "listen-port", "51841")
    assert first.dump()["listen_port"] == 51841
    assert daemon_pids(ifname) == [first.proc.pid]


@pytest.mark.parametrize("name", ["a" * 20, "a" * 16, "wg/x", "..", "wg:0", "wg 0", ""])
@pytest.mark.parametrize("foreground", [False, True], ids=["bg", "fg"])
def test_invalid_ifname(netlab, name, foreground):
    _need()
    ns = netlab.netns("badname")
    argv = [WGPY_DAEMON, *(["-f"] if foreground else []), name]
    netlab.defer(lambda: _cleanup_ifname(name))
    r = _run_in(ns, argv)
    _assert_one_line_error(r, f"invalid name {name!r}")
    assert not os.path.lexists(_socket_path(name)), "socket created for an invalid name"
    assert ns.ip("-o", "link", "show").stdout.count("\n") == 1, ns.ip("-o", "link", "show").stdout  # only lo


# ---------------------------------------------------------------------------- 3. UAPI abuse

# Counters and handshake times move with traffic; everything else is configuration.
_VOLATILE = {"last_handshake_time_sec", "last_handshake_time_nsec", "tx_bytes", "rx_bytes"}


def _config(path: str) -> list[tuple[str, str]]:
    reply = uapi_client.get(path)
    assert reply.complete and reply.errno == 0, reply
    return [(k, v) for k, v in reply.pairs() if k not in _VOLATILE]


def _ping_counts(output: str) -> tuple[int, int]:
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", output)
    assert m, output
    return int(m.group(1)), int(m.group(2))


def test_uapi_abuse(netlab):
    """Abuse the UAPI socket while a ping runs through the tunnel: every bad request gets an
    errno reply or a closed connection, others are served meanwhile, the configuration does not
    change, no packet is lost to it."""
    _need("wg", "wireguard-go", "ping")
    lab = netlab
    a_ns, b_ns = lab.netns("abuse"), lab.netns("peer")
    lab.veth(a_ns, b_ns, addrs_a=[f"{A_OUT}/24"], addrs_b=[f"{B_OUT}/24"])
    a = _start_fg(lab, a_ns, "wga")
    b = WgInterface(lab, b_ns, "wireguard-go").start()
    a.setconf(listen_port=51820, peers=[b.peer_conf([f"{B_IN4}/32"], f"{B_OUT}:51821")])
    b.setconf(listen_port=51821, peers=[a.peer_conf([f"{A_IN4}/32"], f"{A_OUT}:51820")])
    a.address(f"{A_IN4}/24")
    b.address(f"{B_IN4}/24")
    warm = a_ns.run(["ping", "-n", "-c", "2", "-i", "0.2", "-W", "3", B_IN4], check=False, timeout=15)
    assert warm.returncode == 0, f"tunnel not working before the abuse:\n{warm.stdout}{a.log()}{b.log()}"

    path = a.socket_path
    ifname = a.ifname
    showconf_before = a.wg("showconf", ifname).stdout
    config_before = _config(path)
    assert ("listen_port", "51820") in config_before

    # 80 pings over 4 s; abuse rounds (~0.5 s each) run back to back until the ping ends.
    count, interval = 80, 0.05
    pinger = a_ns.popen(["ping", "-n", "-i", str(interval), "-c", str(count), "-W", "1", B_IN4])
    started = time.monotonic()

    problems: list[str] = []
    held: list[UapiClient] = []  # half-open connections, kept open through all the rounds

    def expect_errno(what: str, data: bytes, want: int | None = None, allow_close: bool = False) -> None:
        """`want`: that errno exactly; None: any negative errno. allow_close: a closed
        connection without a reply is also fine."""
        try:
            reply = uapi_client.request(path, data, timeout=3.0)
        except OSError as exc:
            problems.append(f"{what}: cannot connect/send: {exc!r}")
            return
        if reply.timed_out:
            problems.append(f"{what}: no reply and no close within 3 s (got {reply.data[:80]!r})")
        elif not reply.complete:
            if not allow_close:
                problems.append(f"{what}: connection closed without a reply")
        elif reply.errno is None or reply.errno >= 0 or (want is not None and reply.errno != want):
            problems.append(f"{what}: reply {reply.data[:80]!r}, expected errno={want or '<negative>'}")

    def check_config(what: str) -> None:
        try:
            now = _config(path)
        except (AssertionError, OSError) as exc:
            problems.append(f"after {what}: get failed: {exc!r}")
            return
        if now != config_before:
            problems.append(f"after {what}: configuration changed:\n  before {config_before}\n  after  {now}")

    bad_hex = "z" * 64
    b_hex = b.keys.public.hex()
    new_peer_hex = Keys().public.hex()

    def abuse_round() -> None:
        # -- malformed hex
        expect_errno("malformed private_key hex", f"set=1\nprivate_key={bad_hex}\n\n".encode(), -22)
        expect_errno("63-digit private_key", f"set=1\nprivate_key={'a' * 63}\n\n".encode(), -22)
        expect_errno("malformed public_key hex", f"set=1\npublic_key={bad_hex}\n\n".encode(), -22)
        expect_errno("malformed preshared_key hex",
                     f"set=1\npublic_key={b_hex}\npreshared_key={'g' * 64}\n\n".encode(), -22)
        # -- unknown keys
        expect_errno("unknown device key", b"set=1\nfoo_bar=1\n\n", -22)
        expect_errno("unknown peer key", f"set=1\npublic_key={new_peer_hex}\nbogus=1\n\n".encode(), -22)
        expect_errno("peer key before public_key", b"set=1\nendpoint=1.2.3.4:5\n\n", -22)
        check_config("malformed and unknown keys")

        # -- transactional: a good line then a bad one changes nothing
        expect_errno("replace_peers then bad listen_port", b"set=1\nreplace_peers=true\nlisten_port=abc\n\n", -22)
        check_config("replace_peers + bad line")
        expect_errno("listen_port then bad private_key",
                     f"set=1\nlisten_port=51999\nprivate_key={bad_hex}\n\n".encode(), -22)
        check_config("listen_port + bad line")
        expect_errno("allowed_ip then bad allowed_ip",
                     f"set=1\npublic_key={b_hex}\nallowed_ip=10.99.0.0/16\nallowed_ip=10.99.0.0/99\n\n".encode(), -22)
        check_config("allowed_ip + bad allowed_ip")
        expect_errno("remove then unknown key", f"set=1\npublic_key={b_hex}\nremove=true\nbogus=1\n\n".encode(), -22)
        check_config("remove + bad line")
        expect_errno("new peer then bad endpoint",
                     f"set=1\npublic_key={new_peer_hex}\nallowed_ip=10.98.0.0/16\nendpoint=nohost\n\n".encode(), -22)
        check_config("new peer + bad endpoint")

        # -- over-long lines (4 KiB limit): EPROTO or a closed connection
        expect_errno("5000-byte line in a set", b"set=1\n" + b"a" * 5000 + b"\n\n", -71, allow_close=True)
        expect_errno("5000-byte value", b"set=1\nlisten_port=" + b"1" * 5000 + b"\n\n", -71, allow_close=True)
        expect_errno("5000-byte operation line", b"x" * 5000 + b"\n\n", -71, allow_close=True)
        expect_errno("5000 bytes, no newline ever", b"set=1\nlisten_port=" + b"9" * 5000, -71, allow_close=True)
        expect_errno("64 KiB without newline", b"\xff" * 65536, None, allow_close=True)

        # -- wg rejects bad input itself and fails cleanly
        for argv in (["wg", "set", ifname, "peer", "not-base64!!"],
                     ["wg", "set", ifname, "peer", b.keys.public_b64, "allowed-ips", "10.0.0.0/99"],
                     ["wg", "set", ifname, "listen-port", "notaport"]):
            # (not "99999": wg itself wraps that to 34463 and sends it, a valid port)
            r = a_ns.run(argv, check=False, timeout=5)
            if r.returncode == 0 or not r.stderr.strip():
                problems.append(f"{' '.join(argv[1:])}: exit {r.returncode}, stderr {r.stderr!r}")

        # -- while the half-open clients (opened before the first round) still wait,
        # other clients are served
        reply = uapi_client.get(path, timeout=2.0)
        if not (reply.complete and reply.errno == 0 and ("listen_port", "51820") in reply.pairs()):
            problems.append(f"get while half-open clients wait: {reply}")
        for sub in (["show", ifname], ["showconf", ifname]):
            try:
                r = a_ns.run(["wg", *sub], check=False, timeout=3)
                if r.returncode != 0:
                    problems.append(f"wg {sub[0]} while half-open clients wait: exit {r.returncode} {r.stderr}")
            except Exception as exc:  # timeout: the daemon is stuck on the half-open client
                problems.append(f"wg {sub[0]} while half-open clients wait: {exc}")
        expect_errno("bad set while half-open clients wait", b"set=1\nlisten_port=x\n\n", -22)

        # -- garbage, NUL, non-UTF-8
        expect_errno("NUL and non-UTF-8 as operation", b"\x00\xff\xfe\x80garbage\x00\n\n", None, allow_close=True)
        expect_errno("get=1 with NUL", b"get=1\x00\n\n", None, allow_close=True)
        expect_errno("NUL in a value", b"set=1\nlisten_port=5\x00\n\n", -22)
        expect_errno("non-UTF-8 in a value", b"set=1\nlisten_port=\xff\xfe\n\n", -22)
        expect_errno("non-UTF-8 key", b"set=1\n\xc3\x28\xa0=1\n\n", -22)
        expect_errno("NUL in a key name", b"set=1\nprivate\x00_key=" + b"a" * 64 + b"\n\n", -22)
        rnd = random.Random(20240519)
        for i in range(5):
            junk = bytes(rnd.getrandbits(8) for _ in range(3000))
            expect_errno(f"random bytes #{i}", junk, None, allow_close=True)
        check_config("garbage")

        # -- two requests in one write: two replies
        with UapiClient(path) as c:
            c.send(b"get=1\n\nset=1\nlisten_port=zz\n\n")
            r1, r2 = c.reply(), c.reply()
            if r1.errno != 0 or r2.errno != -22:
                problems.append(f"pipelined get+bad set: replies {r1} / {r2}")

        # -- 100 rapid connect/disconnects, plus clients that leave before the reply or mid-request
        for i in range(100):
            try:
                UapiClient(path, timeout=2.0).close()
            except OSError as exc:
                problems.append(f"rapid connect #{i}: {exc!r}")
                break
        for i in range(20):
            with contextlib.suppress(OSError), UapiClient(path) as c:
                c.send(b"get=1\n\n")
        for i in range(20):
            with contextlib.suppress(OSError), UapiClient(path) as c:
                c.send(b"set=1\nlisten_port=1\nreplace_peers=true\n")  # never finished: never applied
        time.sleep(0.2)
        check_config("connection churn")

        # -- more connections than the daemon serves at once (4 half-open ones held):
        # each one is served or closed, none is left hanging; once they go, service resumes
        flood: list[UapiClient] = []
        served = refused = 0
        try:
            for _ in range(40):
                flood.append(UapiClient(path))
            time.sleep(0.1)
            for i, c in enumerate(flood):
                r = c.request(b"get=1\n\n", timeout=1.0)
                if r.timed_out:
                    problems.append(f"flood connection #{i}: neither served nor closed within 1 s")
                    break
                if r.complete and r.errno == 0:
                    served += 1
                else:
                    refused += 1
        finally:
            for c in flood:
                c.close()
        ok = _wait_until(lambda: uapi_client.get(path, timeout=1.0).errno == 0, 3.0, interval=0.1)
        if not ok:
            problems.append(f"get does not work after the flood is closed ({served} served, {refused} refused)")

    rounds = 0
    try:
        # Half-open clients: a set that never ends, a set line without the empty line, a get
        # without its empty line, silence. Kept open through all the rounds.
        for data in (b"set=1\nlisten_port=1", b"set=1\nlisten_port=1\n", b"get=1\n", b""):
            c = UapiClient(path)
            if data:
                c.send(data)
            held.append(c)
        time.sleep(0.1)
        while True:
            abuse_round()
            rounds += 1
            if problems or pinger.poll() is not None or time.monotonic() - started > 20:
                break
    finally:
        for c in held:
            c.close()
        abuse_time = time.monotonic() - started

    time.sleep(0.2)  # the daemon sees the half-open clients go
    check_config("half-open clients closed")
    assert a.proc.poll() is None, f"wgpy-daemon died during the abuse:\n{a.log()}"
    try:
        pinger.wait(timeout=count * interval + 10)
    except subprocess.TimeoutExpired:
        pytest.fail("ping did not finish")
    sent, received = _ping_counts(pinger.output())
    showconf_after = a.wg("showconf", ifname).stdout
    log = a.log()

    assert not problems, "UAPI abuse:\n- " + "\n- ".join(problems) + f"\n\ndaemon log (tail):\n{log[-4000:]}"
    assert showconf_after == showconf_before
    assert sent == count and received >= 0.9 * count, \
        f"ping through the tunnel during {rounds} abuse rounds ({abuse_time:.1f} s): {received}/{sent}\n{pinger.output()}"
    assert rounds >= 2, f"only {rounds} abuse round(s) while the ping ran"
    assert a.keys.private.hex() not in log and a.keys.private_b64 not in log


def test_requests_before_a_protocol_error_are_answered(netlab):
    """`get=1` then garbage in one write: the get is answered, then errno=-71, then close."""
    from .wg_peers import WgInterface
    import socket as _socket

    ns = netlab.netns("ord")
    iface = WgInterface(netlab, ns, "wgpy").start()
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(iface.socket_path)
    s.sendall(b"get=1\n\nBOGUS\n\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.count(b"errno=0\n\n") == 1 and data.endswith(b"errno=-71\n\n"), data
