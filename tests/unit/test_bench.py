"""`wgpy bench`: the help at every level, the results model (ratios per round, medians, spread),
JSON round trips, --compare, and a quick in-memory run that writes the report and charts.
Not timed tests: nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench.results import FORMAT, Results, ResultsError, Sample, compare_table, load, summary_table
from bench.suite import SCENARIOS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wgpy(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunnel.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------ help

def test_bench_help_through_wgpy_lists_every_scenario():
    r = wgpy("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: wgpy bench" in r.stdout
    for name in SCENARIOS:
        assert f"\n  {name} " in r.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_has_its_own_help(scenario):
    r = wgpy("bench", scenario, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: wgpy bench {scenario}")
    assert SCENARIOS[scenario].description.split()[0] in r.stdout


def test_scenario_help_shows_only_its_options():
    core = wgpy("bench", "core", "-h").stdout
    assert "--sizes" in core and "--peers" not in core and "--methods" not in core
    scale = wgpy("bench", "scale", "-h").stdout
    assert "--peers" in scale and "--sizes" not in scale


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "unknown scenario 'nonsense'"),
    (["core", "--sizes", "10"], "each of the sizes must be 28..65535"),
    (["core", "--sizes", "a,b"], "sizes must be comma-separated integers"),
    (["bridge", "--methods", "rot13"], "unknown method rot13"),
    (["--rounds", "0"], "must be at least 1"),
    (["--compare", "a", "b", "c"], "--compare takes OLD.json, or OLD.json NEW.json"),
    (["tunnel", "--without", "tso"], "unknown feature tso; choose from tun-offload, udp-gso, udp-gro, busy-poll"),
])
def test_bad_arguments_are_one_clear_line(argv, message):
    r = wgpy("bench", *argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = wgpy("bench", "core", "--out", str(f))
    assert r.returncode == 2 and "exists and is not a directory" in r.stderr


# ------------------------------------------------------------------ results model

def _samples(scenario="tunnel", rounds=((100.0, 50.0), (300.0, 100.0), (200.0, 80.0))):
    out = []
    for r, (ref, mine) in enumerate(rounds, 1):
        out.append(Sample(scenario, "ref pair", "a->b Mbit/s", ref, r))
        out.append(Sample(scenario, "wgpy pair", "a->b Mbit/s", mine, r, "ref pair"))
    return out


def test_ratio_is_the_median_of_per_round_ratios():
    res = Results(_samples())
    rows = {r.subject: r for r in res.rows()}
    mine = rows["wgpy pair"]
    # per round: 0.5, 1/3, 0.4 -> median 0.4 (the ratio of medians would be 80/200 = 0.4 too, but
    # the ratio of means (230/600) would not): check against a case where they differ
    assert mine.ratio == pytest.approx(0.4)
    assert mine.median == 80.0
    assert mine.spread == pytest.approx((100 - 50) / 80)
    assert rows["ref pair"].ratio is None
    skewed = Results(_samples(rounds=((100.0, 90.0), (1000.0, 100.0), (100.0, 95.0))))
    row = next(r for r in skewed.rows() if r.subject == "wgpy pair")
    assert row.ratio == pytest.approx(0.9)  # one slow round of the reference does not decide it


def test_a_round_without_its_reference_gives_no_ratio_from_other_rounds():
    res = Results([Sample("s", "ref", "m", 100.0, 1), Sample("s", "mine", "m", 50.0, 2, "ref")])
    assert next(r for r in res.rows() if r.subject == "mine").ratio is None


def test_zero_reference_gives_no_ratio():
    res = Results([Sample("s", "ref", "retransmits", 0, 1, higher_is_better=False),
                   Sample("s", "mine", "retransmits", 7, 1, "ref", False)])
    assert next(r for r in res.rows() if r.subject == "mine").ratio is None


def test_json_round_trip(tmp_path):
    res = Results(_samples(), {"tunnel": ["a note"]}, {"rounds": 3}, {"cpu": "x"}, "then", 12.5)
    res.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == FORMAT
    assert {row["subject"] for row in data["summary"]} == {"ref pair", "wgpy pair"}
    back = load(tmp_path / "r.json")
    assert [r.as_dict() for r in back.rows()] == [r.as_dict() for r in res.rows()]
    assert back.notes == {"tunnel": ["a note"]}


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    ("not json", "not a JSON file"),
    ("[1, 2]", "not a wgpy bench results file"),
    (json.dumps({"format": "other"}), "not a wgpy bench results file"),
    (json.dumps({"format": FORMAT}), "malformed samples"),
    (json.dumps({"format": FORMAT, "samples": [{"scenario": "s"}]}), "malformed samples"),
    (json.dumps({"format": FORMAT, "samples": [{"scenario": "s", "subject": "a", "metric": "m",
                                                "value": "fast"}]}), "malformed samples"),
])
def test_load_rejects_what_is_not_a_results_file(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultsError, match=message) as err:
        load(path)
    assert str(path) in str(err.value)


def test_compare_shows_the_change_of_the_ratio():
    old = Results(_samples(rounds=((100.0, 50.0),)))
    new = Results(_samples(rounds=((200.0, 150.0),)))  # busier/quieter machine: ratio 0.5 -> 0.75
    text = compare_table(old, new)
    line = next(ln for ln in text.splitlines() if ln.startswith("tunnel") and "wgpy pair" in ln)
    assert "+50.0%" in line and "yes" in line
    worse = compare_table(new, old)
    assert "-33.3%" in worse and " no" in worse
    md = compare_table(old, new, markdown=True)
    assert "| tunnel | wgpy pair | a->b Mbit/s |" in md


def test_compare_lower_is_better_metrics():
    old = Results([Sample("latency", "w", "idle RTT ms", 2.0, 1, "", False)])
    new = Results([Sample("latency", "w", "idle RTT ms", 1.0, 1, "", False)])
    line = compare_table(old, new).splitlines()[2]
    assert "-50.0%" in line and line.rstrip().endswith("yes")


def test_compare_with_nothing_in_common_says_so():
    old = Results([Sample("a", "x", "m", 1.0)])
    new = Results([Sample("b", "x", "m", 1.0)])
    assert "nothing to compare" in compare_table(old, new)


def test_summary_names_notes_and_reference():
    res = Results(_samples(), {"tunnel": ["wireguard-go not found"]})
    text = summary_table(res)
    assert "note: wireguard-go not found" in text
    assert any(ln.rstrip().endswith("0.40  ref pair") for ln in text.splitlines())


# ------------------------------------------------------------------ whole runs (in memory)

def test_quick_core_and_scale_write_json_report_and_charts(tmp_path):
    out = tmp_path / "out"
    r = wgpy("bench", "core", "scale", "--quick", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout is the JSON alone; progress went to stderr
    assert "[1/" in r.stderr and "round 1 of 1" in r.stderr
    metrics = {(row["scenario"], row["subject"], row["metric"]) for row in data["summary"]}
    assert ("core", "wgpy seal", "1420 B Gbit/s") in metrics
    assert ("scale", "1000 peers", "open pkt/s") in metrics
    scale_rows = [row for row in data["summary"] if row["scenario"] == "scale" and row["subject"] != "1 peer"]
    assert scale_rows and all(row["ratio"] is not None and row["ratio"] > 0 for row in scale_rows)
    assert json.loads((out / "results.json").read_text())["summary"] == data["summary"]
    report = (out / "report.md").read_text()
    assert "## core" in report and "## scale" in report and "![core](core-throughput.png)" in report
    for name in ("ratios.png", "core-throughput.png", "scale-curve.png"):
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name


def test_compare_two_result_files_without_running(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    Results(_samples(rounds=((100.0, 50.0),)), started="before").write_json(a)
    Results(_samples(rounds=((100.0, 60.0),)), started="after").write_json(b)
    r = wgpy("bench", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    assert "+20.0%" in r.stdout and "before" in r.stdout and "after" in r.stdout
    assert "+20.0%" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_against_a_broken_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = wgpy("bench", "core", "--compare", str(bad))
    assert r.returncode == 1 and f"{bad}: not a JSON file" in r.stderr and "Traceback" not in r.stderr


def test_run_then_compare_with_an_earlier_run(tmp_path):
    first = tmp_path / "first"
    assert wgpy("bench", "scale", "--quick", "--peers", "1,10", "--out", str(first)).returncode == 0
    r = wgpy("bench", "scale", "--quick", "--peers", "1,10", "--compare", str(first / "results.json"))
    assert r.returncode == 0, r.stderr
    assert "ratio before" in r.stdout and "10 peers" in r.stdout


def test_without_matplotlib_the_bench_still_writes_json_and_report(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "out"
    rc = cli.main(["scale", "--quick", "--peers", "1,10", "--out", str(out)])
    assert rc == 0
    assert (out / "results.json").exists() and (out / "report.md").exists()
    assert not list(out.glob("*.png"))


def test_netns_scenarios_without_root_say_why(monkeypatch, capsys):
    from bench import tunnel

    monkeypatch.setattr(tunnel.os, "geteuid", lambda: 1000)
    rc = cli.main(["tunnel", "latency", "--quick"])
    out = capsys.readouterr()
    assert rc == 1  # nothing could be measured
    assert "tunnel: skipped: needs root" in out.err and "latency: skipped: needs root" in out.err


def test_flood_initiations_carry_a_valid_mac1_and_nothing_else_valid():
    import os

    from bench.flood import initiations
    from tunnel.noise import Device
    from tunnel.noise.cookie import CookieChecker
    from tunnel.noise.crypto import clamp, public_key

    key = clamp(os.urandom(32))
    checker = CookieChecker(public_key(key), os.urandom)
    msgs = initiations(public_key(key), 16)
    assert len(set(msgs)) == 16
    assert all(len(m) == 148 and m[:4] == b"\x01\x00\x00\x00" and checker.check_mac1(m) for m in msgs)
    assert not CookieChecker(public_key(clamp(os.urandom(32))), os.urandom).check_mac1(msgs[0])
    dev = Device(key, wall_offset=0.0)
    res = dev.inbound([(m, ("192.0.2.9", 4000)) for m in msgs], 1.0)
    assert res.to_tun == [] and not dev.peers  # passes mac1, goes no further


def test_flooder_refuses_a_bad_key():
    r = subprocess.run([sys.executable, "-m", "bench.flood", "--to", "127.0.0.1:9", "--public", "abcd"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "64 hex characters" in r.stderr


def test_without_measures_a_variant_pair_with_those_offloads_off(monkeypatch):
    """`--without` adds a wgpy pair whose daemons get the features' switches at 0, and only
    those: the plain wgpy pair keeps every feature on even if the caller's environment says no."""
    from bench import suite, tunnel
    args = cli.build_parser().parse_args(["tunnel", "--without", "tun-offload",
                                          "--without", "udp-gso+udp-gro"])
    opts = cli.options(args)
    assert opts.without == (("tun-offload",), ("udp-gso", "udp-gro"))
    monkeypatch.setattr(suite, "_netns_blocker", lambda *a: False)
    monkeypatch.setattr(suite, "_lacking", lambda *a: True)  # no wireguard-go: fewer steps
    plan = suite._plan_tunnel(opts, Results(machine={}, started="", settings={}))
    subjects = [step.what for step in plan]
    assert any("wgpy without tun-offload" in s for s in subjects), subjects
    assert any("wgpy without udp-gso+udp-gro" in s for s in subjects), subjects
    monkeypatch.setenv("WGPY_TUN_OFFLOAD", "0")
    assert "WGPY_TUN_OFFLOAD" not in tunnel._env("wgpy")
    env = tunnel._env("wgpy without udp-gso+udp-gro")
    assert (env["WGPY_UDP_GSO"], env["WGPY_UDP_GRO"]) == ("0", "0")
    assert "WGPY_TUN_OFFLOAD" not in env


def test_latency_measures_the_other_checkout_too(monkeypatch):
    from bench import suite, tunnel
    opts = cli.options(cli.build_parser().parse_args(["latency", "--against", "/tmp"]))
    monkeypatch.setattr(suite, "_netns_blocker", lambda *a: False)
    monkeypatch.setattr(suite, "_lacking", lambda *a: False)
    plan = suite._plan_latency(opts, Results(machine={}, started="", settings={}))
    assert [step.what for step in plan][-1] == f"ping {tunnel.BASE} <-> {tunnel.BASE}"
    opts = cli.options(cli.build_parser().parse_args(["latency", "--without", "busy-poll"]))
    plan = suite._plan_latency(opts, Results(machine={}, started="", settings={}))
    assert [step.what for step in plan][-1] == "ping wgpy without busy-poll <-> wgpy without busy-poll"
    assert tunnel._env("wgpy without busy-poll")["WGPY_POLL_US"] == "0"


def test_latency_reports_the_cpu_an_idle_ping_costs(monkeypatch):
    """Next to the RTT, each tunnel pair's CPU time per idle ping (what wgpy's busy poll costs);
    the bare veth has no tunnel processes and no such figure."""
    from bench import latency, suite
    opts = cli.options(cli.build_parser().parse_args(["latency"]))
    monkeypatch.setattr(suite, "_netns_blocker", lambda *a: False)
    monkeypatch.setattr(suite, "_lacking", lambda *a: False)
    monkeypatch.setattr(latency, "measure",
                        lambda left, right, seconds, count: (0.5, 2.0, None if left == "veth" else 0.25))
    plan = suite._plan_latency(opts, Results(machine={}, started="", settings={}))
    by_subject = {step.what: {s.metric: s.value for s in step.run(1)} for step in plan}
    assert by_subject["ping veth (no tunnel)"] == {"idle RTT ms": 0.5, "loaded RTT ms": 2.0}
    assert by_subject["ping wgpy <-> wgpy"] == {"idle RTT ms": 0.5, "loaded RTT ms": 2.0,
                                                "idle CPU ms per ping": 0.25}


def test_memory_figures_peak_and_anonymous():
    """Peak RSS (VmHWM) and the anonymous part (RssAnon) of the tunnel processes, the larger of
    them; the anonymous part is the process's own memory, at most its peak."""
    import os
    from bench import suite, tunnel
    pid = os.getpid()
    peak, anon = tunnel.memory_mb([pid]), tunnel.memory_mb([pid], "RssAnon")
    assert 0 < anon <= peak
    assert tunnel.memory_mb([]) is None and tunnel.memory_mb([2 ** 22 + 1]) is None  # no such process
    figures = [tunnel.Figure("p", "a->b", 100.0, 0, 1.0, 50.0, 20.0),
               tunnel.Figure("p", "a<-b", 90.0, 0, 1.0, 52.0, 21.0)]
    samples = {s.metric: s.value for s in suite._figure_samples("tunnel", "p", "", figures, 1)}
    assert samples["peak RSS MB"] == 52.0 and samples["anon RSS MB"] == 21.0


def test_fine_cpu_time_counts_every_thread():
    import os
    import threading
    import time
    from bench import tunnel
    done, measured = threading.Event(), threading.Event()

    def spin():  # then stays alive: the time of a thread that ended is not counted
        stop = time.process_time() + 0.05  # this thread's and main's CPU time together
        while time.process_time() < stop:
            pass
        done.set()
        measured.wait(10)
    before = tunnel.cpu_seconds_fine([os.getpid()])
    t = threading.Thread(target=spin)
    t.start()
    done.wait(10)
    spent = tunnel.cpu_seconds_fine([os.getpid()]) - before
    measured.set()
    t.join()
    assert 0.045 <= spent < 5, spent
    assert tunnel.cpu_seconds_fine([2 ** 22 + 1]) == 0
