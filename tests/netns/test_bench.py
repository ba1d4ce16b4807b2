"""`wgpy bench --quick` over every scenario, as root with the reference tools: it runs them all
(namespaces, daemons, iperf3, the bridges, two relays), leaves no namespace or process behind, and
writes parseable JSON, a report and PNG charts. Not a timed test: no figure is asserted, only
that each was measured and is a positive number."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.suite import SCENARIOS

from .netlab import missing_requirements

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOOLS = ("ip", "wg", "wireguard-go", "iperf3", "ping", "nft", "ss-server", "ss-tunnel")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_quick_suite_measures_every_scenario_and_cleans_up(tmp_path):
    reason = missing_requirements(TOOLS)
    if reason:
        pytest.skip(reason)
    before = _namespaces()
    out = tmp_path / "results"
    # One-second transfers: only that each figure is measured matters here (keeps the suite short).
    r = subprocess.run([sys.executable, "-m", "tunnel.cli", "bench", "--quick", "--seconds", "1", "--json",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not {n for n in _namespaces() - before if n.startswith(("wgpyb-", "wgpym-"))}
    data = json.loads(r.stdout)
    failures = [n for notes in data["notes"].values() for n in notes if "failed" in n or "skipped" in n]
    assert not failures, failures
    rows = data["summary"]
    assert {row["scenario"] for row in rows} == set(SCENARIOS)
    by_key = {(row["scenario"], row["subject"], row["metric"]): row for row in rows}
    for key in [
        ("tunnel", "wgpy <-> wgpy", "a->b Mbit/s"),
        ("tunnel", "wgpy <-> wireguard-go", "a<-b Mbit/s"),
        ("tunnel", "wgpy <-> wgpy", "peak RSS MB"),
        ("tunnel", "wgpy <-> wgpy", "anon RSS MB"),
        ("tunnel", "wgpy <-> wgpy", "a->b CPU s/GB"),
        ("bridge", "wgpy <-> wgpy via wgpy ss aes-256-gcm", "a->b Mbit/s"),
        ("bridge", "wgpy <-> wgpy via wgpy udp2tcp", "a<-b Mbit/s"),
        ("multihop", "wgpy client, two wireguard-go relays", "a->b Mbit/s"),
        ("multihop", "wgpy client, two wireguard-go relays, ss aes-256-gcm to the entry", "a<-b Mbit/s"),
        ("latency", "wgpy <-> wgpy", "loaded RTT ms"),
        ("flood", "wgpy <-> wgpy", "replays: share kept"),
    ]:
        row = by_key.get(key)
        assert row is not None, f"not measured: {key}"
        assert row["median"] > 0 and row["ratio"] is not None and row["ratio"] > 0, row
    report = (out / "report.md").read_text()
    for name in SCENARIOS:
        assert f"## {name}" in report
    for png in ("ratios.png", "tunnel-throughput.png", "bridge-throughput.png", "multihop-throughput.png",
                "core-throughput.png", "scale-curve.png", "latency-rtt.png", "flood-throughput.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png
