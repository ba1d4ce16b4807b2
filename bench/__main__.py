"""`python -m bench core` (also `wgpy bench core`)."""

from __future__ import annotations

import argparse
import json
import sys

from . import core


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(not 28 <= s <= 65535 for s in sizes):
        raise argparse.ArgumentTypeError("each size must be 28..65535 bytes")
    return sizes


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _with_base(pairs: list[tuple], base: str) -> list[tuple]:
    """Each pair with a wgpy client, followed by the same pair with the other checkout's wgpy."""
    out = []
    for pair in pairs:
        out.append(pair)
        if pair[0] == "wgpy":
            out.append((base, base if pair[1] == "wgpy" else pair[1], *pair[2:]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wgpy bench", description="wgpy benchmarks")
    sub = p.add_subparsers(dest="what", metavar="BENCHMARK")
    sub.required = True
    c = sub.add_parser("core", help="seal/open through the protocol core vs raw AEAD")
    c.add_argument("--sizes", type=_sizes, default=[64, 512, 1420], help="inner packet sizes (default 64,512,1420)")
    c.add_argument("--packets", type=_positive, default=50_000, help="packets per size and run (default 50000)")
    c.add_argument("--batch", type=_positive, default=128, help="packets per batch (default 128)")
    c.add_argument("--repeat", type=_positive, default=3, help="runs; the best is reported (default 3)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t = sub.add_parser("tunnel", help="iperf3 TCP through wgpy and wireguard-go tunnels (root)")
    t.add_argument("--seconds", type=_positive, default=5, help="iperf3 time per direction (default 5)")
    t.add_argument("--bridge", action="store_true",
                   help="instead: through Shadowsocks, wireguard-go+ss-tunnel+ss-server vs wgpy's own bridge")
    t.add_argument("--multihop", action="store_true",
                   help="instead: through two wireguard-go relays, wgpy's nested multihop vs a wireguard-go "
                        "client with the kernel users' layout")
    t.add_argument("--against", metavar="CHECKOUT",
                   help="also measure the wgpy of another checkout (e.g. the previous commit) as wgpy@base")
    t.add_argument("--rounds", type=_positive, default=1,
                   help="measure every pair this many times, alternating (default 1)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.what == "tunnel":
        from . import tunnel

        if args.multihop:
            from . import multihop

            tunnel.require_tools()
            figures = []
            for _ in range(args.rounds):
                for client in ("wireguard-go", "wgpy"):
                    figures.extend(multihop.measure(client, args.seconds))
            if args.json:
                print(json.dumps([f.__dict__ for f in figures], indent=2))
            else:
                print(tunnel.format_table(figures, args.seconds,
                                          f"wireguard-go client via two {multihop.RELAY} relays (multihop)",
                                          f"MTU {multihop.MTU}, two relays"))
            return 0
        if args.bridge:
            pairs = [("wireguard-go", "wireguard-go", "libev"), ("wgpy", "wgpy", "wgpy"),
                     ("wgpy", "wireguard-go", "wgpy+libev"), ("wgpy", "wireguard-go", "libev")]
            reference = "wireguard-go <-> wireguard-go via ss libev"
        else:
            pairs = [("veth", "veth"), ("wireguard-go", "wireguard-go"), ("wgpy", "wgpy"), ("wgpy", "wireguard-go")]
            reference = "wireguard-go <-> wireguard-go"
        if args.against:
            pairs = _with_base(pairs, tunnel.add_checkout(args.against))
        figures = tunnel.run(pairs * args.rounds, args.seconds)
        if args.json:
            print(json.dumps([f.__dict__ for f in figures], indent=2))
        else:
            print(tunnel.format_table(figures, args.seconds, reference))
        return 0
    results = core.run(args.sizes, args.packets, args.batch, args.repeat)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(core.format_table(results, args.packets, args.batch, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
