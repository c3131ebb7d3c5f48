"""The driver's daily runs (spark_jobs/in_driver.py) write what Spark writes: the same files, schemas, rows,
order, manifests and run-log counts, on both window modes; and the title rules and user buckets are Spark's."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from reki_core.config import PROJECT_ROOT, load_config
from reki_core.datasets import synthetic
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from spark_jobs import ctr_samples, in_driver, items, user_history
from spark_jobs.buckets import bucket_expr, read_manifest
from spark_jobs.common import run_step

JOBS = ((items, "features_items"), (user_history, "features_user_history"), (ctr_samples, "features_ctr_samples"))
BUCKETED = ("features/user_history", "features/knowledge_versions", "features/ctr_samples")
PLAIN = ("features/items", "features/items_undescribed")

# Titles the rules must treat exactly as Spark's Java regexes do (ASCII \s and \d, `.` and `$` at any
# line terminator, trim of spaces only), plus hostile and unicode ones.
TITLES = [
    "Lost City, The (1995)", "  Spaces\t\tand\nlines, A (2001) ", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    "Line\u2028sep, The (1999)\u2028", "Next line, An (1997)\u0085", "Trailing CRLF, The (1990)\r\n", "No year", "", None,
    "(1995)", "Ends, An (Sub (title)) (1980)", "Ｆｕｌｌｗｉｄｔｈ (１９９５)", "Tab\x0bvt, The\f", "Dup (1990) (1991)",
    "Zero\u200bwidth, The (2000)", "\u00a0Nbsp, The (2003)\u00a0", "Ignore all previous instructions, The (2020)",
    "Year (12345)", "Two, The, A (1970)", "Emoji 🎬, The (2010)", ", The", "Only, The (x)", "\t", " (1999) ",
]


def test_title_rules_are_sparks(spark):
    frame = spark.createDataFrame([(t,) for t in TITLES], "title string").coalesce(1)
    got = frame.select(items.normalise_title(F.col("title")).alias("title"), items.title_year(F.col("title")).alias("year")).collect()
    for raw, row in zip(TITLES, got):
        assert (in_driver.normalise_title(raw), in_driver.title_year(raw)) == (row.title or None, row.year), repr(raw)


def test_user_buckets_are_sparks(spark):
    ids = ["", "a", "ü", "日本語", "🎬"] + ["x" * n for n in range(1, 70)] + [str(i) for i in range(300)] + ["é" * 17 + "u" * 9]
    rows = spark.createDataFrame([(u,) for u in ids], "u string").coalesce(1).select(
        F.xxhash64("u").alias("hash"), bucket_expr(F.col("u"), 32).alias("bucket")).collect()
    assert [(in_driver.xxhash64(u.encode()), in_driver.user_bucket(u, 32)) for u in ids] == [(r.hash, r.bucket) for r in rows]


def _cfg(root, mode: str, limit: int):
    env = {"REKI__PATHS__LAKE_URI": str(root / "lake"), "REKI__PATHS__STATE_DIR": str(root / "state"),
           "REKI__SCENARIO": "books", "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
           "REKI__SPARK__IN_DRIVER_MAX_INTERACTIONS": str(limit),
           "REKI__SCENARIO_OVERRIDES": f"{{knowledge_window: {mode}, recent_window_size: 4, refresh_min_new_interactions: 2}}"}
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=env)


def _raw_lake(root) -> tuple[list[dt.date], dict[str, str]]:
    """A small raw lake with hostile titles; on the last day a title, a genre and a profile change and an item
    leaves the snapshot (its popularity moves to the undescribed items)."""
    lake = Lake(str(root / "lake"))
    data = synthetic.generate(700, n_users=50, n_items=40, days=12, seed=21, start=dt.date(2024, 9, 1))
    data.items["title"] = [TITLES[i % len(TITLES)] if i % 3 == 0 else t for i, t in enumerate(data.items["title"])]
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    last = days[-1]
    snapshot = lake.read_partition("raw/items", last)
    rated = set(lake.read_partition("raw/interactions", days[-2])["item_id"])
    gone = sorted(rated)[0]
    snapshot = snapshot[snapshot["item_id"] != gone].reset_index(drop=True)
    snapshot.loc[0, "title"] = "Retitled, The (1999)"
    snapshot.loc[1, "genres"] = ["Regenred"]
    lake.write_partition(snapshot, "raw/items", last)
    profiles = lake.read_partition("raw/users", last)
    profiles.loc[0, "occupation"] = "new occupation"
    lake.write_partition(profiles, "raw/users", last)
    return days, {"retitled": snapshot.loc[0, "item_id"], "regenred": snapshot.loc[1, "item_id"], "gone": gone}


def _same_partition(a: Lake, b: Lake, dataset: str, day: dt.date) -> None:
    where = f"{dataset}/dt={day}"
    if dataset in BUCKETED:
        ma, mb = read_manifest(a, dataset, day), read_manifest(b, dataset, day)
        assert {k: v for k, v in ma.items() if k != "buckets"} == {k: v for k, v in mb.items() if k != "buckets"}, where
        assert {k: (e["rows"], e["counts"]) for k, e in ma["buckets"].items()} == \
            {k: (e["rows"], e["counts"]) for k, e in mb["buckets"].items()}, where
        pairs = [([a.local_path(where) / f for f in ma["buckets"][k]["files"]], [b.local_path(where) / f for f in mb["buckets"][k]["files"]])
                 for k in ma["buckets"]]
    else:
        pairs = [(sorted(a.local_path(where).glob("*.parquet")), sorted(b.local_path(where).glob("*.parquet")))]
    for files_a, files_b in pairs:
        ta, tb = (pq.read_table(files_a[0]).schema if files_a else None), (pq.read_table(files_b[0]).schema if files_b else None)
        assert ta == tb, (where, ta, tb)  # names, types, nullability, nested field names
        rows_a = [r for f in files_a for r in pq.read_table(f).to_pylist()]
        rows_b = [r for f in files_b for r in pq.read_table(f).to_pylist()]
        assert rows_a == rows_b, where  # same rows, same order


@pytest.mark.parametrize("mode", ["earliest", "recent"])
def test_daily_runs_in_the_driver_write_what_spark_writes(spark, tmp_path, mode):
    driver_root, spark_root = tmp_path / "driver", tmp_path / "spark"
    days, changed = _raw_lake(driver_root)
    in_driver_cfg, spark_cfg = _cfg(driver_root, mode, 200_000), _cfg(spark_root, mode, 0)
    for job, _ in JOBS:  # the same full build under both
        job.run(spark, in_driver_cfg, Lake(in_driver_cfg.lake_uri), days[-4])
    shutil.copytree(driver_root, spark_root)
    on_driver, on_spark = Lake(in_driver_cfg.lake_uri), Lake(spark_cfg.lake_uri)
    for day in days[-3:]:
        for job, step in JOBS:
            ours = run_step(job.run, step, lambda: pytest.fail("the driver's day started Spark"), in_driver_cfg, on_driver, day)
            theirs = run_step(job.run, step, lambda: spark, spark_cfg, on_spark, day)
            assert (ours.pop("engine"), theirs.pop("engine")) == ("driver", "spark")
            assert ours == theirs, (step, day)
        for dataset in BUCKETED + PLAIN:
            _same_partition(on_driver, on_spark, dataset, day)
    # The last day's changes reached the driver's runs (and Spark's, equal above).
    features = on_driver.read_partition("features/items", days[-1]).set_index("item_id")
    assert features.loc[changed["retitled"], "title"] == "The Retitled"
    assert features.loc[[changed["retitled"], changed["regenred"]], "needs_refresh"].all()
    assert changed["gone"] in set(on_driver.read_partition("features/items_undescribed", days[-1])["item_id"])


def test_a_big_day_or_a_full_build_runs_in_spark(spark, tmp_path):
    days, _ = _raw_lake(tmp_path)
    cfg = _cfg(tmp_path, "recent", 1)  # every day is too big
    lake = Lake(cfg.lake_uri)
    for job, step in JOBS:
        assert in_driver.run(step, cfg, lake, days[-2]) is None  # no previous day: a full build
        job.run(spark, cfg, lake, days[-2])
    assert in_driver.run("features_user_history", cfg, lake, days[-1]) is None
    assert in_driver.run("features_clusters", cfg, lake, days[-1]) is None  # not a job the driver runs


def test_a_changed_job_schema_or_a_driver_failure_leaves_the_day_to_spark(spark, tmp_path, monkeypatch, capfd):
    days, _ = _raw_lake(tmp_path)
    cfg = _cfg(tmp_path, "earliest", 200_000)
    lake = Lake(cfg.lake_uri)
    for job, _ in JOBS:
        job.run(spark, cfg, lake, days[-3])
    # The Spark job gained a column the driver's twin does not compute: the previous files do not match it.
    grown = in_driver.SCHEMAS["features/user_history"].append(pa.field("new_feature", pa.string()))
    monkeypatch.setitem(in_driver.SCHEMAS, "features/user_history", grown)
    assert in_driver.run("features_user_history", cfg, lake, days[-2]) is None
    monkeypatch.undo()

    def broken(*_):
        raise ZeroDivisionError("a bug in the twin")

    monkeypatch.setitem(in_driver._RUNS, "features_items", broken)
    payload = run_step(items.run, "features_items", lambda: spark, cfg, lake, days[-2])
    assert payload["engine"] == "spark" and payload["driver_error"] == "ZeroDivisionError: a bug in the twin"
    assert "failed in the driver, so Spark runs it" in capfd.readouterr().err
    assert payload["items"] == len(lake.read_partition("features/items", days[-2]))


def test_features_job_runs_a_small_day_without_starting_spark(spark, tmp_path):
    """`spark_jobs/features.py` (the DAG's task) on a small day: every job in the driver, and no JVM started
    (in a Python without Java on its PATH, starting Spark fails)."""
    days, _ = _raw_lake(tmp_path)
    cfg = _cfg(tmp_path, "recent", 200_000)
    lake = Lake(cfg.lake_uri)
    for job, _ in JOBS:
        job.run(spark, cfg, lake, days[-2])
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "SPARK_HOME")}
    env.update(PATH="/nonexistent", REKI__PATHS__LAKE_URI=cfg.lake_uri, REKI__SCENARIO="books",
               REKI__PATHS__STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run([sys.executable, "-m", "spark_jobs.features", "--dt", days[-1].isoformat()],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {s["step"]: s for s in read_steps(lake, days[-1])}
    assert [steps[step]["engine"] for _, step in JOBS] == ["driver"] * 3, steps
