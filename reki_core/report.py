"""The run report: one Markdown + HTML page (with a PNG bar plot of counts per stage) per run date.

Reads the step records under `_runs/dt=D/` (written by `reki_core.runlog`) generically, so a stage
can record whatever it measures: int fields (top level or one nested dict deep) are counts, float
fields are metrics, `seconds` is the step's timing, and dicts shaped like `GateResult.summary()`
(keys `gate` and `success`) are gate results. LLM calls/tokens and cache hits are counts picked out
by name. The publisher stores the files beside the version and links them from the manifest.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake, as_date

# Record fields that are bookkeeping, not measurements.
_META_FIELDS = {"step", "dt", "recorded_at", "started_at", "finished_at", "seconds"}
_LLM_WORDS = ("llm", "call", "token", "prompt", "completion", "generation")
_CACHE_WORDS = ("cache", "hit", "miss", "reuse")


def _is_gate(value: Any) -> bool:
    return isinstance(value, dict) and "gate" in value and "success" in value


def _gates_in(record: dict[str, Any]) -> list[dict[str, Any]]:
    gates = []
    for value in record.values():
        candidates = value if isinstance(value, list) else [value]
        gates += [g for g in candidates if _is_gate(g)]
    return gates


def _measurements(record: dict[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """(counts, metrics) of one step record, nested dicts flattened to `outer.inner` names."""
    counts: dict[str, int] = {}
    metrics: dict[str, float] = {}

    def visit(name: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            counts[name] = value
        elif isinstance(value, float):
            metrics[name] = value

    for key, value in record.items():
        if key in _META_FIELDS or _is_gate(value):
            continue
        if isinstance(value, dict):
            # A dict named "counts" holds plain counts; other dicts keep their name as a prefix.
            for inner, inner_value in value.items():
                visit(inner if key == "counts" else f"{key}.{inner}", inner_value)
        else:
            visit(key, value)
    return counts, metrics


def summarise_run(lake: Lake, day: str | dt.date) -> dict[str, Any]:
    """The report's content as a JSON-able dict (also written beside the pages)."""
    day = as_date(day)
    records = read_steps(lake, day)
    if not records:
        raise FileNotFoundError(f"no step records for dt={day} under {lake.uri}/_runs/dt={day}/: nothing to report")
    steps = []
    for record in records:
        counts, metrics = _measurements(record)
        steps.append({
            "step": record.get("step", "?"),
            "started_at": record.get("started_at"),
            "seconds": record.get("seconds"),
            "counts": counts,
            "metrics": metrics,
            "gates": _gates_in(record),
        })

    def picked(words: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"step": s["step"], "name": name, "value": value}
                for s in steps for name, value in s["counts"].items() if any(w in name.lower() for w in words)]

    gates = [{"step": s["step"], **g} for s in steps for g in s["gates"]]
    timed = [s["seconds"] for s in steps if isinstance(s["seconds"], (int, float))]
    return {
        "dt": day.isoformat(),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "steps": steps,
        "llm": picked(_LLM_WORDS),
        "cache": picked(_CACHE_WORDS),
        "gates": gates,
        "gates_failed": sum(1 for g in gates if not g.get("success")),
        "total_seconds": round(sum(timed), 3),
    }


def _plot_counts(summary: dict[str, Any], path: Path) -> bool:
    """A horizontal bar plot of every count per stage; False when there is nothing to plot."""
    bars = [(f"{s['step']} · {name}", value) for s in summary["steps"] for name, value in s["counts"].items()]
    if not bars:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    labels, values = zip(*bars)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bars) + 1.2))
    ax.barh(range(len(bars)), values, color="#4C72B0")
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 1000:
        ax.set_xscale("symlog")  # row counts and token counts differ by orders of magnitude
    ax.set_xlabel("count")
    ax.set_title(f"REKI run dt={summary['dt']}: counts per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every section, shared by the Markdown and HTML renderings."""
    steps = summary["steps"]
    sections = [
        ("Steps and timings", ["step", "started at", "seconds"],
         [[s["step"], _fmt(s["started_at"]), _fmt(s["seconds"])] for s in steps]),
        ("Counts per stage", ["step", "count", "value"],
         [[s["step"], name, _fmt(v)] for s in steps for name, v in s["counts"].items()]),
        ("LLM calls and tokens", ["step", "field", "value"],
         [[x["step"], x["name"], _fmt(x["value"])] for x in summary["llm"]]),
        ("Cache hits", ["step", "field", "value"],
         [[x["step"], x["name"], _fmt(x["value"])] for x in summary["cache"]]),
        ("Quality gates", ["step", "gate", "dataset", "rows", "result", "failing expectations"],
         [[g["step"], _fmt(g.get("gate")), _fmt(g.get("dataset")), _fmt(g.get("rows")),
           "passed" if g.get("success") else "FAILED",
           "; ".join(map(str, g.get("failed") or [])) or "-"] for g in summary["gates"]]),
        ("Model metrics", ["step", "metric", "value"],
         [[s["step"], name, _fmt(v)] for s in steps for name, v in s["metrics"].items()]),
    ]
    return sections


def _markdown(summary: dict[str, Any], plot_name: str | None) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    gate_line = (f"{summary['gates_failed']} of {len(summary['gates'])} gates failed" if summary["gates"]
                 else "no gate results recorded")
    lines = [f"# REKI run report: dt={summary['dt']}", "",
             f"Generated {summary['generated_at']}; {len(summary['steps'])} steps, "
             f"{summary['total_seconds']} s in steps; {gate_line}.", ""]
    if plot_name:
        lines += [f"![counts per stage]({plot_name})", ""]
    for title, header, rows in _tables(summary):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none recorded)", ""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _html(summary: dict[str, Any], plot_name: str | None) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>REKI run dt={esc(summary['dt'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.failed{color:#b00;font-weight:bold}"
             "</style></head><body>",
             f"<h1>REKI run report: dt={esc(summary['dt'])}</h1>",
             f"<p>Generated {esc(summary['generated_at'])}; {len(summary['steps'])} steps, "
             f"{summary['total_seconds']} s in steps; {summary['gates_failed']} of {len(summary['gates'])} "
             f"gates failed.</p>"]
    if plot_name:
        parts.append(f"<img src='{esc(plot_name, quote=True)}' alt='counts per stage'>")
    for title, header, rows in _tables(summary):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>(none recorded)</p>")
            continue
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td class='failed'>{esc(c)}</td>" if c == "FAILED" else f"<td>{esc(c)}</td>"
                             for c in row) + "</tr>" for row in rows)
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    parts.append("</body></html>")
    return "".join(parts)


def write_run_report(lake: Lake, dt_value: str | dt.date, out_dir: str | Path) -> dict[str, str]:
    """Write `run_report_<dt>.{md,html,json}` and `run_report_<dt>_counts.png` into `out_dir`; returns their paths."""
    summary = summarise_run(lake, dt_value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"run_report_{summary['dt']}"
    plot_path = out / f"{stem}_counts.png"
    plot_name = plot_path.name if _plot_counts(summary, plot_path) else None
    paths = {"markdown": out / f"{stem}.md", "html": out / f"{stem}.html", "json": out / f"{stem}.json"}
    paths["markdown"].write_text(_markdown(summary, plot_name))
    paths["html"].write_text(_html(summary, plot_name))
    paths["json"].write_text(json.dumps(summary, indent=2, default=str))
    if plot_name:
        paths["plot"] = plot_path
    return {k: str(v) for k, v in paths.items()}
