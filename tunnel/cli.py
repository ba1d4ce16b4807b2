"""`wgpy` command line. Key commands behave byte-for-byte like `wg genkey|pubkey|genpsk`."""

from __future__ import annotations

import argparse
import os
import stat
import sys

from . import keys

PROG = "wgpy"


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


def _quick(action: str, args: argparse.Namespace) -> int:
    from . import config, quick

    try:
        ifname = getattr(quick, action)(args.target)
    except config.ConfigError as exc:
        print(str(exc), file=sys.stderr)  # already FILE:LINE: message, one per line
        return 1
    except quick.UpError as exc:
        raise UsageError(str(exc)) from None
    print(f"wgpy: {ifname} is {action}", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    return _quick("up", args)


def cmd_down(args: argparse.Namespace) -> int:
    return _quick("down", args)


def cmd_show(args: argparse.Namespace) -> int:
    import time

    from . import show, uapi

    names = [args.ifname] if args.ifname else uapi.list_interfaces()
    statuses = []
    for name in names:
        try:
            statuses.append(uapi.get_status(name))
        except uapi.ControlError as exc:
            if args.ifname:
                raise UsageError(str(exc)) from None
            print(f"{PROG}: {exc}", file=sys.stderr)  # a dead socket: show the others
    now = time.time()
    if args.json:
        print(show.as_json(statuses, now))
    else:
        print("\n\n".join(show.format_text(st, now) for st in statuses))
    return 0


SET_USAGE = ("usage: wgpy set IFNAME peer PUBKEY bridge URI|FILE|off|via PUBKEY|off "
             "[peer PUBKEY bridge URI|FILE|off|via PUBKEY|off ...]")


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
    """Bridges and vias on a running interface; everything else stays with `wg set`."""
    from . import quick, uapi
    from .netconfig import NetError

    words = args.settings
    if not words or len(words) % 4:
        raise UsageError(SET_USAGE)
    changes: list[tuple[bytes, str, object]] = []
    for i in range(0, len(words), 4):
        peer_word, key_text, what, value = words[i:i + 4]
        if peer_word != "peer" or what not in ("bridge", "via"):
            raise UsageError(SET_USAGE)
        try:
            key = keys.decode_base64_key(key_text)
        except keys.KeyError_:  # not echoed: swapped arguments would put a URI here
            raise UsageError(f"argument {i + 3}: not a base64 WireGuard public key") from None
        if what == "bridge":
            changes.append((key, what, _bridge_value(value)))
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


def cmd_bridge(args: argparse.Namespace) -> int:
    rest = args.bridge_args
    if not rest or rest[0] != "serve":
        raise UsageError("usage: wgpy bridge serve --listen URI [--listen URI ...] [--allow HOST:PORT ...]")
    from bridge.serve import main as serve_main

    return serve_main(rest[1:])


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Userspace WireGuard.")
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
    sp.set_defaults(func=cmd_up)
    sp = sub.add_parser("down", help="take down a tunnel brought up by `wgpy up`, restoring the host")
    sp.add_argument("target", metavar="CONFIG|NAME")
    sp.set_defaults(func=cmd_down)
    sp = sub.add_parser("show", help="show interfaces like `wg show`")
    sp.add_argument("ifname", nargs="?", metavar="IFNAME")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_show)
    sp = sub.add_parser("set", help="bridge a peer of a running interface, or reach it through another: "
                        "`wgpy set IFNAME peer PUBKEY bridge URI|off|via PUBKEY|off`")
    sp.add_argument("ifname", metavar="IFNAME")
    sp.add_argument("settings", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_set)
    sp = sub.add_parser("bridge", help="bridge servers: `wgpy bridge serve --listen URI ...`", add_help=False)
    sp.add_argument("bridge_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bridge)
    sp = sub.add_parser("bench", help="benchmarks (see `wgpy bench --help`)", add_help=False)
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
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
