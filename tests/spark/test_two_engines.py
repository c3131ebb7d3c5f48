"""One implementation, two ways to run it: every feature job writes the same partitions on a classic session
and as a Spark Connect client (as the DAG runs it), and nothing in `spark_jobs/` needs a classic session."""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from pyspark.testing import assertDataFrameEqual

from reki_core.config import PROJECT_ROOT, load_config
from reki_core.datasets import synthetic
from reki_core.storage.lake import Lake
from spark_jobs.common import jobs_named, read_day_changes, read_partition, run_jobs
from tests.conftest import copy_lake

JOBS = ["items", "user_history", "ctr_samples", "clusters"]
DATASETS = ("features/items", "features/items_undescribed", "features/user_history", "features/knowledge_versions",
            "features/ctr_samples", "features/clusters")
SPARK_JOBS = PROJECT_ROOT / "spark_jobs"


def _env(root, window: str) -> dict[str, str]:
    return {"REKI__PATHS__LAKE_URI": str(root / "lake"), "REKI__PATHS__STATE_DIR": str(root / "state"),
           "REKI__SCENARIO": "books", "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
           "REKI__SCENARIO_OVERRIDES": "{max_group_size_items: 12, max_group_size_users: 10, "
                                       f"extraction_mode: collective, knowledge_window: {window}}}"}


def client(check: str, spark_connect, env: dict[str, str] | None = None, **args) -> dict:
    """Run a check of tests/spark/connect_client.py in a process of its own (see there why), against the test server."""
    proc = subprocess.run([sys.executable, "-m", "tests.spark.connect_client", check,
                           json.dumps({"url": spark_connect.url, **args})],
                          env={**os.environ, **spark_connect.env(), **(env or {})}, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _without_timings(payload: dict) -> dict:
    return {k: v for k, v in payload.items() if k not in ("seconds", "started_at", "finished_at", "duration_s")}


# The window changes only user_history and ctr_samples: the clusters job (its three fits the slowest) runs in one
# case, and on the last day only: it keeps no state from one day to the next.
@pytest.mark.parametrize("window, jobs, least_compared", [("earliest", JOBS, 13), ("recent", JOBS[:3], 12)])
def test_jobs_write_the_same_partitions_on_a_classic_session_and_on_connect(spark, spark_connect, tmp_path, window,
                                                                            jobs, least_compared):
    classic_root, connect_root = tmp_path / "classic", tmp_path / "connect"
    data = synthetic.generate(1500, n_users=30, n_items=50, days=4, seed=11, start=dt.date(2024, 5, 1))
    days = synthetic.write_raw_lake(Lake(str(classic_root / "lake")), data.interactions, data.users, data.items)
    copy_lake(classic_root / "lake", connect_root / "lake")
    # A full build, then two daily runs (the second one's state comes from a daily run).
    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=_env(classic_root, window))
    jobs_by_day = [[job for job in jobs if job != "clusters"]] * 2 + [jobs]
    on_classic = [run_jobs(spark, jobs_named(day_jobs), cfg, Lake(cfg.lake_uri), day)
                  for day, day_jobs in zip(days[-3:], jobs_by_day)]
    on_connect = client("run", spark_connect, _env(connect_root, window), jobs=jobs_by_day,
                        days=[d.isoformat() for d in days[-3:]])["results"]
    for a, b in zip(on_classic, on_connect):
        assert a.keys() == b.keys()
        for step in a:
            assert _without_timings(json.loads(json.dumps(a[step], default=str))) == _without_timings(b[step]), step
    assert on_connect[-1]["features_user_history"]["incremental_from"] == days[-2].isoformat()
    classic_lake, connect_lake = Lake(str(classic_root / "lake")), Lake(str(connect_root / "lake"))
    compared = rows = 0
    for day in days[-3:]:
        for dataset in DATASETS:
            if not classic_lake.has_partition(dataset, day):
                assert not connect_lake.has_partition(dataset, day), (dataset, day)
                continue
            expected = read_partition(spark, classic_lake, dataset, day)
            actual = read_partition(spark, connect_lake, dataset, day)
            assertDataFrameEqual(actual, expected, checkRowOrder=False)
            rows += expected.count()
            if classic_lake.key_of(dataset):  # and the same changes stored under the day
                assert classic_lake.day_kinds(dataset) == connect_lake.day_kinds(dataset), dataset
                assertDataFrameEqual(read_day_changes(spark, connect_lake, dataset, day),
                                     read_day_changes(spark, classic_lake, dataset, day), checkRowOrder=False)
            compared += 1
    assert compared >= least_compared and rows > 1500, (compared, rows)


def test_a_released_session_leaves_nothing_for_the_next_try(spark_connect):
    result = client("isolation", spark_connect)
    assert len(set(result["sessions"])) == 2


def test_a_stopped_session_freed_later_leaves_the_shared_release_pool_alone(spark_connect):
    result = client("finalizer", spark_connect)
    assert result["plain_shutdowns_when_freed"] == 1, result  # pyspark's finalizer: what hung `airflow dags test`
    assert result["ours_shutdowns_when_freed"] == 0, result


@pytest.mark.parametrize("in_threads", [False, True], ids=["on-the-task-thread", "in-a-job-s-threads"])
def test_killing_the_task_interrupts_its_spark_operation(spark_connect, in_threads):
    result = client("interrupt", spark_connect, in_threads=in_threads)
    assert "OPERATION_CANCELED" in result["error"] or "cancel" in result["error"].lower(), result
    assert result["after_kill_s"] < 30, result


def _spark_jobs_modules() -> dict[str, ast.Module]:
    return {f"spark_jobs.{p.stem}": ast.parse(p.read_text()) for p in sorted(SPARK_JOBS.glob("*.py"))}


def test_nothing_in_spark_jobs_touches_the_spark_context_or_rdds():
    banned = {"sparkContext", "rdd", "_jsc", "_jvm", "_jdf", "_jsparkSession", "SparkContext", "RDD"}
    found = [(module, node.lineno, name) for module, tree in _spark_jobs_modules().items() for node in ast.walk(tree)
             for name in [getattr(node, "attr", None) or getattr(node, "id", None)
                          or (getattr(node, "names", None) and ",".join(a.name for a in node.names))]
             if name and set(name.split(",")) & banned]
    assert not found, found


def test_spark_jobs_have_no_import_circle_and_each_module_imports_alone():
    modules = _spark_jobs_modules()
    graph = {name: {alias.name if isinstance(node, ast.Import) else
                    (f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
                    for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} & modules.keys()
             for name, tree in modules.items()}
    assert graph["spark_jobs.features"] and graph["spark_jobs.user_history"], graph  # the scan sees imports

    def circle_from(start, path=()):
        for nxt in graph[start]:
            if nxt in path:
                return [*path, nxt]
            if (found := circle_from(nxt, (*path, nxt))) is not None:
                return found
        return None

    circles = [c for m in graph if (c := circle_from(m, (m,)))]
    assert not circles, circles
    for module in modules:  # each in a fresh interpreter: no module relies on another having been imported first
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (module, proc.stderr[-2000:])
