"""The run report from hand-made step records: counts, LLM, cache, gates, metrics, timings, plot."""

from __future__ import annotations

import json

import pytest

from reki_core.report import summarise_run, write_run_report
from reki_core.runlog import record_step

DAY = "2026-01-05"


def make_records(lake):
    record_step(lake, DAY, "land", {
        "started_at": "2026-01-06T00:00:01+00:00", "seconds": 2.5, "rows": 1200, "users": 80, "items": 300,
        "gate": {"gate": "raw_interactions", "dataset": "raw/interactions", "rows": 1200, "success": True,
                 "evaluated": 6, "failed": [], "warnings": []},
    })
    record_step(lake, DAY, "extract", {
        "started_at": "2026-01-06T00:00:10+00:00", "seconds": 95.0,
        "counts": {"prompts": 380, "llm_calls": 120, "cache_hits": 260},
        "llm": {"prompt_tokens": 48000, "completion_tokens": 5760},
        "failure_rate": 0.0083,
        "gates": [
            {"gate": "llm_answers", "dataset": "knowledge/store", "rows": 120, "success": False, "evaluated": 5,
             "failed": ["expect_column_value_lengths_to_be_between column 'text' {'min_value': 1}: 4 unexpected"],
             "warnings": []},
        ],
        "smoke_model": True,
    })
    record_step(lake, DAY, "train", {
        "started_at": "2026-01-06T00:02:00+00:00", "seconds": 40.25, "train_samples": 80000,
        "metrics": {"auc": 0.7712, "logloss": 0.5531, "auc_baseline": 0.7598}, "epochs": 7,
    })


def test_summary_reads_every_kind_of_field_generically(lake):
    make_records(lake)
    summary = summarise_run(lake, DAY)
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == ["land", "extract", "train"]  # in start order
    assert steps["land"]["counts"] == {"rows": 1200, "users": 80, "items": 300}
    assert steps["extract"]["counts"] == {"prompts": 380, "llm_calls": 120, "cache_hits": 260,
                                          "llm.prompt_tokens": 48000, "llm.completion_tokens": 5760}
    assert steps["extract"]["metrics"] == {"failure_rate": 0.0083}  # bool smoke_model is neither
    assert steps["train"]["metrics"] == {"metrics.auc": 0.7712, "metrics.logloss": 0.5531, "metrics.auc_baseline": 0.7598}
    assert {(x["name"], x["value"]) for x in summary["llm"]} == {
        ("llm_calls", 120), ("llm.prompt_tokens", 48000), ("llm.completion_tokens", 5760), ("prompts", 380)}
    assert [(x["name"], x["value"]) for x in summary["cache"]] == [("cache_hits", 260)]
    assert [(g["step"], g["gate"], g["success"]) for g in summary["gates"]] == [
        ("land", "raw_interactions", True), ("extract", "llm_answers", False)]
    assert summary["gates_failed"] == 1
    assert summary["total_seconds"] == pytest.approx(137.75)


def test_report_files_hold_counts_gates_metrics_and_a_png_plot(lake, tmp_path):
    make_records(lake)
    paths = write_run_report(lake, DAY, tmp_path / "report")
    assert set(paths) == {"markdown", "html", "json", "plot"}

    md = open(paths["markdown"]).read()
    assert md.startswith(f"# REKI run report: dt={DAY}")
    assert "3 steps, 137.75 s in steps; 1 of 2 gates failed" in md
    assert f"![counts per stage](run_report_{DAY}_counts.png)" in md
    for row in ("| land | rows | 1200 |", "| extract | llm.prompt_tokens | 48000 |", "| extract | cache_hits | 260 |",
                "| train | metrics.auc | 0.7712 |", "| train | 2026-01-06T00:02:00+00:00 | 40.25 |"):
        assert row in md, row
    assert "| extract | llm_answers | knowledge/store | 120 | FAILED | expect_column_value_lengths_to_be_between" in md
    assert "| land | raw_interactions | raw/interactions | 1200 | passed | - |" in md

    page = open(paths["html"]).read()
    assert f"<img src='run_report_{DAY}_counts.png'" in page
    assert "<td class='failed'>FAILED</td>" in page
    assert "{&#x27;min_value&#x27;: 1}" in page  # expectation text is escaped

    with open(paths["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(paths["plot"]).shape[:2]
    assert width == 800 and height > 100

    assert json.loads(open(paths["json"]).read())["gates_failed"] == 1


def test_report_without_counts_has_no_plot_and_no_records_is_an_error(lake, tmp_path):
    record_step(lake, DAY, "publish", {"started_at": "2026-01-06T00:05:00+00:00", "seconds": 1.0, "version": "v7"})
    paths = write_run_report(lake, DAY, tmp_path / "report")
    assert "plot" not in paths
    assert "![counts per stage]" not in open(paths["markdown"]).read()
    assert "(none recorded)" in open(paths["markdown"]).read()

    with pytest.raises(FileNotFoundError, match=r"no step records for dt=2026-01-06 under .*_runs/dt=2026-01-06/"):
        write_run_report(lake, "2026-01-06", tmp_path / "empty")
