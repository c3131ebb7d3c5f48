"""The run's Great Expectations Data Docs: real gates keep their results, GX's site builder renders them,
the run report links and packs them, and a broken build never changes a gate's verdict."""

from __future__ import annotations

import datetime as dt
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reki_core.quality import data_docs
from reki_core.quality.features import run_feature_gates
from reki_core.quality.gx import GateError, suite_name
from reki_core.quality.vectors import gate_vectors
from reki_core.report import write_run_report

DAY = dt.date(2024, 1, 2)
TS = 1_704_153_600  # 2024-01-02T00:00:00Z


def seed_features(lake) -> None:
    """Feature partitions of DAY that pass every feature gate."""
    lake.write_partition(pd.DataFrame({"item_id": ["i1", "i2"], "popularity": [3, 1],
                                       "metadata_hash": ["h1", "h2"]}), "features/items", DAY)
    history = [{"ts": TS - 20, "item_id": "i1"}, {"ts": TS - 10, "item_id": "i2"}, {"ts": TS - 5, "item_id": "i1"}]
    # u1 had 3 interactions when its window was cut: the earliest (3 + 1) // 2 = 2 of them.
    lake.write_partition(pd.DataFrame({"user_id": ["u1", "u2"], "history": [history, history[:1]],
                                       "n_interactions": [3, 1], "window": [history[:2], history[:1]],
                                       "window_n": [3, 1], "as_of": [TS - 10, TS - 20]}), "features/user_history", DAY)
    lake.write_partition(pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["i1", "i2", "i1", "i2"],
                                       "ts": [TS, TS + 1, TS + 2, TS + 3], "label": [1, 0, 1, 0],
                                       "split": ["train", "train", "valid", "test"],
                                       "knowledge_as_of": [TS - 1] * 4,
                                       "hist_item_ids": [["i1"], ["i1", "i2"], [], ["i1"]]}),
                         "features/ctr_samples", DAY)


def record_feature_checks(lake) -> dict:
    """The checks the feature_checks job records for seed_features' partitions (nothing broken, no groups)."""
    from reki_core.quality.features import DAY_FINGERPRINTED, FINGERPRINTED
    from reki_core.quality.recorded import partition_fingerprint
    from reki_core.runlog import record_step

    nothing = {"failed": {}, "examples": []}
    checks = {"items": {"rows": 2, **nothing}, "users": 2, "clusters": None,
              "user_history": {"rows": 2, **nothing}, "ctr_samples": {"rows": 4, **nothing},
              "fingerprint": {"features/items": partition_fingerprint(lake, "features/items", DAY,
                                                                      FINGERPRINTED["features/items"], 2),
                              "features/clusters": None},
              "day_fingerprint": {dataset: partition_fingerprint(lake, dataset, DAY, columns, 2, day_rows=True)
                                  for dataset, columns in DAY_FINGERPRINTED.items()}}
    record_step(lake, DAY, "feature_checks", {"success": True, "checks": checks})
    return checks


def seed_vectors(lake, dim: int) -> None:
    rows = [("user", "u1"), ("user", "u2"), ("item", "i1"), ("item", "i2")]
    lake.write_partition(pd.DataFrame({"entity_kind": [k for k, _ in rows], "entity_id": [e for _, e in rows],
                                       "vector": [np.full(dim, 0.5).tolist() for _ in rows], "model_version": "m1"}),
                         "vectors/augmented", DAY)
    lake.write_partition(pd.DataFrame({"entity_kind": [k for k, _ in rows], "entity_id": [e for _, e in rows]}),
                         "knowledge/assigned", DAY)


def record_vector_checks(lake, cfg, dim: int) -> dict:
    """The checks the vectors_checks job records for seed_vectors' partition on seed_features' entities: every row
    of the wrong dimension unless `dim` is the tower's."""
    from reki_core.quality.recorded import partition_fingerprint
    from reki_core.quality.vectors import vector_rows
    from reki_core.runlog import record_step

    keys = ["user:u1", "user:u2", "item:i1", "item:i2"]
    good = dim == cfg.model.expert_output_dim
    rows = [{"key": k, "has_vector": True, "expected": True, "lost_vector": None, "dim": dim, "finite": True,
             "model_version": "m1"} for k in keys]
    checks = {"rows": 4, "failed": {} if good else {"dim": 4}, "examples": [] if good else rows,
              "model_versions": 1, "fingerprint": partition_fingerprint(
                  lake, "vectors/augmented", DAY, ["entity_kind", "entity_id", "vector", "model_version"], 2,
                  rows_of=vector_rows)}
    record_step(lake, DAY, "vectors_checks", {"success": True, "checks": checks})
    return checks


def pages(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}


def status(validation_page: str) -> str:
    """The overall status GX prints at the top of a validation page."""
    return re.search(r"Status:</span>\s*<i[^>]*></i>\s*(Succeeded|Failed)", validation_page).group(1)


def test_passing_and_failing_gates_are_rendered_and_linked_from_the_report(cfg, lake, tmp_path):
    seed_features(lake)
    seed_vectors(lake, dim=cfg.model.expert_output_dim - 1)  # wrong size: the vectors gate fails
    record_vector_checks(lake, cfg, dim=cfg.model.expert_output_dim - 1)
    record_feature_checks(lake)  # what the feature_checks job records for these partitions
    assert run_feature_gates(cfg, DAY, lake)["success"] is True
    site = Path(lake.root) / f"_runs/dt={DAY}/data_docs"
    first_build = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    with pytest.raises(GateError, match="column 'dim'") as failed:
        gate_vectors(cfg, DAY, lake)
    # The later gate rendered its own pages and the index; the first gate's files were left as they were.
    rewritten = {p for p, mtime in first_build.items() if p.stat().st_mtime_ns != mtime}
    assert rewritten == {site / "index.html"}, rewritten

    # The failing gate's docs exist before anything after it runs: that is when people look.
    record = lake.read_json(f"_runs/dt={DAY}/vectors_gate.json")
    assert record["success"] is False and record["data_docs"] == str(site / "index.html")
    assert failed.value.result.data_docs == record["data_docs"]  # what an alert can link to
    html = pages(site)
    index = html["index.html"]
    suites = [suite_name("features", d) for d in ("features/items", "features/user_history", "features/ctr_samples",
                                                  "features/ctr_samples#state")]
    failing_suite = suite_name("vectors", f"vectors/augmented/dt={DAY}")
    for name in suites + [failing_suite]:
        assert name in index, name
    # One validation page per suite run, each under its gate step; the failing one says so.
    validation_pages = {path: page for path, page in html.items() if path.startswith("validations/")}
    assert len(validation_pages) == 5
    statuses = sorted((path.split("/")[-3], status(page)) for path, page in validation_pages.items())
    assert statuses == [("feature_gates", "Succeeded")] * 4 + [("vectors_gate", "Failed")]
    (vectors_page,) = [page for path, page in validation_pages.items() if "/vectors_gate/" in path]
    assert "dim" in vectors_page and f"Data asset: vectors/augmented/dt={DAY}" in vectors_page
    # The suite page names each expectation's type (the name alerts and GateError messages use).
    (vectors_suite,) = [page for path, page in html.items() if path.startswith("expectations/vectors/")]
    assert "expect_column_values_to_be_in_set" in vectors_suite

    paths = write_run_report(lake, DAY, tmp_path / "report")
    markdown = Path(paths["markdown"]).read_text()
    assert "Great Expectations Data Docs: [data_docs/index.html](data_docs/index.html)" in markdown
    assert f"[run_report_{DAY}_data_docs.zip](run_report_{DAY}_data_docs.zip)" in markdown
    assert "<a href='data_docs/index.html'>" in Path(paths["html"]).read_text()
    # The report rebuilt the docs from the kept results: the same pages, beside the report and packed.
    rebuilt = pages(site)
    assert sorted(rebuilt) == sorted(html)
    assert pages(tmp_path / "report" / "data_docs") == rebuilt
    with zipfile.ZipFile(paths["data_docs"]) as zf:
        assert zf.read("data_docs/index.html").decode() == rebuilt["index.html"]
        assert sum(n.startswith("data_docs/validations/") for n in zf.namelist()) == len(validation_pages)


def test_a_site_missing_an_earlier_gates_page_is_built_whole(cfg, lake):
    """An earlier gate's build that failed left its page out: the next gate builds the site whole, not onto it."""
    seed_features(lake)
    seed_vectors(lake, dim=cfg.model.expert_output_dim)
    record_vector_checks(lake, cfg, dim=cfg.model.expert_output_dim)
    record_feature_checks(lake)
    assert run_feature_gates(cfg, DAY, lake)["success"] is True
    site = Path(lake.root) / f"_runs/dt={DAY}/data_docs"
    lost = sorted(site.glob("validations/**/*.html"))[0]
    lost.unlink()
    gate_vectors(cfg, DAY, lake)
    assert lost.exists()
    assert sum(path.startswith("validations/") for path in pages(site)) == 5


def test_a_rerun_of_a_gate_replaces_its_results_and_a_broken_build_leaves_the_verdict(cfg, lake, monkeypatch, caplog):
    seed_features(lake)
    seed_vectors(lake, dim=cfg.model.expert_output_dim)
    record_vector_checks(lake, cfg, dim=cfg.model.expert_output_dim)
    gate_vectors(cfg, DAY, lake)
    gate_vectors(cfg, DAY, lake)  # idempotent per date: still one kept result for the step
    assert len(data_docs.stored_validations(lake, DAY)) == 1
    # and one page for it: the re-run's site was built whole, without the first run's page
    site = Path(lake.root) / f"_runs/dt={DAY}/data_docs"
    assert sum(path.startswith("validations/") for path in pages(site)) == 1

    def broken(lake, day, step=None):
        raise OSError("disk full")

    seed_vectors(lake, dim=cfg.model.expert_output_dim - 1)
    record_vector_checks(lake, cfg, dim=cfg.model.expert_output_dim - 1)
    monkeypatch.setattr(data_docs, "build_data_docs", broken)
    with caplog.at_level(logging.ERROR, logger="reki_core.quality.data_docs"):
        with pytest.raises(GateError, match="column 'dim'"):
            gate_vectors(cfg, DAY, lake)
    assert "were NOT written" in caplog.text and "disk full" in caplog.text
    record = lake.read_json(f"_runs/dt={DAY}/vectors_gate.json")
    assert record["success"] is False and record["data_docs"] is None
    # The failing results are kept, so the next build (e.g. the report's) renders them.
    (kept,) = data_docs.stored_validations(lake, DAY)
    assert kept["result"]["success"] is False


def test_report_says_when_there_are_no_docs(lake, tmp_path):
    from reki_core.runlog import record_step

    record_step(lake, DAY, "land", {"rows": 3})
    paths = write_run_report(lake, DAY, tmp_path / "report")
    assert "data_docs" not in paths
    assert "Great Expectations Data Docs: NOT BUILT (no GX validation results under" in Path(paths["markdown"]).read_text()
