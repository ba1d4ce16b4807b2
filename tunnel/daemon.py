"""`wgpy-daemon [-f|--foreground] IFNAME`: the wireguard-go contract, so `wg` and `wg-quick`
(WG_QUICK_USERSPACE_IMPLEMENTATION=wgpy-daemon) drive wgpy unchanged.

Without -f the command returns once the TUN device and /var/run/wireguard/IFNAME.sock exist, with
the daemon running in the background and logging to /var/log/wgpy/IFNAME.log. It exits on
SIGINT/SIGTERM, when the link is deleted, or when its socket file is removed. The log file is
created only when there is something to log (LOG_LEVEL, below).

`--kill-switch` (what `wgpy up` passes for `KillSwitch = on`): keep the first-hop sets of the
nftables table `wgpy up` made (tunnel/killswitch.py) equal to where the daemon sends. The daemon
never creates or removes that table: it outlives the daemon until `wgpy down`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import trio

from . import killswitch
from .engine import Engine
from .tun import valid_ifname

LOG_DIR = "/var/log/wgpy"
# As wireguard-go, `verbose` and `debug` are one level: everything, handshake events included.
LEVELS = {"debug": logging.DEBUG, "verbose": logging.DEBUG, "error": logging.ERROR, "silent": logging.CRITICAL + 1}


def _log_level() -> int:
    return LEVELS.get(os.environ.get("LOG_LEVEL", "error").strip().lower(), logging.ERROR)


class _LazyFileHandler(logging.StreamHandler):
    """Appends to `path` (0600), opened at the first record: a daemon with nothing to say leaves
    no empty file behind."""

    def __init__(self, path: str) -> None:
        super().__init__(None)
        self.path = path
        self.stream = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                os.makedirs(LOG_DIR, mode=0o700, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self.stream = os.fdopen(fd, "a", buffering=1)
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def flush(self) -> None:
        if self.stream is not None:
            super().flush()


def _setup_logging(ifname: str, foreground: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = _LazyFileHandler(os.path.join(LOG_DIR, f"{ifname}.log"))
    handler.setFormatter(logging.Formatter(f"%(asctime)s wgpy({ifname}) %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_log_level())


async def _serve(ifname: str, ready, kill_switch: bool = False) -> int:
    try:
        engine = Engine(ifname)
    except OSError as exc:
        ready(f"{ifname}: {exc.strerror or exc}")
        return 1
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(engine.run)
            except OSError as exc:
                ready(f"{ifname}: {exc.strerror or exc}")
                return 1
            ready(None)
            if kill_switch:
                nursery.start_soon(killswitch.follow, engine)

            async def on_signal():
                async for signum in signals:
                    engine.stop(f"signal {signal.Signals(signum).name}")
                    return

            nursery.start_soon(on_signal)
            # However the engine stops (signal, link deleted, socket removed), we are done.
            await engine.stopped.wait()
            nursery.cancel_scope.cancel()
    logging.getLogger("wgpy").info("%s: stopped (%s)", ifname, engine.exit_reason or "cancelled")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import version
    from .netconfig import have_net_admin

    p = argparse.ArgumentParser(prog="wgpy-daemon", description="Userspace WireGuard interface (wireguard-go compatible).")
    p.add_argument("--version", action="version", version=f"wgpy-daemon {version()}")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    p.add_argument("--kill-switch", action="store_true",
                   help="keep the kill switch's allowed first hops (made by `wgpy up`) up to date")
    p.add_argument("ifname", metavar="IFNAME")
    args = p.parse_args(argv)
    if not valid_ifname(args.ifname):
        print(f"wgpy-daemon: invalid interface name {args.ifname!r}", file=sys.stderr)
        return 1
    if not have_net_admin():
        print("wgpy-daemon: needs root (CAP_NET_ADMIN)", file=sys.stderr)
        return 1
    if args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1":
        _setup_logging(args.ifname, foreground=True)

        def ready(error):
            if error:
                print(f"wgpy-daemon: {error}", file=sys.stderr)

        return trio.run(_serve, args.ifname, ready, args.kill_switch)

    # Background: the child reports readiness (or the error) through a pipe before we return.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg.startswith("ok"):
            return 0
        print(f"wgpy-daemon: {msg.strip() or 'daemon failed to start'}", file=sys.stderr)
        return 1
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging(args.ifname, foreground=False)

    def ready(error):
        nonlocal wfd
        if wfd < 0:
            return
        os.write(wfd, b"ok" if not error else error.encode())
        os.close(wfd)
        wfd = -1

    try:
        code = trio.run(_serve, args.ifname, ready, args.kill_switch)
    except BaseException as exc:  # never die silently in the background
        logging.getLogger("wgpy").exception("daemon crashed")
        ready(f"daemon crashed: {exc}")
        code = 1
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
