"""The run report: one Markdown + HTML page (with a PNG bar plot of counts per stage) per run date.

Reads the step records under `_runs/dt=D/` (written by `reki_core.runlog`) generically, so a stage
can record whatever it measures: int fields (top level or one nested dict deep) are counts, float
fields are metrics, `seconds` is the step's timing, and dicts shaped like `GateResult.summary()`
(keys `gate` and `success`) are gate results. LLM calls/tokens and cache hits are counts picked out
by name. The publisher stores the files beside the version and links them from the manifest.

The run's Great Expectations Data Docs (`reki_core.quality.data_docs`) are rebuilt from the gates' kept
validation results, copied beside the pages as `data_docs/` and packed as `run_report_<dt>_data_docs.zip`
(one plain file, so it travels with the report into the published version). A failure to build them is
logged and shown in the report; it never stops the report.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from reki_core.quality.data_docs import DATA_DOCS_DIR, build_data_docs, runs_path
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake, as_date

logger = logging.getLogger(__name__)

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
    docs = summary.get("data_docs", {"error": "not attempted"})
    if "index" in docs:
        lines += [f"Great Expectations Data Docs: [{docs['index']}]({docs['index']}) (in the lake: {docs['uri']}; "
                  f"packed as [{docs['archive']}]({docs['archive']}))", ""]
    else:
        lines += [f"Great Expectations Data Docs: NOT BUILT ({docs['error']})", ""]
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
    docs = summary.get("data_docs", {"error": "not attempted"})
    if "index" in docs:
        parts.append(f"<p>Great Expectations Data Docs: <a href='{esc(docs['index'], quote=True)}'>{esc(docs['index'])}"
                     f"</a> (in the lake: {esc(docs['uri'])}; packed as "
                     f"<a href='{esc(docs['archive'], quote=True)}'>{esc(docs['archive'])}</a>)</p>")
    else:
        parts.append(f"<p class='failed'>Great Expectations Data Docs: NOT BUILT ({esc(docs['error'])})</p>")
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


def _zip_folder(folder: Path, archive: Path) -> None:
    """Pack `folder` with fixed timestamps and sorted entries: the same docs give the same bytes."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"data_docs/{path.relative_to(folder).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())


def _copy_data_docs(lake: Lake, day: str, out: Path, archive: Path) -> dict[str, str]:
    """Rebuild the run's Data Docs in the lake, copy them to `out/data_docs/` and pack them into `archive`."""
    uri = build_data_docs(lake, day)
    source = f"{lake.root}/{runs_path(day, DATA_DOCS_DIR)}"
    local = out / DATA_DOCS_DIR
    for path in lake.fs.find(source):
        target = local / path[len(source) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        lake.fs.get_file(path, str(target))
    _zip_folder(local, archive)
    return {"uri": uri, "index": f"{DATA_DOCS_DIR}/index.html", "archive": archive.name}


def write_run_report(lake: Lake, dt_value: str | dt.date, out_dir: str | Path) -> dict[str, str]:
    """Write `run_report_<dt>.{md,html,json}`, `run_report_<dt>_counts.png`, the Data Docs (`data_docs/` and
    `run_report_<dt>_data_docs.zip`) into `out_dir`; returns the paths of the files (folder left out)."""
    summary = summarise_run(lake, dt_value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"run_report_{summary['dt']}"
    archive = out / f"{stem}_data_docs.zip"
    # A re-run of the report never shows or publishes the docs of an earlier run.
    shutil.rmtree(out / DATA_DOCS_DIR, ignore_errors=True)
    archive.unlink(missing_ok=True)
    try:
        summary["data_docs"] = _copy_data_docs(lake, summary["dt"], out, archive)
    except FileNotFoundError as exc:  # no gate kept results (e.g. a run stopped before its first gate)
        logger.warning("run report dt=%s: no Great Expectations Data Docs: %s", summary["dt"], exc)
        summary["data_docs"] = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the report must still be written, with the reason shown
        logger.exception("run report dt=%s: building the Great Expectations Data Docs FAILED", summary["dt"])
        shutil.rmtree(out / DATA_DOCS_DIR, ignore_errors=True)
        summary["data_docs"] = {"error": f"{type(exc).__name__}: {exc}"}
    plot_path = out / f"{stem}_counts.png"
    plot_name = plot_path.name if _plot_counts(summary, plot_path) else None
    paths = {"markdown": out / f"{stem}.md", "html": out / f"{stem}.html", "json": out / f"{stem}.json"}
    paths["markdown"].write_text(_markdown(summary, plot_name))
    paths["html"].write_text(_html(summary, plot_name))
    paths["json"].write_text(json.dumps(summary, indent=2, default=str))
    if plot_name:
        paths["plot"] = plot_path
    if archive.exists():
        paths["data_docs"] = archive
    return {k: str(v) for k, v in paths.items()}
