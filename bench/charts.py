"""PNG charts of a bench run (matplotlib, from the optional extra `wgpy[bench]`).

    ratios.png                  every throughput row against its reference (1.0 = as fast)
    tunnel-throughput.png       Mbit/s per pair and direction, bars with the rounds' range
    bridge-throughput.png       the same through the bridges
    multihop-throughput.png     the same through two relays
    flood-throughput.png        with and without a handshake flood
    core-throughput.png         Gbit/s by packet size, wgpy's core next to the raw AEAD
    scale-curve.png             packets/s against the number of peers
    latency-rtt.png             RTT idle and under load
Only the charts whose scenario was run are drawn.
"""

from __future__ import annotations

from pathlib import Path

from .results import Results, Row


class ChartsUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChartsUnavailable("charts skipped: matplotlib is not installed (pip install 'wgpy[bench]', "
                                "or `make bench`, which installs it)") from None
    return plt


def _throughput(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.metric.endswith("Mbit/s")]


def _bars(plt, rows: list[Row], title: str, path: Path) -> None:
    subjects = list(dict.fromkeys(r.subject for r in rows))
    metrics = list(dict.fromkeys(r.metric for r in rows))
    fig, ax = plt.subplots(figsize=(10, 0.7 + 0.55 * len(subjects) * len(metrics)))
    height = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        ys, xs, lo, hi = [], [], [], []
        for i, subject in enumerate(subjects):
            row = next((r for r in rows if r.subject == subject and r.metric == metric), None)
            if row is None:
                continue
            ys.append(i + j * height)
            xs.append(row.median)
            lo.append(row.median - min(row.values))
            hi.append(max(row.values) - row.median)
        ax.barh(ys, xs, height=height, xerr=[lo, hi], capsize=3, label=metric)
    ax.set_yticks([i + height * (len(metrics) - 1) / 2 for i in range(len(subjects))], subjects, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median over rounds (whiskers: min to max)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(plt, rows: list[Row], line_of, path: Path, title: str, xlabel: str, ylabel: str,
            log_x: bool = False) -> None:
    """One line per `line_of(row)` through the rows' (x, median); references dashed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for line in dict.fromkeys(line_of(r) for r in rows):
        pts = sorted((r.x, r.median) for r in rows if line_of(r) == line)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if line.startswith("raw") else "-",
                marker="o", label=line)
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(results: Results, out: Path) -> list[str]:
    """Draw what the results hold into `out`; returns the file names written."""
    plt = _pyplot()
    rows = results.rows()
    written = []

    ratio_rows = [r for r in rows if r.ratio is not None and r.higher_is_better]
    if ratio_rows:
        fig, ax = plt.subplots(figsize=(13, 0.8 + 0.28 * len(ratio_rows)))
        labels = [f"{r.scenario}: {r.subject} ({r.metric})" for r in ratio_rows]
        colours = ["tab:green" if r.ratio >= 1 else "tab:red" for r in ratio_rows]
        ax.barh(range(len(ratio_rows)), [r.ratio for r in ratio_rows], color=colours)
        ax.set_yticks(range(len(ratio_rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel("ratio to the reference measured in the same round (median over rounds)")
        ax.set_title("wgpy against its references")
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=110)
        plt.close(fig)
        written.append("ratios.png")

    for scenario, title in (("tunnel", "iperf3 TCP through the tunnel"), ("bridge", "iperf3 TCP through a bridge"),
                            ("multihop", "iperf3 TCP through two relays"),
                            ("flood", "iperf3 TCP with and without a handshake flood")):
        mine = _throughput([r for r in rows if r.scenario == scenario])
        # The bare link is 10-20 times any tunnel: drawn, it would flatten every other bar.
        ceiling = [r for r in mine if r.subject.startswith("veth")]
        mine = [r for r in mine if not r.subject.startswith("veth")]
        if ceiling:
            title += f"; bare veth {min(r.median for r in ceiling):,.0f} Mbit/s, not drawn"
        if mine:
            _bars(plt, mine, f"{title} (Mbit/s)", out / f"{scenario}-throughput.png")
            written.append(f"{scenario}-throughput.png")

    core_rows = [r for r in rows if r.scenario == "core" and r.x is not None]
    if core_rows:
        _curves(plt, core_rows, lambda r: r.subject, out / "core-throughput.png",
                "Protocol core against the raw AEAD, by packet size", "inner packet size (bytes)",
                "Gbit/s of packets (one core)")
        written.append("core-throughput.png")

    scale_rows = [r for r in rows if r.scenario == "scale" and r.x is not None]
    if scale_rows:
        _curves(plt, scale_rows, lambda r: r.metric, out / "scale-curve.png",
                "Relay core throughput against the number of peers", "peers configured", "packets/s (1420 B)",
                log_x=True)
        written.append("scale-curve.png")

    latency_rows = [r for r in rows if r.scenario == "latency" and "RTT" in r.metric]
    if latency_rows:
        _bars(plt, latency_rows, "Ping RTT through the tunnel (ms, lower is better)", out / "latency-rtt.png")
        written.append("latency-rtt.png")
    return written
