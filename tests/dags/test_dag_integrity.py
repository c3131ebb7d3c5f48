"""Every DAG file imports cleanly, is well-formed for operations, and parses without heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reki_core.config import PROJECT_ROOT

DAG_FILES = sorted((PROJECT_ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT_ROOT / "dags"))


def test_dag_files_exist():
    assert [p.name for p in DAG_FILES], "no DAG files found"


def test_no_import_errors(dagbag):
    assert not dagbag.import_errors, "DAG import errors:\n" + "\n".join(f"{k}: {v}" for k, v in dagbag.import_errors.items())


def test_every_dag_has_owner_retries_tags_and_docs(dagbag):
    assert dagbag.dags, "no DAGs loaded"
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id}: no tags"
        assert dag.doc_md, f"{dag_id}: no doc_md"
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", f"{dag_id}.{t.task_id}: owner not set"
            # Quality gates fail deterministically: they alert at once instead of retrying.
            if not t.task_id.endswith("_gate"):
                assert t.retries >= 1, f"{dag_id}.{t.task_id}: no retries"
            assert t.execution_timeout is not None, f"{dag_id}.{t.task_id}: no execution_timeout"


def test_every_task_that_may_use_cuda_shares_the_gpu_pool(dagbag):
    """Extraction, encoding, training and the adaptor all pick CUDA when there is one: never two at once."""
    daily, weekly = dagbag.dags["reki_daily_refresh"], dagbag.dags["reki_adaptor_training"]
    cuda_tasks = [daily.get_task(t) for t in ("extract", "encode", "train_if_no_model", "augment")]
    assert {t.pool for t in cuda_tasks + [weekly.get_task("train")]} == {"gpu"}
    assert all(t.pool != "gpu" for t in daily.tasks if t not in cuda_tasks)


def test_freshness_checks_are_scheduled_only_for_a_live_source(dagbag):
    """The embedded default replays 1998: an hourly freshness check against today would page every hour."""
    from reki_core.config import load_config

    assert load_config().scenario.source.kind != "files"
    assert type(dagbag.dags["reki_publish_freshness"].timetable).__name__ == "NullTimetable"


def test_daily_refresh_schedule_has_real_intervals(dagbag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    dag = dagbag.dags["reki_daily_refresh"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable), "a bare cron gives zero-length intervals"
    assert dag.catchup is False and dag.max_active_runs == 1


def test_a_manual_run_at_midnight_is_that_day_s_run(dagbag):
    """One run key per day: a manual run of D (logical date D) is what D's scheduled and backfill runs process, so
    a backfill with reprocess "none" skips it and one with "completed" re-runs it; a run triggered "now" processes
    the last complete day."""
    import pendulum
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = dagbag.dags["reki_daily_refresh"].timetable
    day = pendulum.datetime(1997, 9, 23, tz="UTC")
    scheduled = timetable.next_dagrun_info(last_automated_data_interval=DataInterval(day.subtract(days=1), day),
                                           restriction=TimeRestriction(earliest=None, latest=None, catchup=True))
    assert scheduled.logical_date == day
    assert timetable.infer_manual_data_interval(run_after=day) == scheduled.data_interval == DataInterval(day, day.add(days=1))
    assert timetable.infer_manual_data_interval(run_after=day.add(hours=7)) == DataInterval(day.subtract(days=1), day)


def test_the_daily_timetable_is_registered_for_the_scheduler(dagbag):
    """The scheduler and api-server rebuild the timetable from the serialized DAG: only a plugin's timetable can be."""
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    timetable = dagbag.dags["reki_daily_refresh"].timetable
    restored = decode_timetable(encode_timetable(timetable))
    assert type(restored) is type(timetable) and restored.serialize() == timetable.serialize()


# What the scheduler must not import each time it parses a DAG file: these belong inside tasks.
HEAVY_MODULES = ("pyspark", "torch", "transformers", "vllm", "great_expectations", "pandas", "pyarrow", "numpy", "sklearn")


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_without_heavy_imports(path: Path):
    """Parsing a DAG file in a fresh interpreter (beyond airflow's own import) loads none of the heavy modules."""
    code = (
        "import sys, runpy; import airflow.sdk; before = set(sys.modules); "
        f"runpy.run_path({str(path)!r}); print(' '.join(sorted({{m.split('.')[0] for m in set(sys.modules) - before}})))"
    )
    env_path = str(PROJECT_ROOT / "plugins")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.strip().splitlines()[-1].split())
    assert "reki_core" in loaded, "the probe saw no module the DAG file imports"
    assert not loaded & set(HEAVY_MODULES), f"{path.name} imports {sorted(loaded & set(HEAVY_MODULES))} at parse time"


def test_feature_tasks_are_spark_connect_clients(dagbag):
    """One way to run Spark in the DAG: its Spark tasks are clients of the Connect server, none a spark-submit."""
    from reki_core.config import load_config

    dag = dagbag.dags["reki_daily_refresh"]
    spark_tasks = {t.task_id: t for t in dag.tasks if type(t).__name__ == "SparkConnectJobs"}
    assert set(spark_tasks) >= {"land", "spark_features", "spark_clusters", "assign_knowledge", "prompts"}
    assert spark_tasks["land"].jobs == ["landing"]  # the deliveries into raw/ (spark_jobs/landing.py)
    assert spark_tasks["spark_features"].jobs == ["items", "user_history", "ctr_samples"]
    assert spark_tasks["spark_clusters"].jobs == ["clusters"]
    # Knowledge assignment is a Spark job too; it runs when the mapped extract has zero tasks (all cached).
    assert spark_tasks["assign_knowledge"].jobs == ["knowledge"]
    assert spark_tasks["assign_knowledge"].trigger_rule == "none_failed"
    assert [t.task_id for t in spark_tasks["assign_knowledge"].upstream_list] == ["extract"]
    assert [t.task_id for t in spark_tasks["assign_knowledge"].downstream_list] == ["answers_gate"]
    # The day's prompts too (spark_jobs/prompts.py, which also evaluates the prompts gate's rules).
    assert spark_tasks["prompts"].jobs == ["prompts"]
    assert [t.task_id for t in spark_tasks["prompts"].upstream_list] == ["feature_gate"]
    assert [t.task_id for t in spark_tasks["prompts"].downstream_list] == ["prompts_gate"]
    # The feature gate's rules on items and clusters (spark_jobs/feature_checks.py), also when the clusters job is skipped.
    assert spark_tasks["feature_checks"].jobs == ["feature_checks"]
    assert spark_tasks["feature_checks"].trigger_rule == "none_failed"
    assert sorted(t.task_id for t in spark_tasks["feature_checks"].upstream_list) == ["spark_clusters", "spark_features"]
    assert [t.task_id for t in spark_tasks["feature_checks"].downstream_list] == ["feature_gate"]
    # The vectors gate's rules over the vectors augment wrote (spark_jobs/vectors_checks.py).
    assert spark_tasks["vectors_checks"].jobs == ["vectors_checks"]
    assert [t.task_id for t in spark_tasks["vectors_checks"].upstream_list] == ["augment"]
    assert [t.task_id for t in spark_tasks["vectors_checks"].downstream_list] == ["vectors_gate"]
    assert {t.conn_id for t in spark_tasks.values()} == {load_config().spark.connect_conn_id}
    assert not [t.task_id for d in dagbag.dags.values() for t in d.tasks if "SparkSubmit" in type(t).__name__]


def test_lake_maintenance_runs_on_the_configured_schedule(dagbag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    from reki_core.config import load_config

    dag = dagbag.dags["reki_lake_maintenance"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable._expression == load_config().lake.maintenance.schedule
    assert [t.task_id for t in dag.tasks] == ["maintain_tables"] and dag.max_active_runs == 1


def test_encoding_is_a_python_task_between_two_spark_jobs(dagbag):
    """Issue 28: the joins of encoding run on the Connect server; the Python task only encodes the misses."""
    dag = dagbag.dags["reki_daily_refresh"]
    misses, encode, vectors = (dag.get_task(t) for t in ("encoding_misses", "encode", "knowledge_vectors"))
    assert (type(misses).__name__, misses.jobs) == ("SparkConnectJobs", ["encoding_misses"])
    assert (type(vectors).__name__, vectors.jobs) == ("SparkConnectJobs", ["knowledge_vectors"])
    assert [t.task_id for t in misses.upstream_list] == ["answers_gate"]
    assert [t.task_id for t in encode.upstream_list] == ["encoding_misses"]
    assert [t.task_id for t in vectors.upstream_list] == ["encode"]
    assert [t.task_id for t in vectors.downstream_list] == ["train_if_no_model"]
