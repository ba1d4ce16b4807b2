"""`wgpy bench [SCENARIO...]` (also `python -m bench`): the benchmark suite.

    wgpy bench                          every scenario, 3 alternating rounds, summary table
    wgpy bench tunnel latency --rounds 5
    wgpy bench --quick --out DIR        short rounds; DIR/results.json, report.md and PNG charts
    wgpy bench --compare OLD.json       run, then a before/after table against an earlier run
    wgpy bench --compare OLD.json NEW.json   just the table, no run
    wgpy bench SCENARIO --help          what a scenario measures and its options
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import results as res
from . import tunnel
from .suite import SCENARIOS, STANDARD, Options, run

PROG = "wgpy bench"
# Options that only some scenarios use: shown in `wgpy bench SCENARIO --help` for those.
SCENARIO_OPTIONS = {"core": {"sizes", "packets"}, "scale": {"peers", "packets"}, "bridge": {"methods", "against"},
                    "tunnel": {"against", "without"}, "latency": {"pings", "against", "without"}, "multihop": set(), "flood": {"flood_rate"}}


def _int_list(lo: int, hi: int, what: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
        if not values or any(not lo <= v <= hi for v in values):
            raise argparse.ArgumentTypeError(f"each of the {what} must be {lo}..{hi}")
        return values
    return parse


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _methods(text: str) -> tuple[str, ...]:
    known = Options().methods
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in methods if m not in known]
    if not methods or bad:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(bad) or '(none given)'}; "
                                         f"choose from {', '.join(known)}")
    return methods


def _features(text: str) -> tuple[str, ...]:
    features = tuple(f.strip() for f in text.replace(",", "+").split("+") if f.strip())
    bad = [f for f in features if f not in tunnel.FEATURES]
    if not features or bad:
        raise argparse.ArgumentTypeError(f"unknown feature {', '.join(bad) or '(none given)'}; "
                                         f"choose from {', '.join(tunnel.FEATURES)}")
    return features


def build_parser(scenario: str | None = None) -> argparse.ArgumentParser:
    """The whole command's parser, or (with `scenario`) the one `wgpy bench SCENARIO --help` shows."""
    if scenario is None:
        listing = "\n".join(f"  {s.name:<9} {s.summary}" for s in SCENARIOS.values())
        p = argparse.ArgumentParser(
            prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Measure wgpy against references run on this machine in the same run (wireguard-go, "
                        "shadowsocks-libev, the raw AEAD, the bare link), in alternating rounds.",
            epilog=f"scenarios (default: all of them, in this order):\n{listing}\n\n"
                   "`wgpy bench SCENARIO --help` tells what a scenario measures. Figures are ratios to the "
                   "reference of the same round; run on a quiet machine (2 cores: anything else running skews them).")
        wanted = set().union(*SCENARIO_OPTIONS.values())
    else:
        s = SCENARIOS[scenario]
        p = argparse.ArgumentParser(prog=f"{PROG} {scenario}", description=s.description,
                                    usage=f"{PROG} {scenario} [SCENARIO ...] [options]")
        wanted = SCENARIO_OPTIONS[scenario]
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"what to run: {', '.join(SCENARIOS)} (default: all)" if scenario is None
                   else argparse.SUPPRESS)
    p.add_argument("--rounds", type=_positive, help="alternating rounds; medians and spread over them (default 3)")
    p.add_argument("--seconds", type=_positive, help="iperf3 seconds per direction (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="short rounds (1 round, 2 s, fewer sizes, peers and methods): a smoke run, not figures")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of the table")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="write DIR/results.json, DIR/report.md and PNG charts (charts need wgpy[bench])")
    p.add_argument("--compare", nargs="+", metavar="FILE",
                   help="OLD.json: run, then show the change against that earlier run; "
                        "OLD.json NEW.json: compare two results files without running")
    if "against" in wanted:
        p.add_argument("--against", metavar="CHECKOUT",
                       help="tunnel, bridge, latency: also measure the wgpy of another checkout (e.g. the parent commit) "
                            "as wgpy@base")
    if "without" in wanted:
        p.add_argument("--without", action="append", type=_features, metavar="FEATURE[+FEATURE]",
                       help="tunnel, latency: also measure a wgpy pair with these features off, to see "
                            f"what they buy (repeatable; {', '.join(tunnel.FEATURES)})")
    if "sizes" in wanted:
        p.add_argument("--sizes", type=_int_list(28, 65535, "sizes"), help="core: packet sizes (default 64,512,1420)")
    if "packets" in wanted:
        p.add_argument("--packets", type=_positive, help="core, scale: packets per measurement (default 50000)")
    if "peers" in wanted:
        p.add_argument("--peers", type=_int_list(1, 100_000, "peer counts"),
                       help="scale: peer counts (default 1,10,100,1000,10000)")
    if "methods" in wanted:
        p.add_argument("--methods", type=_methods,
                       help=f"bridge: methods (default all: {','.join(Options().methods)})")
    if "pings" in wanted:
        p.add_argument("--pings", type=_positive, help="latency: pings per figure (default 40)")
    if "flood_rate" in wanted:
        p.add_argument("--flood-rate", dest="flood_rate", type=_positive,
                       help="flood: handshake initiations per second (default 50000)")
    # Before the suite: `wgpy bench tunnel --bridge` / `--multihop` meant these scenarios.
    if scenario is None:
        p.add_argument("--bridge", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--multihop", action="store_true", help=argparse.SUPPRESS)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    named = [a for a in argv if a in SCENARIOS]
    if any(a in ("-h", "--help") for a in argv) and len(named) == 1:
        build_parser(named[0]).parse_args([a for a in argv if a != named[0]])  # prints help, exits
    p = build_parser()
    args = p.parse_args(argv)
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario {', '.join(map(repr, bad))}; choose from {', '.join(SCENARIOS)}")
    if args.bridge or args.multihop:
        args.scenarios = [("bridge" if args.bridge else "multihop") if s == "tunnel" else s
                          for s in args.scenarios] or ["bridge" if args.bridge else "multihop"]
    if args.compare and len(args.compare) > 2:
        p.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a directory")
    return args


def options(args: argparse.Namespace) -> Options:
    opts = Options.quick_defaults() if args.quick else Options()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options)
             if getattr(args, f.name, None) is not None and f.name != "quick"}
    if "without" in given:
        given["without"] = tuple(given["without"])
    return dataclasses.replace(opts, **given)


def _write_out(out: Path, results: res.Results, compare: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results.write_json(out / "results.json")
    written = ["results.json"]
    charts: list[str] = []
    try:
        from . import charts as charting

        charts = charting.draw(results, out)
    except ImportError:  # charts imports matplotlib lazily; this is for a broken install
        pass
    except Exception as exc:  # a chart that cannot be drawn must not lose the measured figures
        from .charts import ChartsUnavailable

        if not isinstance(exc, ChartsUnavailable):
            exc = ChartsUnavailable(f"charts skipped: {type(exc).__name__}: {exc}")
        print(f"{PROG}: {exc}", file=sys.stderr)
    report = res.markdown_report(results, charts, {s.name: s.description for s in SCENARIOS.values()})
    if compare:
        report += "\n## Against the earlier run\n\n" + compare + "\n"
    (out / "report.md").write_text(report)
    written += ["report.md", *charts]
    print(f"{PROG}: wrote {', '.join(str(out / w) for w in written)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        old = res.load(args.compare[0]) if args.compare else None
        new = res.load(args.compare[1]) if args.compare and len(args.compare) == 2 else None
    except res.ResultsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if new is not None:  # two files: compare only
        print(res.compare_table(old, new))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "compare.md").write_text(res.compare_table(old, new, markdown=True) + "\n")
        return 0
    names = args.scenarios or list(STANDARD)
    results = run(list(dict.fromkeys(names)), options(args))
    compare_md = res.compare_table(old, results, markdown=True) if old is not None else None
    if args.json:
        print(json.dumps(results.as_dict(), indent=2))
    else:
        print(res.summary_table(results))
        if old is not None:
            print()
            print(res.compare_table(old, results))
    if args.out:
        _write_out(args.out, results, compare_md)
    if not results.samples:
        print(f"{PROG}: nothing was measured (see the notes above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
