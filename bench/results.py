"""What a bench run measured, and everything derived from it: the summary, the comparison with
an older run, the Markdown report, and the JSON file both are read back from.

Every figure is a `Sample`: one number, for one subject (what was measured, e.g. "wgpy <-> wgpy"),
one metric (e.g. "a->b Mbit/s"), in one round. A subject names its reference, the subject
measured in the same round it is compared with; the ratio of a row is the median over rounds of
value / reference value of the same round and metric, so slow and fast rounds (a busy machine)
cancel out rather than add up.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "wgpy-bench/1"


@dataclass
class Sample:
    scenario: str  # "core", "tunnel", ...
    subject: str  # "wgpy <-> wgpy"
    metric: str  # "a->b Mbit/s"
    value: float
    round: int = 1
    reference: str = ""  # the subject this one is compared with ("" : none, or it is a reference)
    higher_is_better: bool = True
    x: float | None = None  # where on a curve (packet size, peer count), for charts


@dataclass
class Row:
    """One subject and metric over all rounds."""

    scenario: str
    subject: str
    metric: str
    reference: str
    higher_is_better: bool
    values: list[float]
    ratio: float | None  # median of per-round value / reference (None: no reference measured)
    x: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float | None:
        """(max - min) / median: how much the rounds disagree (None: one round, or a zero median)."""
        if len(self.values) < 2 or self.median == 0:
            return None
        return (max(self.values) - min(self.values)) / abs(self.median)

    def key(self) -> tuple[str, str, str]:
        return (self.scenario, self.subject, self.metric)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median=self.median, spread=self.spread)
        return d


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # scenario -> what the reader must know
    settings: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0  # how long the run took

    def add(self, samples: list[Sample]) -> None:
        self.samples.extend(samples)

    def note(self, scenario: str, text: str) -> None:
        notes = self.notes.setdefault(scenario, [])
        if text not in notes:
            notes.append(text)

    def scenarios(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.samples:
            seen.setdefault(s.scenario)
        for name in self.notes:
            seen.setdefault(name)
        return list(seen)

    def rows(self) -> list[Row]:
        """One row per (scenario, subject, metric), in the order first measured."""
        groups: dict[tuple[str, str, str], list[Sample]] = {}
        for s in self.samples:
            groups.setdefault((s.scenario, s.subject, s.metric), []).append(s)
        by_round = {(s.scenario, s.subject, s.metric, s.round): s.value for s in self.samples}
        rows = []
        for (scenario, subject, metric), group in groups.items():
            reference = group[0].reference
            ratios = []
            for s in group:
                ref = by_round.get((scenario, reference, metric, s.round)) if reference else None
                if ref:
                    ratios.append(s.value / ref)
            rows.append(Row(scenario, subject, metric, reference, group[0].higher_is_better,
                            [s.value for s in group], statistics.median(ratios) if ratios else None,
                            group[0].x))
        return rows

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "machine": self.machine,
            "settings": self.settings,
            "notes": self.notes,
            "summary": [r.as_dict() for r in self.rows()],
            "samples": [asdict(s) for s in self.samples],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


class ResultsError(ValueError):
    """A results file that cannot be read; the message names the file and what is wrong."""


def load(path: str | Path) -> Results:
    """A results file written by `wgpy bench --json` or `--out` (results.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ResultsError(f"{path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultsError(f"{path}: not a wgpy bench results file (no \"format\": \"{FORMAT}\")")
    try:
        samples = [Sample(**s) for s in data["samples"]]
        for s in samples:
            if not isinstance(s.value, (int, float)) or not isinstance(s.round, int):
                raise TypeError("value and round must be numbers")
    except (KeyError, TypeError) as exc:
        raise ResultsError(f"{path}: malformed samples ({exc})") from None
    return Results(samples, dict(data.get("notes") or {}), dict(data.get("settings") or {}),
                   dict(data.get("machine") or {}), str(data.get("started", "")), float(data.get("seconds", 0)))


def describe_machine() -> dict:
    """What the figures depend on: CPU, cores, kernel, Python, the commit measured."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = ""
    try:
        here = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit = r.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit}


def now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# ------------------------------------------------------------------ text

def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _spread(r: Row) -> str:
    return f"±{r.spread * 50:.0f}%" if r.spread is not None else "-"


def _ratio(r: Row) -> str:
    return f"{r.ratio:.2f}" if r.ratio is not None else "-"


def summary_table(results: Results) -> str:
    """The terminal summary: per scenario, one line per subject and metric."""
    out = []
    rows = results.rows()
    for scenario in results.scenarios():
        mine = [r for r in rows if r.scenario == scenario]
        rounds = max((len(r.values) for r in mine), default=0)
        out.append(f"== {scenario}" + (f" ({rounds} round{'s' * (rounds != 1)}, median)" if mine else ""))
        for note in results.notes.get(scenario, []):
            out.append(f"   note: {note}")
        if not mine:
            continue
        w = max(len(r.subject) for r in mine)
        wm = max(len(r.metric) for r in mine)
        out.append(f"   {'subject':<{w}}  {'metric':<{wm}}  {'median':>10}  {'spread':>6}  {'ratio':>5}  reference")
        last = None
        for r in mine:
            first = r.subject != last
            last = r.subject
            reference = r.reference if first and r.ratio is not None else ""
            out.append(f"   {r.subject if first else '':<{w}}  {r.metric:<{wm}}  {_num(r.median):>10}  "
                       f"{_spread(r):>6}  {_ratio(r):>5}  {reference}".rstrip())
        out.append("")
    out.append("ratio: median over rounds of subject / reference measured in the same round; "
               "spread: half the range of the rounds, in % of the median")
    return "\n".join(out)


def compare_table(old: Results, new: Results, markdown: bool = False) -> str:
    """Before/after for every row both runs have: medians, ratios and the change in percent
    (of the ratio where both have one, since ratios survive a busier or quieter machine)."""
    before = {r.key(): r for r in old.rows()}
    lines = []
    head = ["scenario", "subject", "metric", "before", "after", "change", "ratio before", "ratio after", "better?"]
    for r in new.rows():
        o = before.get(r.key())
        if o is None:
            continue
        if o.ratio is not None and r.ratio is not None and o.ratio:
            change = (r.ratio - o.ratio) / o.ratio
        elif o.median:
            change = (r.median - o.median) / abs(o.median)
        else:
            change = 0.0
        better = "yes" if (change > 0) == r.higher_is_better and abs(change) >= 0.005 else (
            "same" if abs(change) < 0.005 else "no")
        lines.append([r.scenario, r.subject, r.metric, _num(o.median), _num(r.median), f"{change * 100:+.1f}%",
                      _ratio(o), _ratio(r), better])
    if not lines:
        return "nothing to compare: the two runs have no scenario, subject and metric in common"
    title = (f"before: {old.started} {old.machine.get('commit', '')}  after: {new.started} "
             f"{new.machine.get('commit', '')}").strip()
    if markdown:
        md = [f"_{title}_", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(x) + " |" for x in lines]
        return "\n".join(md)
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    text = [title, fmt.format(*head)] + [fmt.format(*x) for x in lines]
    text.append("change: of the ratio to the reference where both runs have one, else of the median")
    return "\n".join(text)


def markdown_report(results: Results, charts: list[str], descriptions: dict[str, str]) -> str:
    m = results.machine
    md = ["# wgpy bench", "",
          f"Run {results.started}, {results.seconds / 60:.1f} min; commit {m.get('commit') or '?'}; "
          f"{m.get('cpu') or 'CPU ?'}, {m.get('cores')} cores, Linux {m.get('kernel')}, Python {m.get('python')}.",
          "", "Settings: " + ", ".join(f"{k} {v}" for k, v in results.settings.items()), "",
          "Ratios compare each subject with its reference measured in the same round (median over "
          "rounds); absolute figures move with the machine and its load, ratios much less.", ""]
    rows = results.rows()
    for scenario in results.scenarios():
        md += [f"## {scenario}", ""]
        if scenario in descriptions:
            md += [descriptions[scenario], ""]
        for note in results.notes.get(scenario, []):
            md += [f"> {note}", ""]
        mine = [r for r in rows if r.scenario == scenario]
        if mine:
            md += ["| subject | metric | median | spread | rounds | ratio | reference |",
                   "|---|---|---:|---:|---:|---:|---|"]
            for r in mine:
                md.append(f"| {r.subject} | {r.metric} | {_num(r.median)} | {_spread(r)} | {len(r.values)} | "
                          f"{_ratio(r)} | {r.reference if r.ratio is not None else ''} |")
            md.append("")
        for chart in charts:
            if chart.startswith(f"{scenario}-") or chart.startswith(f"{scenario}."):
                md += [f"![{scenario}]({chart})", ""]
    overview = [c for c in charts if c.startswith("ratios")]
    if overview:
        md += ["## All scenarios against their references", ""] + [f"![ratios]({c})" for c in overview] + [""]
    return "\n".join(md)
