"""Spark Connect client work for the tests, run in a process of its own (`python -m tests.spark.connect_client
CHECK JSON`): a process that has opened a Connect session is in PySpark's remote mode for good, and its classic
sessions (the tests' `spark` fixture) stop working, so the tests never open one in the pytest process.

Each check raises (exit 1, traceback on stderr) when what it checks does not hold; `run` prints its results.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from reki_core.config import load_config
from reki_core.spark import connect_client, task_session_id
from reki_core.storage.lake import Lake, as_date


def run(args: dict) -> dict:
    """The feature jobs `args["jobs"][i]` for each day `args["days"][i]` on one Connect session, as the DAG's task runs
    them."""
    from spark_jobs.common import jobs_named, run_jobs

    cfg = load_config()
    results = []
    with connect_client(cfg, args["url"], task_session_id(), tag="tests") as spark:
        for day, jobs in zip(args["days"], args["jobs"], strict=True):
            results.append(run_jobs(spark, jobs_named(jobs), cfg, Lake(cfg.lake_uri), as_date(day)))
    return {"results": results}


def isolation(args: dict) -> dict:
    """A failed try leaves nothing for the next try: its temp view goes with its session, and what its job cached
    is unpersisted (the server's cache is shared by every session: releasing one does not empty it)."""
    from spark_jobs.common import cache, releases_cache

    cfg = load_config()
    ids = [task_session_id() for _attempt in (1, 2)]
    assert ids[0] != ids[1]

    @releases_cache
    def failing_job(spark) -> dict:
        frame = cache(spark.range(1234))
        assert frame.count() == 1234 and frame.is_cached
        raise ZeroDivisionError("the task failed mid-way")

    try:
        with connect_client(cfg, args["url"], ids[0], tag="try-1") as first:
            assert first.session_id == ids[0] and first.getTags() == {"try-1"}
            first.range(100).createOrReplaceTempView("half_done")
            assert [t.name for t in first.catalog.listTables()] == ["half_done"]
            leaked = first.range(4321).cache()  # cached outside a job: nothing releases it
            assert leaked.count() == 4321
            failing_job(first)
    except ZeroDivisionError:
        pass
    with connect_client(cfg, args["url"], ids[1]) as second:
        assert second.session_id == ids[1]
        assert second.catalog.listTables() == [], second.catalog.listTables()
        assert second.range(4321).is_cached, "the check cannot see another session's cache"
        second.range(4321).unpersist()
        assert not second.range(1234).is_cached, "the failed job's cached frame outlived it"
    return {"sessions": ids}


def interrupt(args: dict) -> dict:
    """The Airflow task's on_kill (what a kill from the UI calls) interrupts its running Spark operation: one the task
    runs itself, or with `in_threads`, one a job runs in threads of its own (`at_once`, as the clusters job does)."""
    from reki_airflow.spark_connect import SparkConnectJobs
    from spark_jobs.common import at_once

    cfg = load_config()
    op = SparkConnectJobs(task_id="spark_features", jobs=["items"], conn_id="unused")
    outcome: dict = {}
    with connect_client(cfg, args["url"], task_session_id(), tag="reki-kill-test") as spark:
        op._session, op._tag = spark, "reki-kill-test"

        def query() -> None:
            spark.range(0, 10**13, numPartitions=2).selectExpr("sum(id % 7)").collect()

        def endless() -> None:
            spark.addTag("reki-kill-test")  # tags are per thread: the task's own thread has it from connect_client
            started = time.monotonic()
            try:
                if args.get("in_threads"):
                    at_once(spark, [query, query])
                else:
                    query()
                outcome["finished"] = True
            except Exception as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["seconds"] = time.monotonic() - started

        worker = threading.Thread(target=endless)
        worker.start()
        time.sleep(4)  # the query is running on the server by now
        assert worker.is_alive(), outcome
        killed = time.monotonic()
        op.on_kill()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the operation still runs a minute after on_kill"
        assert "finished" not in outcome and "error" in outcome, outcome
        outcome["after_kill_s"] = time.monotonic() - killed
        assert spark.range(3).count() == 3  # the session itself stays usable
    return outcome


def finalizer(args: dict) -> dict:
    """A stopped session freed later by the garbage collector leaves the process's shared result-release pool alone
    (its finalizer would shut the pool down and wait for it, which hung a later task's query): for a session that
    `connect_client` stopped, and, for contrast, pyspark's own behaviour for one stopped without it."""
    import gc

    from pyspark.sql.connect.client.reattach import ExecutePlanResponseReattachableIterator as Releases

    from reki_core.spark import connect_session

    cfg = load_config()
    shutdowns: list[str] = []
    real_shutdown = Releases.shutdown
    Releases.shutdown = classmethod(lambda cls: shutdowns.append("pool shut down"))
    try:
        for ours in (True, False):
            if ours:
                with connect_client(cfg, args["url"], task_session_id()) as spark:
                    assert spark.range(5).count() == 5
                    _ = spark.catalog  # a cycle (the catalog holds its session): only the cyclic collector frees it
            else:
                spark = connect_session(cfg, args["url"], task_session_id())
                assert spark.range(5).count() == 5
                _ = spark.catalog
                spark.stop()
            stopped = len(shutdowns)  # stop() itself closes the client once
            del spark, _
            gc.collect()
            args[f"{'ours' if ours else 'plain'}_shutdowns_when_freed"] = len(shutdowns) - stopped
    finally:
        Releases.shutdown = real_shutdown
    return args


if __name__ == "__main__":
    check, payload = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"check": check, **globals()[check](payload)}, default=str))
