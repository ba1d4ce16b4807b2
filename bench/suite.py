"""The scenarios of `wgpy bench` and the loop that runs them.

A scenario plans the steps of one round (one step: one subject measured once, e.g. one pair of
daemons through iperf3); the runner repeats the round `rounds` times, so every subject and its
reference alternate and share the machine's good and bad moments. A step that fails is noted
and the run goes on; Ctrl-C stops it with what was measured so far. A scenario whose reference
tool is missing notes it and measures wgpy alone; one that cannot run at all (not root, no
iperf3) says why.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from . import core, flood, latency, multihop, scale, tunnel
from .progress import Progress
from .results import Results, Sample, describe_machine, now_text

WG_GO = "wireguard-go"
WG_GO_PAIR = "wireguard-go <-> wireguard-go"


@dataclass
class Options:
    rounds: int = 3
    seconds: int = 5  # iperf3 time per direction
    quick: bool = False
    sizes: tuple[int, ...] = (64, 512, 1420)
    packets: int = 50_000  # core and scale: packets per measurement
    peers: tuple[int, ...] = (1, 10, 100, 1000, 10_000)
    methods: tuple[str, ...] = ("aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305",
                                "2022-blake3-aes-128-gcm", "2022-blake3-aes-256-gcm", "udp2tcp")
    pings: int = 40
    flood_rate: int = 50_000  # handshake initiations per second in the flood scenario
    against: str | None = None  # another checkout's wgpy, measured as tunnel.BASE
    # tunnel, latency: wgpy pairs with these sets of features off (tunnel.FEATURES),
    # e.g. (("tun-offload",), ("udp-gso", "udp-gro"))
    without: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def quick_defaults(cls) -> "Options":
        return cls(rounds=1, seconds=2, quick=True, sizes=(64, 1420), packets=10_000, peers=(1, 100, 1000),
                   methods=("aes-256-gcm", "udp2tcp"), pings=10, flood_rate=20_000)


@dataclass
class Step:
    what: str
    weight: float  # expected seconds, for the time-left estimate
    run: Callable[[int], list[Sample]]  # round number -> samples


@dataclass
class Scenario:
    name: str
    summary: str  # one line, for `wgpy bench --help`
    description: str  # what it measures against what, for `wgpy bench NAME --help` and the report
    plan: Callable[[Options, Results], list[Step]]


def _lacking(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def _netns_blocker(results: Results, scenario: str, *tools: str) -> bool:
    """True (with a note) when the scenario cannot run here at all."""
    missing = tunnel.missing_tools("ip", "wg", "nft", *tools)
    if missing:
        results.note(scenario, f"skipped: needs {', '.join(missing)} (run as root after `make debs`)")
        return True
    return False


def _figure_samples(scenario: str, subject: str, reference: str, figures, round_: int) -> list[Sample]:
    out = []
    for f in figures:
        out.append(Sample(scenario, subject, f"{f.direction} Mbit/s", f.mbps, round_, reference))
        out.append(Sample(scenario, subject, f"{f.direction} retransmits", f.retransmits, round_, reference, False))
        if f.cpu_s_per_gb is not None:
            out.append(Sample(scenario, subject, f"{f.direction} CPU s/GB", f.cpu_s_per_gb, round_, reference, False))
    rss = [f.rss_mb for f in figures if f.rss_mb is not None]
    if rss:
        out.append(Sample(scenario, subject, "peak RSS MB", max(rss), round_, reference, False))
    anon = [f.anon_mb for f in figures if f.anon_mb is not None]
    if anon:
        out.append(Sample(scenario, subject, "anon RSS MB", max(anon), round_, reference, False))
    return out


# ------------------------------------------------------------------ core

def _plan_core(opts: Options, results: Results) -> list[Step]:
    def step(size: int) -> Step:
        def run(r: int) -> list[Sample]:
            out = []
            for res in core.measure(size, opts.packets, 128):
                metric = f"{size} B Gbit/s"
                out.append(Sample("core", f"raw AEAD {res.op}", metric, res.raw_gbps, r, x=size))
                out.append(Sample("core", f"wgpy {res.op}", metric, res.core_gbps, r, f"raw AEAD {res.op}", x=size))
            return out
        return Step(f"seal and open {size} B packets", 0.4 + opts.packets / 50_000 * 1.5, run)
    results.note("core", f"{opts.packets} packets per size in batches of 128 through two connected Devices in "
                         "memory; reference: one raw ChaCha20-Poly1305 call per packet")
    return [step(s) for s in opts.sizes]


# ------------------------------------------------------------------ tunnel

def _pair_step(scenario: str, left: str, right: str, reference: str, opts: Options,
               bridge: str | None = None, method: str = tunnel.BRIDGE_METHOD) -> Step:
    subject = tunnel.pair_label(left, right, bridge, method)

    def run(r: int) -> list[Sample]:
        return _figure_samples(scenario, subject, reference,
                               tunnel.measure_pair(left, right, opts.seconds, bridge, method), r)
    return Step(subject, 2 * opts.seconds + (6 if bridge else 4), run)


def _plan_tunnel(opts: Options, results: Results) -> list[Step]:
    if _netns_blocker(results, "tunnel", "iperf3"):
        return []
    have_go = not _lacking(WG_GO)
    ref = WG_GO_PAIR if have_go else ""
    steps = [_pair_step("tunnel", "veth", "veth", "", opts)]
    if have_go:
        steps.append(_pair_step("tunnel", WG_GO, WG_GO, "", opts))
    else:
        results.note("tunnel", "wireguard-go not found: the reference pairs are skipped, wgpy is measured alone")
    steps.append(_pair_step("tunnel", "wgpy", "wgpy", ref, opts))
    if have_go:
        steps.append(_pair_step("tunnel", "wgpy", WG_GO, ref, opts))
    if opts.against:
        steps.append(_pair_step("tunnel", tunnel.BASE, tunnel.BASE, ref, opts))
        if have_go:
            steps.append(_pair_step("tunnel", tunnel.BASE, WG_GO, ref, opts))
    for features in opts.without:
        variant = tunnel.add_variant(features)
        steps.append(_pair_step("tunnel", variant, variant, ref, opts))
    results.note("tunnel", "iperf3 TCP, one stream, two namespaces over veth, MTU 1420; reference: "
                           f"{WG_GO_PAIR}; CPU s/GB: both daemons' CPU time per GB moved; RSS: the larger "
                           "daemon's peak; anon RSS: the larger daemon's own memory at the end, without the "
                           "shared libraries' pages")
    return steps


# ------------------------------------------------------------------ bridge

def _plan_bridge(opts: Options, results: Results) -> list[Step]:
    if _netns_blocker(results, "bridge", "iperf3"):
        return []
    missing = _lacking(WG_GO, "ss-server", "ss-tunnel")
    libev = [m for m in opts.methods if m in tunnel.LIBEV_METHODS]
    others = [m for m in opts.methods if m not in tunnel.LIBEV_METHODS]
    if missing:
        results.note("bridge", f"{', '.join(missing)} not found: the wireguard-go + shadowsocks-libev references "
                               "are skipped, wgpy is measured alone")
    refs = {}
    if not missing:
        if others and tunnel.BRIDGE_METHOD not in libev:
            libev.append(tunnel.BRIDGE_METHOD)  # the reference the other methods are compared with
        refs = {m: tunnel.pair_label(WG_GO, WG_GO, "libev", m) for m in libev}
    steps = []
    for method in opts.methods + tuple(m for m in libev if m not in opts.methods):
        ref = refs.get(method, refs.get(tunnel.BRIDGE_METHOD, ""))
        if method in refs:
            steps.append(_pair_step("bridge", WG_GO, WG_GO, "", opts, "libev", method))
        if method in opts.methods:
            steps.append(_pair_step("bridge", "wgpy", "wgpy", ref, opts, "wgpy", method))
            if opts.against:
                steps.append(_pair_step("bridge", tunnel.BASE, tunnel.BASE, ref, opts, "wgpy", method))
    if refs and others:
        results.note("bridge", f"shadowsocks-libev has no {', '.join(others)}: those rows are compared with the "
                               f"libev {tunnel.BRIDGE_METHOD} reference")
    results.note("bridge", "wgpy rows: the client daemon carries its datagrams itself, `wgpy bridge serve` on the "
                           "server; references: wireguard-go through ss-tunnel + ss-server (libev), same method; "
                           "MTU 1500 - 80 - the method's overhead, rounded down to 16")
    return steps


# ------------------------------------------------------------------ multihop

def _plan_multihop(opts: Options, results: Results) -> list[Step]:
    if _netns_blocker(results, "multihop", "iperf3"):
        return []
    have_go = not _lacking(WG_GO)
    relay = WG_GO if have_go else "wgpy"
    if not have_go:
        results.note("multihop", "wireguard-go not found: the relays are wgpy and the wireguard-go client is skipped")
    have_ss = not _lacking("ss-server")
    if not have_ss:
        results.note("multihop", "ss-server not found: the bridged variant is skipped")
    steps = []
    for bridge in (False, True) if have_ss else (False,):
        ref = multihop.label(WG_GO, relay, bridge) if have_go and (not bridge or not _lacking("ss-tunnel")) else ""
        clients = ([WG_GO] if ref else []) + ["wgpy"]
        for client in clients:
            subject = multihop.label(client, relay, bridge)

            def run(r: int, client=client, subject=subject, bridge=bridge, ref=ref) -> list[Sample]:
                figures = multihop.measure(client, opts.seconds, relay, bridge)
                return _figure_samples("multihop", subject, "" if client == WG_GO else ref, figures, r)
            steps.append(Step(subject, 2 * opts.seconds + 8, run))
    results.note("multihop", "client -> entry relay -> exit relay -> destination, four namespaces; the wireguard-go "
                             "client uses the kernel users' layout (the exit's datagrams routed back into the "
                             "interface); CPU and RSS: the client side only")
    return steps


# ------------------------------------------------------------------ scale

def _plan_scale(opts: Options, results: Results) -> list[Step]:
    def step(n: int) -> Step:
        subject = "1 peer" if n == 1 else f"{n} peers"

        def run(r: int) -> list[Sample]:
            seal, open_ = scale.measure(n, opts.packets)
            ref = "1 peer" if n != 1 and 1 in opts.peers else ""
            return [Sample("scale", subject, "seal pkt/s", seal, r, ref, x=n),
                    Sample("scale", subject, "open pkt/s", open_, r, ref, x=n)]
        return Step(f"relay core with {subject}", 0.3 + opts.packets / 50_000 + n / 3000, run)
    results.note("scale", f"a relay's protocol core in memory, 1420-byte packets to and from {scale.ACTIVE} active "
                          "peers among N configured; reference: the same with 1 peer")
    return [step(n) for n in opts.peers]


# ------------------------------------------------------------------ latency

def _plan_latency(opts: Options, results: Results) -> list[Step]:
    if _netns_blocker(results, "latency", "iperf3", "ping"):
        return []
    have_go = not _lacking(WG_GO)
    if not have_go:
        results.note("latency", "wireguard-go not found: the reference pair is skipped")
    ref = WG_GO_PAIR if have_go else ""
    pairs = [("veth", "veth", "")] + ([(WG_GO, WG_GO, "")] if have_go else []) + [
        ("wgpy", "wgpy", ref)]
    if opts.against:
        pairs.append((tunnel.BASE, tunnel.BASE, ref))
    for features in opts.without:
        variant = tunnel.add_variant(features)
        pairs.append((variant, variant, ref))

    def step(left: str, right: str, ref: str) -> Step:
        subject = tunnel.pair_label(left, right)

        def run(r: int) -> list[Sample]:
            idle, loaded, cpu_ms = latency.measure(left, right, opts.seconds, opts.pings)
            samples = [Sample("latency", subject, "idle RTT ms", idle, r, ref, False),
                       Sample("latency", subject, "loaded RTT ms", loaded, r, ref, False)]
            if cpu_ms is not None:
                samples.append(Sample("latency", subject, "idle CPU ms per ping", cpu_ms, r, ref, False))
            return samples
        return Step(f"ping {subject}", opts.pings * 0.1 + 6, run)
    results.note("latency", f"ping every 50 ms ({opts.pings} per figure), average RTT; loaded: during an iperf3 "
                            "TCP transfer a->b through the same tunnel; idle CPU: both tunnel processes' CPU "
                            "time per idle ping")
    return [step(*p) for p in pairs]


# ------------------------------------------------------------------ flood

def _plan_flood(opts: Options, results: Results) -> list[Step]:
    if _netns_blocker(results, "flood", "iperf3"):
        return []
    have_go = not _lacking(WG_GO)
    if not have_go:
        results.note("flood", "wireguard-go not found: the reference pair is skipped")
    pairs = ([(WG_GO, WG_GO, "")] if have_go else []) + [("wgpy", "wgpy", WG_GO_PAIR if have_go else "")]

    def step(left: str, right: str, ref: str) -> Step:
        subject = tunnel.pair_label(left, right)

        def run(r: int) -> list[Sample]:
            m = flood.measure(left, right, opts.seconds, opts.flood_rate)
            out = [Sample("flood", subject, "a->b Mbit/s", m["quiet"], r, ref)]
            for kind in ("random", "replays"):
                out.append(Sample("flood", subject, f"{kind}: flooded a->b Mbit/s", m[kind], r, ref))
                out.append(Sample("flood", subject, f"{kind}: share kept", m[kind] / m["quiet"] if m["quiet"] else 0.0,
                                  r, ref))
            out.append(Sample("flood", subject, "initiations sent /s", m["sent"], r))
            return out
        return Step(f"flood {subject}", 3 * opts.seconds + 8, run)
    results.note("flood", f"handshake initiations at {opts.flood_rate}/s to side b's port during iperf3 a->b: random "
                          "ones with a valid mac1, or one genuine initiation of side a replayed; share kept: flooded / "
                          "unflooded throughput of the same pair and round")
    return [step(*p) for p in pairs]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("core", "seal/open through the protocol core vs raw AEAD, by packet size",
             "Seal and open batches of packets through the sans-IO protocol core, against one raw "
             "ChaCha20-Poly1305 call per packet (cryptography/OpenSSL) in the same round: the share of "
             "the AEAD's speed the core keeps after routing, framing, replay and timer work.", _plan_core),
    Scenario("tunnel", "iperf3 through wgpy and wireguard-go tunnels, and the bare veth (root)",
             "iperf3 TCP both ways between two namespaces: wgpy <-> wgpy, wgpy <-> wireguard-go, "
             "wireguard-go <-> wireguard-go (the reference) and the bare veth (the ceiling); retransmits, "
             "CPU seconds per GB and peak RSS of the daemons.", _plan_tunnel),
    Scenario("bridge", "through every Shadowsocks method and udp-over-tcp vs wireguard-go + libev (root)",
             "WireGuard through a bridge: wgpy's daemon carrier to `wgpy bridge serve`, for every "
             "Shadowsocks method and udp-over-tcp, against wireguard-go through shadowsocks-libev's "
             "ss-tunnel and ss-server with the same method.", _plan_bridge),
    Scenario("multihop", "through two relays, with and without a bridge, vs a wireguard-go client (root)",
             "A tunnel through an entry and an exit relay (wireguard-go) to a destination: wgpy's "
             "nested multihop against a wireguard-go client through the same relays, plain and with a "
             "Shadowsocks bridge in front of the entry.", _plan_multihop),
    Scenario("scale", "packets/s through a relay's core with 1 to 10,000 peers",
             "Packets per second through the protocol core of a relay with N peers configured (16 of "
             "them active), against the same with one peer: per-packet work should not grow with N.",
             _plan_scale),
    Scenario("flood", "throughput kept under a handshake flood, wgpy vs wireguard-go (root)",
             "iperf3 a->b through the tunnel with and without a flood of handshake initiations carrying a "
             "valid mac1 (what anyone who knows the public key can send), wgpy <-> wgpy against "
             "wireguard-go <-> wireguard-go: the share of the throughput each keeps.", _plan_flood),
    Scenario("latency", "ping round trips through the tunnel, idle and under load (root)",
             "Ping RTT through wgpy <-> wgpy and wireguard-go <-> wireguard-go (the reference) and over "
             "the bare veth, idle and during an iperf3 transfer.", _plan_latency),
)}
STANDARD = tuple(SCENARIOS)


def run(names: list[str], opts: Options, quiet: bool = False) -> Results:
    results = Results(machine=describe_machine(), started=now_text(), settings={
        "rounds": opts.rounds, "seconds per direction": opts.seconds, "quick": opts.quick})
    if opts.without:
        results.settings["without"] = ["+".join(f) for f in opts.without]
    if opts.against:
        results.settings["against"] = opts.against
        tunnel.add_checkout(opts.against)
    plans = [(name, SCENARIOS[name].plan(opts, results)) for name in names]
    for name, steps in plans:
        if not steps and name not in results.notes:
            results.note(name, "nothing to measure")
    total = sum(s.weight for _, steps in plans for s in steps) * opts.rounds
    progress = Progress(total, sum(len(steps) for _, steps in plans) * opts.rounds, quiet=quiet)
    for name in names:
        for note in results.notes.get(name, []):
            if note.startswith("skipped") or "not found" in note:
                progress.say(f"{name}: {note}")
    t0 = time.monotonic()
    try:
        for name, steps in plans:
            for r in range(1, opts.rounds + 1):
                for step in steps:
                    progress.begin(f"{name}: {step.what}", r, opts.rounds, weight_hint=total)
                    try:
                        results.add(step.run(r))
                    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                        detail = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                        results.note(name, f"round {r}: {step.what} failed: {detail[0][:200]}")
                        progress.say(f"{name}: round {r}: {step.what} failed: {detail[0][:200]}")
                    progress.end(step.weight)
    except KeyboardInterrupt:
        results.note(next(iter(names)), "interrupted (Ctrl-C): only what was measured before is reported")
        progress.say("interrupted: reporting what was measured so far")
    results.seconds = time.monotonic() - t0
    progress.finish()
    return results
