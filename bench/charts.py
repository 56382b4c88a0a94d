"""Charts and tables from one benchmark run's JSON (``bench/run_all.py``).

Reads the record ``run_all.py`` writes (``storage.py`` and ``stampede.py``
reports side by side, plus the machine) and draws one PNG per question, with
the peers labelled on every bar, and the same figures as Markdown and
reStructuredText tables. Nothing here measures: re-drawing from a stored
record gives the same charts. Run::

    python bench/charts.py docs/bench/results.json [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes

DPI = 100
#: django-apee's bars stand out; every other peer is grey-blue.
APEE_COLOUR = "#d95f02"
PEER_COLOUR = "#7570b3"
#: One colour per storage alias, django-redis first.
ALIAS_COLOURS = ["#999999", "#cccccc", "#d95f02", "#e6ab02", "#1b9e77", "#66a61e"]

Getter = Callable[[dict], Any]


# -- drawing helpers --------------------------------------------------------------


def colour(peer: str) -> str:
    return APEE_COLOUR if peer.startswith("apee") else PEER_COLOUR


def label(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def hbars(
    ax: Axes,
    peers: dict[str, str],
    values: dict[str, Any],
    *,
    title: str,
    xlabel: str,
    log: bool = False,
    target: tuple[float, str] | None = None,
    missing: str = "n/a",
    unit: str = "",
) -> None:
    """One horizontal bar per peer, its value written at the end of the bar.

    ``None`` is a measure that does not apply to the peer (it never waits,
    say): no bar, ``missing`` written instead. Log axes are symmetric-log so
    a zero still shows as a zero.
    """
    names = list(peers)
    ypos = range(len(names))
    numbers = [values.get(n) for n in names]
    ax.barh(
        ypos,
        [0 if v is None else v for v in numbers],
        color=[colour(n) for n in names],
        height=0.6,
    )
    ax.set_yticks(list(ypos), [peers[n] for n in names])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("symlog", linthresh=1)
    top = max([v for v in numbers if v is not None] + [1e-9])
    ax.set_xlim(0, top * (8 if log else 1.3))
    if target is not None:
        ax.axvline(target[0], color="black", linestyle="--", linewidth=1)
        if target[1]:
            ax.text(
                target[0], len(names) - 0.5, f" {target[1]}", fontsize=8, va="bottom"
            )
    for y, v in zip(ypos, numbers, strict=True):
        text = missing if v is None else label(v, unit)
        ax.text(0 if v is None else v, y, f" {text}", va="center", fontsize=9)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def save(fig: Any, path: Path, suptitle: str, note: str, bottom: float = 0.04) -> Path:
    fig.suptitle(suptitle, fontsize=13, fontweight="bold")
    fig.text(0.01, 0.01, note, fontsize=8, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def panels(count: int, peers: int) -> tuple[Any, Sequence[Axes]]:
    height = 1.2 + 0.42 * peers
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count, height + 1.2))
    return fig, list(axes) if count > 1 else [axes]


# -- storage ------------------------------------------------------------------------


def storage_grouped(
    ax: Axes, storage: dict, get: Getter, *, title: str, ylabel: str
) -> None:
    """Bars per payload, one per alias, as ratios to django-redis's pickle."""
    labels = storage["labels"]
    aliases = list(labels)
    payloads = list(storage["payloads"])
    width = 0.8 / len(aliases)
    for i, alias in enumerate(aliases):
        ratios = [get(storage["payloads"][p], alias) for p in payloads]
        xs = [j + (i - (len(aliases) - 1) / 2) * width for j in range(len(payloads))]
        bars = ax.bar(xs, ratios, width, label=labels[alias], color=ALIAS_COLOURS[i])
        ax.bar_label(bars, [f"{r:.2f}" for r in ratios], fontsize=7, rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(payloads)), payloads)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.grid(axis="y", alpha=0.3)


def bytes_ratio(entry: dict, alias: str) -> float:
    return float(entry["bytes"][alias] / entry["bytes"]["django_redis"])


def latency_ratio(op: str) -> Callable[[dict, str], float]:
    def ratio(entry: dict, alias: str) -> float:
        lat = entry["latency_us"]
        return float(lat[alias][op]["p50"] / lat["django_redis"][op]["p50"])

    return ratio


def chart_storage(record: dict, out: Path) -> list[Path]:
    storage = record["storage"]
    note = machine_note(record)
    fig, ax = plt.subplots(figsize=(11, 5))
    storage_grouped(
        ax,
        storage,
        bytes_ratio,
        title="Stored bytes per entry, ratio to django-redis's pickle "
        "(lower is smaller; target for django-apee on the dict: <= 0.40)",
        ylabel="stored bytes / django-redis bytes",
    )
    ax.axhline(0.40, color="black", linestyle="--", linewidth=1)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    first = save(fig, out / "storage_bytes.png", "Storage: bytes in Redis", note)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, op in zip(axes, ("get", "set"), strict=True):
        storage_grouped(
            ax,
            storage,
            latency_ratio(op),
            title=f"{'get (a hit)' if op == 'get' else 'set'}: median latency, "
            "ratio to django-redis",
            ylabel="p50 latency / django-redis p50",
        )
    axes[0].axhline(1.10, color="black", linestyle="--", linewidth=1)
    axes[0].text(
        0.01,
        0.98,
        "dashed: the target for a hit, 1.10",
        transform=axes[0].transAxes,
        fontsize=8,
        va="top",
    )
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        fontsize=9,
        ncol=6,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.035),
    )
    second = save(
        fig,
        out / "storage_latency.png",
        "Storage: get/set latency on loopback (lower is faster)",
        note,
        bottom=0.12,
    )
    return [first, second]


# -- stampedes ------------------------------------------------------------------------

#: chart file -> (heading, [(scenario, getter, title, x label, log, target, missing)])
STAMPEDE_CHARTS: dict[str, tuple[str, list[tuple]]] = {
    "stampede_cold": (
        "1. Cold key: every caller asks at once ({cold})",
        [
            (
                "cold",
                lambda r: r.get("per_key"),
                "computes per cold key",
                "computes (log scale; 1 is ideal)",
                True,
                (1, ""),
                "n/a",
            ),
            (
                "cold",
                lambda r: (
                    (r.get("beyond_compute_ms") or {}).get("p99")
                    if r.get("coalesced")
                    else None
                ),
                "coalesced callers: wait beyond the compute, p99",
                "milliseconds (log scale)",
                True,
                (5, "target 5 ms"),
                "n/a: nobody waits, all compute",
            ),
        ],
    ),
    "stampede_hot": (
        "2. Hot key under steady load ({hot})",
        [
            (
                "hot",
                lambda r: r.get("per_window"),
                "computes per TTL window (steady state)",
                "computes (log scale; 1 is ideal)",
                True,
                (1.05, "target 1.05"),
                "n/a",
            ),
            (
                "hot",
                lambda r: r.get("waited"),
                "requests that waited on a refresh",
                "requests (symlog scale)",
                True,
                None,
                "n/a",
            ),
        ],
    ),
    "stampede_long": (
        "3. Compute longer than the initial lock/lease ({long})",
        [
            (
                "long",
                lambda r: r.get("duplicates"),
                "duplicate computes (beyond one per expiry)",
                "computes (symlog scale)",
                True,
                None,
                "n/a",
            ),
            (
                "long",
                lambda r: r.get("errors"),
                "errors raised to callers",
                "errors (symlog scale)",
                True,
                None,
                "n/a",
            ),
        ],
    ),
    "stampede_kill": (
        "4. The computing process is SIGKILLed ({kill})",
        [
            (
                "kill",
                lambda r: r.get("extra_s"),
                "extra time to the first value after the kill",
                "seconds beyond one compute",
                False,
                None,
                "n/a",
            ),
            (
                "kill",
                lambda r: r.get("takeovers"),
                "computes started after the kill (takeovers)",
                "computes (symlog scale; 1 is ideal)",
                True,
                (1, ""),
                "n/a",
            ),
        ],
    ),
    "stampede_pause": (
        "5. Redis frozen (SIGSTOP) under load ({pause})",
        [
            (
                "pause",
                lambda r: r.get("exceptions"),
                "exceptions raised to callers",
                "exceptions (symlog scale)",
                True,
                None,
                "n/a",
            ),
            (
                "pause",
                lambda r: none_or(r.get("max_latency_during_ms"), 1000),
                "longest caller wait while Redis was frozen",
                "seconds",
                False,
                None,
                "n/a",
            ),
        ],
    ),
    "herd": (
        "6. Plain cache-aside code (get, compute, set) on a hot key ({herd})",
        [
            (
                "herd",
                lambda r: r.get("per_window"),
                "computes per TTL window (steady state)",
                "computes (log scale; 1 is ideal)",
                True,
                (1, ""),
                "n/a",
            ),
            (
                "herd",
                lambda r: r.get("computed_after_fill"),
                "requests whose get missed and that computed\n(after the cold fill)",
                "requests (log scale)",
                True,
                None,
                "n/a",
            ),
            (
                "herd",
                lambda r: r.get("computed_in_fill"),
                "requests that computed in the cold fill",
                "requests (log scale)",
                True,
                (1, ""),
                "n/a",
            ),
        ],
    ),
}


def none_or(value: Any, divisor: float) -> float | None:
    return None if value is None else value / divisor


def scenario_titles(record: dict) -> dict[str, str]:
    """Short descriptions of each scenario's parameters, for chart headings."""
    c = record["stampede"]["config"]
    pt = f"{c['processes']} processes x {c['threads']} threads"
    return {
        "cold": f"{pt}, {c['cold_compute']} s compute, {c['cold_rounds']} keys",
        "hot": f"{pt}, TTL {c['ttl']} s, {c['hot_compute']} s compute, "
        f"{c['hot_seconds']} s",
        "long": f"{c['long_compute']} s compute, {c['lease']} s lock/lease, {pt}",
        "kill": f"killed {c['kill_after']} s into a {c['kill_compute']} s compute, "
        f"lease {c['lease']} s, {pt}",
        "pause": f"{c['pause_seconds']} s, socket timeout {c['socket_timeout']} s, "
        f"{pt}",
        "herd": f"{pt}, TTL {c['ttl']} s, {c['hot_compute']} s compute, "
        f"{c['hot_seconds']} s",
    }


def chart_stampedes(record: dict, out: Path) -> list[Path]:
    stampede = record["stampede"]
    labels = stampede["peers"]
    titles = scenario_titles(record)
    note = machine_note(record)
    written = []
    for name, (heading, specs) in STAMPEDE_CHARTS.items():
        scenario = specs[0][0]
        results = stampede["scenarios"].get(scenario)
        if not results:
            continue
        peers = {p: labels[p] for p in results}
        fig, axes = panels(len(specs), len(peers))
        for ax, (_, get, title, xlabel, log, target, missing) in zip(
            axes, specs, strict=True
        ):
            values = {p: get(r) for p, r in results.items()}
            hbars(
                ax,
                peers,
                values,
                title=title,
                xlabel=xlabel,
                log=log,
                target=target,
                missing=missing,
            )
        written.append(save(fig, out / f"{name}.png", heading.format(**titles), note))
    return written


def machine_note(record: dict) -> str:
    m = record.get("machine", {})
    return (
        f"{record.get('date', '')}  {m.get('cpu', '?')}, {m.get('cores', '?')} "
        f"cores, load {m.get('load_before', '?')}; Redis {m.get('redis', '?')}, "
        f"Python {m.get('python', '?')}; lower is better on every axis"
    )


# -- tables ---------------------------------------------------------------------------


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rst_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    body = [rule, line(headers), rule, *(line(r) for r in rows), rule]
    return "\n".join(s.rstrip() for s in body) + "\n"


def storage_tables(record: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    storage = record["storage"]
    labels = storage["labels"]
    headers = ["payload", *labels.values()]
    tables = []
    for title, cell in (
        (
            "Stored bytes (ratio to django-redis)",
            lambda e, a: f"{e['bytes'][a]} B ({bytes_ratio(e, a):.2f})",
        ),
        (
            "get (hit) p50 / p99 µs (p50 ratio to django-redis)",
            lambda e, a: latency_cell(e, a, "get"),
        ),
        (
            "set p50 / p99 µs (p50 ratio to django-redis)",
            lambda e, a: latency_cell(e, a, "set"),
        ),
    ):
        rows = [
            [name] + [cell(entry, alias) for alias in labels]
            for name, entry in storage["payloads"].items()
        ]
        tables.append((title, headers, rows))
    return tables


def latency_cell(entry: dict, alias: str, op: str) -> str:
    lat = entry["latency_us"][alias][op]
    ratio = latency_ratio(op)(entry, alias)
    return f"{lat['p50']:.0f} / {lat['p99']:.0f} ({ratio:.2f})"


#: (row title, scenario, getter) for the stampede summary table.
SUMMARY_ROWS: list[tuple[str, str, Getter]] = [
    ("cold key: computes per key", "cold", lambda r: r.get("per_key")),
    (
        "cold key: coalesced wait beyond compute, p99 ms",
        "cold",
        lambda r: (
            (r.get("beyond_compute_ms") or {}).get("p99")
            if r.get("coalesced")
            else None
        ),
    ),
    ("hot key: computes per TTL window", "hot", lambda r: r.get("per_window")),
    ("hot key: requests that waited on a refresh", "hot", lambda r: r.get("waited")),
    ("hot key: p99 latency ms", "hot", lambda r: p99_after_fill(r)),
    ("long compute: duplicate computes", "long", lambda r: r.get("duplicates")),
    ("long compute: errors", "long", lambda r: r.get("errors")),
    ("holder killed: extra s to a value", "kill", lambda r: r.get("extra_s")),
    ("holder killed: takeovers", "kill", lambda r: r.get("takeovers")),
    ("Redis frozen: exceptions", "pause", lambda r: r.get("exceptions")),
    (
        "Redis frozen: longest wait ms",
        "pause",
        lambda r: r.get("max_latency_during_ms"),
    ),
    ("cache-aside: computes per TTL window", "herd", lambda r: r.get("per_window")),
    (
        "cache-aside: requests that computed (fill + after)",
        "herd",
        lambda r: aside_cell(r),
    ),
    ("cache-aside: p99 latency ms", "herd", lambda r: p99_after_fill(r)),
]


def p99_after_fill(result: dict) -> Any:
    return (result.get("latency_after_fill_ms") or {}).get("p99")


def aside_cell(result: dict) -> str | None:
    if "computed_requests" not in result:
        return None
    return f"{result['computed_in_fill']} + {result['computed_after_fill']}"


def stampede_table(record: dict) -> tuple[list[str], list[list[str]]]:
    stampede = record["stampede"]
    peers = stampede["peers"]
    headers = ["measure", *peers.values()]
    rows = []
    for title, scenario, get in SUMMARY_ROWS:
        results = stampede["scenarios"].get(scenario)
        if not results:
            continue
        cells = []
        for peer in peers:
            result = results.get(peer)
            cells.append("-" if result is None else label(get(result)))
        rows.append([title, *cells])
    return headers, rows


def targets_table(record: dict) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            t["scenario"],
            t["measure"],
            t["target"],
            label(t["value"]),
            "met" if t["met"] else "**MISSED**",
        ]
        for t in record["stampede"].get("targets", [])
    ]
    rows += storage_targets(record)
    return ["scenario", "measure", "target", "django-apee", "result"], rows


def storage_targets(record: dict) -> list[list[str]]:
    """The two storage targets, for django-apee's default."""
    rows = []
    payloads = record["storage"]["payloads"]
    for name, entry in payloads.items():
        ratio = latency_ratio("get")(entry, "apee")
        rows.append(
            [
                "storage",
                f"hit latency vs django-redis, {name}",
                "<= 1.10",
                f"{ratio:.2f}",
                "met" if ratio <= 1.10 else "**MISSED**",
            ]
        )
    first = next(iter(payloads.values()))
    ratio = bytes_ratio(first, "apee")
    rows.append(
        [
            "storage",
            f"stored bytes vs django-redis, {next(iter(payloads))}",
            "<= 0.40",
            f"{ratio:.2f}",
            "met" if ratio <= 0.40 else "**MISSED**",
        ]
    )
    return rows


def write_tables(record: dict, out: Path) -> list[Path]:
    sections: list[tuple[str, list[str], list[list[str]]]] = []
    sections.append(("django-apee against its targets", *targets_table(record)))
    sections.append(("Stampedes: every peer, side by side", *stampede_table(record)))
    sections += storage_tables(record)
    md = [f"# Benchmark results, {record.get('date', '')}\n"]
    rst_title = f"Benchmark results, {record.get('date', '')}"
    rst = [rst_title + "\n" + "=" * len(rst_title) + "\n"]
    for title, headers, rows in sections:
        md.append(f"\n## {title}\n\n" + md_table(headers, rows))
        rst.append(f"\n{title}\n{'-' * len(title)}\n\n" + rst_table(headers, rows))
    paths = [out / "results.md", out / "results.rst"]
    paths[0].write_text("".join(md))
    paths[1].write_text("".join(rst))
    return paths


def draw_all(record: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if record.get("storage"):
        written += chart_storage(record, out)
    if record.get("stampede"):
        written += chart_stampedes(record, out)
    if record.get("storage") and record.get("stampede"):
        written += write_tables(record, out)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="results.json from run_all.py")
    parser.add_argument("--out", type=Path, help="default: the record's folder")
    args = parser.parse_args()
    record = json.loads(args.record.read_text())
    for path in draw_all(record, args.out or args.record.parent):
        print(path)


if __name__ == "__main__":
    main()
