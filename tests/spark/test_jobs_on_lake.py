"""The jobs against a lake: daily chain, re-run overwrites its partition, feature gates, real spark-submit."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest

from reki_core.config import PROJECT_ROOT
from reki_core.datasets import synthetic
from reki_core.quality.features import run_feature_gates
from reki_core.quality.gx import GateError
from reki_core.runlog import read_steps
from spark_jobs import clusters, ctr_samples, items, user_history

JOBS = (items, user_history, ctr_samples, clusters)


def _make_cfg(tmp_path):
    from reki_core.config import load_config

    env = {"REKI__PATHS__LAKE_URI": str(tmp_path / "lake"), "REKI__PATHS__STATE_DIR": str(tmp_path / "state"),
           "REKI__SCENARIO": "books", "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
           "REKI__SCENARIO_OVERRIDES": "{max_group_size_items: 12, max_group_size_users: 10, extraction_mode: collective}"}
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=env)


def test_daily_chain_rerun_overwrites_gates_pass_and_fail(spark, tmp_path):
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(900, n_users=20, n_items=40, days=3, seed=5, start=dt.date(2024, 5, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    for day in days[-2:]:
        for job in JOBS:
            job.run(spark, cfg, lake, day)
    last = days[-1]
    before = {ds: lake.read_partition(ds, last) for ds in ("features/user_history", "features/ctr_samples", "features/clusters")}
    files_before = sorted(p.name for p in lake.local_path(f"features/ctr_samples/dt={last}").iterdir())
    for job in JOBS:  # a re-run of the date replaces its partitions with the same content
        job.run(spark, cfg, lake, last)
    for ds, frame in before.items():
        again = lake.read_partition(ds, last)
        assert len(again) == len(frame)
        keys = ["clustering", "entity_id"] if ds.endswith("clusters") else ["user_id"] + (["ts", "item_id"] if "ctr" in ds else [])
        a, b = frame.sort_values(keys).reset_index(drop=True), again.sort_values(keys).reset_index(drop=True)
        assert a.astype(str).equals(b.astype(str)), ds
    assert len(sorted(p.name for p in lake.local_path(f"features/ctr_samples/dt={last}").iterdir())) == len(files_before)
    # Every interaction after its user's first window version is a sample; none before it is.
    first_as_of = lake.read_partition("features/knowledge_versions", last).groupby("user_id")["as_of"].min()
    later = data.interactions["ts"] > data.interactions["user_id"].map(first_as_of)
    assert len(lake.read_partition("features/ctr_samples", last)) == int(later.sum())

    summary = run_feature_gates(cfg, last, lake)
    assert summary["success"] and len(summary["gates"]) == 4
    assert any(s["step"] == "feature_gates" for s in read_steps(lake, last))

    # Break the label rate and a group size: the gate stops with both named and counted.
    samples = lake.read_partition("features/ctr_samples", last)
    samples["label"] = 1
    lake.write_partition(samples, "features/ctr_samples", last)
    groups = lake.read_partition("features/clusters", last)
    groups.loc[groups["clustering"] == "user_pos", "group_id"] = "one-big-group"
    lake.write_partition(groups, "features/clusters", last)
    with pytest.raises(GateError) as err:
        run_feature_gates(cfg, last, lake)
    message = str(err.value)
    assert "expect_column_mean_to_be_between column 'label'" in message
    assert "size_within_bound" in message and "1 unexpected" in message


def test_spark_submit_runs_a_job_file(tmp_path):
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(300, n_users=10, n_items=20, days=2, seed=9, start=dt.date(2024, 6, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    venv_bin = PROJECT_ROOT / ".venv" / "bin"
    # spark-submit finds SPARK_HOME through the `python3` on PATH: the venv's, as the DAG task sets it.
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "REKI__SCENARIO": "books",
           "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYSPARK_PYTHON": str(venv_bin / "python")}
    cmd = [str(PROJECT_ROOT / ".venv/bin/spark-submit"), "--master", "local[1]", str(PROJECT_ROOT / "spark_jobs/items.py"),
           "--lake", cfg.lake_uri, "--dt", days[-1].isoformat()]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = lake.read_partition("features/items", days[-1])
    assert set(out["item_id"]) == set(data.items["item_id"])
    assert out["popularity"].sum() == len(data.interactions)
    assert any(s["step"] == "features_items" for s in read_steps(lake, days[-1]))


def test_incremental_ctr_samples_equal_a_full_build(spark, tmp_path):
    """The daily ctr_samples run recomputes only dirty users (new interactions, or a re-genred item in their
    history) and carries the others: its partition equals a full build of the same day."""
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(400, n_users=60, n_items=30, days=5, seed=11, start=dt.date(2024, 7, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    prev, last = days[-2], days[-1]
    # An item rated before the last day by a user who rates nothing on it gets a new first genre on the last day.
    inter_days = synthetic.interaction_days(data.interactions)
    idle = set(data.interactions["user_id"]) - set(data.interactions.loc[inter_days == last, "user_id"])
    rows = data.interactions.assign(day=inter_days)[data.interactions["user_id"].isin(idle)].sort_values(["user_id", "ts"])
    spread = rows.groupby("user_id")["day"].nunique()
    rows = rows[rows["user_id"] == spread[spread >= 2].index[0]]
    regenred = rows["item_id"].iloc[-2]  # in the history features of that user's last sample
    snapshot = lake.read_partition("raw/items", last)
    snapshot["genres"] = [["Regenred"] if i == regenred else list(g) for i, g in zip(snapshot["item_id"], snapshot["genres"])]
    lake.write_partition(snapshot, "raw/items", last)

    for day in (prev, last):
        for job in (items, user_history):
            job.run(spark, cfg, lake, day)
        summary = ctr_samples.run(spark, cfg, lake, day)
    chained = lake.read_partition("features/ctr_samples", last)
    users = lake.read_partition("features/user_history", last)
    assert summary["incremental_from"] == prev.isoformat()
    assert 0 < summary["recomputed_users"] < len(users)  # the idle users' rows were carried

    lake.fs.rm(lake.partition_path("features/ctr_samples", prev), recursive=True)
    full_summary = ctr_samples.run(spark, cfg, lake, last)
    full = lake.read_partition("features/ctr_samples", last)
    assert full_summary["incremental_from"] is None
    keys = ["user_id", "ts", "item_id"]
    assert chained["hist_genres"].map(lambda g: "Regenred" in list(g)).any()
    a, b = chained.sort_values(keys).reset_index(drop=True), full.sort_values(keys).reset_index(drop=True)
    assert a.astype(str).equals(b.astype(str))
    # The written partition is in (user_id, ts, item_id) order either way.
    assert chained[keys].equals(a[keys])
