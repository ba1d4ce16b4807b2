"""`wgpy` command line. Key commands behave byte-for-byte like `wg genkey|pubkey|genpsk`."""

from __future__ import annotations

import argparse
import os
import stat
import sys

from . import keys

PROG = "wgpy"
WAIT_DEFAULT = 15.0  # `wgpy up --wait`: a few handshake retries (one per 5 s)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 1."""


def _write_key(text: str, output: str | None, *, secret: bool) -> None:
    line = text + "\n"
    if output is None:
        # Like wg genkey/genpsk: warn when the secret lands in a file others can read.
        try:
            st = os.fstat(sys.stdout.fileno())
            if secret and stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IRWXO:
                print("Warning: writing to world accessible file.\n"
                      "Consider setting the umask to 077 and trying again.", file=sys.stderr)
        except (OSError, ValueError):
            pass
        sys.stdout.write(line)
        sys.stdout.flush()
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"{output}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # also tightens a file that existed with looser permissions
        os.write(fd, line.encode("ascii"))
    finally:
        os.close(fd)


def cmd_genkey(args: argparse.Namespace) -> int:
    _write_key(keys.encode_base64_key(keys.generate_private_key()), args.output, secret=True)
    return 0


def cmd_genpsk(args: argparse.Namespace) -> int:
    _write_key(keys.encode_base64_key(keys.generate_psk()), args.output, secret=True)
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    # The same steps as wg's pubkey: exactly 44 characters, then only whitespace, then decode.
    data = sys.stdin.buffer.read(1 << 16)
    if len(data) < 44:
        raise UsageError("Key is not the correct length or format")
    if data[44:].strip(b" \t\n\r\v\f"):
        raise UsageError("Trailing characters found after key")
    try:
        private = keys.decode_base64_key(data[:44].decode("ascii"))
    except (UnicodeDecodeError, keys.KeyError_):
        raise UsageError("Key is not the correct length or format") from None
    _write_key(keys.encode_base64_key(keys.public_key(private)), args.output, secret=False)
    return 0


NEEDS_ROOT = "needs root (CAP_NET_ADMIN)"


def _need_root() -> None:
    """The commands that change or read interfaces: one line, before anything is read or done."""
    from .netconfig import have_net_admin

    if not have_net_admin():
        raise UsageError(NEEDS_ROOT)


def _quick(action: str, args: argparse.Namespace) -> int:
    from . import config, quick

    _need_root()
    try:
        ifname = getattr(quick, action)(args.target)
        if action == "up" and getattr(args, "wait", None) is not None:
            print(f"wgpy: {ifname} is up; waiting up to {args.wait:g} s for handshakes", file=sys.stderr)
            quick.wait_for_handshakes(ifname, args.wait)
    except config.ConfigError as exc:
        print(str(exc), file=sys.stderr)  # already FILE:LINE: message, one per line
        return 1
    except quick.Interrupted as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except quick.UpError as exc:
        raise UsageError(str(exc)) from None
    print(f"wgpy: {ifname} is {action}" + (" (handshakes done)" if getattr(args, "wait", None) is not None else ""),
          file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    return _quick("up", args)


def cmd_down(args: argparse.Namespace) -> int:
    return _quick("down", args)


def cmd_show(args: argparse.Namespace) -> int:
    import time

    from . import killswitch, quick, show, uapi

    _need_root()
    one = args.ifname not in (None, "all")  # `wgpy show all` is `wgpy show`, as with wg
    names = [args.ifname] if one else uapi.list_interfaces()
    statuses = []
    failed = False
    for name in names:
        try:
            statuses.append(uapi.get_status(name))
        except uapi.ControlError as exc:
            if one:
                raise UsageError(str(exc)) from None
            print(f"{PROG}: {exc}", file=sys.stderr)  # a dead socket: show the others, then fail
            failed = True
    now = time.time()
    # The kill switch is `wgpy up`'s (its journal) and nftables' (its table), not the daemon's.
    tables = killswitch.list_tables() if statuses else None
    kill_switches = {st.name: quick.kill_switch_status(st.name, tables) for st in statuses}
    if args.json:
        print(show.as_json(statuses, now, kill_switches))
    elif statuses:
        print("\n\n".join(show.format_text(st, now, kill_switches[st.name]) for st in statuses))
    elif not names:  # wg prints a blank line here; say what it means
        print(f"no WireGuard interfaces (no control socket in {uapi.SOCKET_DIR})")
    return 1 if failed else 0


SET_USAGE = ("usage: wgpy set IFNAME peer PUBKEY bridge URI|FILE|off|via PUBKEY|off|obfuscation lwo|off "
             "[peer PUBKEY OPTION VALUE ...]")
SET_OPTIONS = ("bridge", "via", "obfuscation")
OBFUSCATIONS = ("lwo", "off")


def _bridge_value(value: str) -> str | None:
    """A URI as given, or read from a file (like `wg set ... preshared-key FILE`), so that a
    password need not sit in the process list or in wg-quick's echo of its hooks."""
    if value in ("off", ""):
        return None
    if "://" in value:
        return value
    try:
        with open(value, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read(65536).strip()
    except OSError as exc:
        raise UsageError(f"bridge {value!r}: neither a URI nor a readable file: {exc.strerror}") from None
    if not text:
        raise UsageError(f"bridge file {value!r} is empty")
    return text


def cmd_set(args: argparse.Namespace) -> int:
    """Bridges, vias and obfuscation on a running interface; everything else stays with `wg set`."""
    from . import quick, uapi
    from .netconfig import NetError

    _need_root()
    words = args.settings
    if not words or len(words) % 4:
        raise UsageError(SET_USAGE)
    changes: list[tuple[bytes, str, object]] = []
    for i in range(0, len(words), 4):
        peer_word, key_text, what, value = words[i:i + 4]
        if peer_word != "peer" or what not in SET_OPTIONS:
            raise UsageError(SET_USAGE)
        try:
            key = keys.decode_base64_key(key_text)
        except keys.KeyError_:  # not echoed: swapped arguments would put a URI here
            raise UsageError(f"argument {i + 3}: not a base64 WireGuard public key") from None
        if what == "bridge":
            changes.append((key, what, _bridge_value(value)))
            continue
        if what == "obfuscation":
            if value.lower() not in OBFUSCATIONS:
                from .grammar import show

                raise UsageError(f"argument {i + 5}: obfuscation takes lwo or off, not {show(value)}")
            changes.append((key, what, None if value.lower() == "off" else "lwo"))
            continue
        entry = None
        if value != "off":
            try:
                entry = keys.decode_base64_key(value)
            except keys.KeyError_:
                raise UsageError(f"argument {i + 5}: via takes the base64 public key of another peer, or off") from None
        changes.append((key, what, entry))
    try:
        quick.set_peers(args.ifname, changes)
    except (quick.UpError, uapi.ControlError, NetError) as exc:
        raise UsageError(str(exc)) from None
    return 0


BRIDGE_USAGE = ("usage: wgpy bridge serve [--listen URI ...] [--config FILE] [--allow HOST:PORT ...] [-v]\n"
                "  serve: run a bridge server (Shadowsocks, udp2tcp) in front of WireGuard; "
                "`wgpy bridge serve --help` for its options")


def cmd_bridge(args: argparse.Namespace) -> int:
    rest = args.bridge_args
    if rest and rest[0] in ("-h", "--help"):
        print(BRIDGE_USAGE)
        return 0
    if not rest or rest[0] != "serve":
        raise UsageError(BRIDGE_USAGE)
    from bridge.serve import main as serve_main

    return serve_main(rest[1:])


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("wgpy")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Userspace WireGuard.")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, func, helptext in (
        ("genkey", cmd_genkey, "generate a new private key (base64) on stdout"),
        ("genpsk", cmd_genpsk, "generate a new preshared key (base64) on stdout"),
        ("pubkey", cmd_pubkey, "read a private key from stdin, print its public key"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("-o", "--output", metavar="FILE", help="write the key to FILE (created 0600)")
        sp.set_defaults(func=func)
    sp = sub.add_parser("up", help="bring up a tunnel from a wg-quick style config (CONFIG path or NAME)")
    sp.add_argument("target", metavar="CONFIG|NAME", help="a config file, or NAME for /etc/wireguard/NAME.conf")
    sp.add_argument("--wait", nargs="?", type=float, const=WAIT_DEFAULT, default=None, metavar="SECONDS",
                    help="then wait for a handshake with every peer that has an endpoint "
                         f"(default {WAIT_DEFAULT:g} s); exit 1 with the reason if one does not complete")
    sp.set_defaults(func=cmd_up)
    sp = sub.add_parser("down", help="take down a tunnel brought up by `wgpy up`, restoring the host")
    sp.add_argument("target", metavar="CONFIG|NAME")
    sp.set_defaults(func=cmd_down)
    sp = sub.add_parser("show", help="show interfaces like `wg show`")
    sp.add_argument("ifname", nargs="?", metavar="IFNAME|all")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_show)
    sp = sub.add_parser("set", help="bridge a peer of a running interface, reach it through another, or "
                        "obfuscate its datagrams: `wgpy set IFNAME peer PUBKEY bridge URI|off|via PUBKEY|off|"
                        "obfuscation lwo|off`",
                        usage=SET_USAGE[len("usage: "):],
                        description="Change how a peer of a running wgpy-daemon is reached; everything else "
                                    "stays with `wg set`. Several `peer PUBKEY OPTION VALUE` groups go to the "
                                    "daemon in one request, all or nothing.",
                        epilog="peer options: bridge URI|FILE|off (a Shadowsocks or udp-over-tcp bridge, or a file "
                               "holding its URI); via PUBKEY|off (multihop: reach the peer through another "
                               "peer); obfuscation lwo|off (LWO, Mullvad's lightweight WireGuard "
                               "obfuscation, on the UDP port; the peer must use it too)")
    sp.add_argument("ifname", metavar="IFNAME")
    sp.add_argument("settings", nargs=argparse.REMAINDER, metavar="peer PUBKEY OPTION VALUE ...")
    sp.set_defaults(func=cmd_set)
    # prefix_chars: no argument is an option of `bridge` itself, so `--help` and the like reach
    # cmd_bridge (argparse.REMAINDER does not take a first argument that looks like an option).
    sp = sub.add_parser("bridge", help="bridge servers: `wgpy bridge serve --listen URI ...`", add_help=False,
                        prefix_chars="\0")
    sp.add_argument("bridge_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bridge)
    sp = sub.add_parser("bench", help="benchmarks against wireguard-go and the raw AEAD (see `wgpy bench --help`)",
                        add_help=False, prefix_chars="\0")
    sp.add_argument("bench_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from .netconfig import NetError, is_permission_error

        if isinstance(exc, (NetError, OSError)) and is_permission_error(exc):
            print(f"{PROG}: {NEEDS_ROOT}", file=sys.stderr)
            return 1
        if isinstance(exc, NetError):
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
