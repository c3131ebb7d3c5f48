"""Benchmark of the Spark feature jobs: synthetic 1M / 3M / 10M interactions on local[2], and a full
versus next-day incremental build on MovieLens-100K. Writes bench/results/spark_prep.json.

Each size gets a fresh synthetic lake (books scenario, 180 days, Zipf activity and popularity) and a full
build of its last day. The headline figures (`interactions_per_s`, `time_ratio_10m_over_1m`) cover the jobs
every extraction mode runs: items, user_history, ctr_samples. The clusters job serves collective mode only;
it is timed separately at every size (forced collective), and `daily_run_seconds` adds it where the books
scenario's `auto` mode resolves to collective. Before measuring, the jobs run once on a small lake, so JVM
start and code generation do not land on the first size. Peak RSS is sampled over this process and its
children (the JVM) every half second.

MovieLens-100K (movielens scenario, individual mode: clusters skipped): full build of the last day versus
its daily (incremental) run in steady state, the same jobs in both; the daily run right after a full build
is recorded too (`ml100k_incremental_after_full_s`).

    .venv/bin/python bench/spark_prep.py [--sizes 1000000,3000000,10000000] [--out bench/results/spark_prep.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402
from reki_core.datasets import movielens, synthetic  # noqa: E402
from reki_core.prompts import resolve_mode  # noqa: E402
from reki_core.spark import get_spark  # noqa: E402
from reki_core.storage.lake import Lake  # noqa: E402
from spark_jobs import clusters, ctr_samples, items, user_history  # noqa: E402

HEADLINE_JOBS = (items, user_history, ctr_samples)
WARMUP_INTERACTIONS = 5_000


class PeakRss:
    """Highest resident memory of this process tree while running (MB)."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def job_name(job) -> str:
    return job.__name__.rsplit(".", 1)[-1]


def run_jobs(spark, cfg, lake, day, jobs) -> dict[str, float]:
    seconds = {}
    for job in jobs:
        start = time.perf_counter()
        job.run(spark, cfg, lake, day)
        seconds[job_name(job)] = round(time.perf_counter() - start, 2)
    seconds["total"] = round(sum(seconds.values()), 2)
    return seconds


def synthetic_lake(workdir: Path, size: int) -> tuple[Lake, dt.date]:
    """A raw lake of `size` synthetic interactions; user/item snapshots only for the last day (all a full build reads)."""
    lake = Lake(str(workdir / f"synthetic-{size}"))
    data = synthetic.generate(size, days=180, seed=1)
    last = synthetic.interaction_days(data.interactions).max()
    synthetic.write_raw_lake(lake, data.interactions, data.users, data.items, snapshot_days=[last])
    return lake, last


def bench_synthetic(spark, books, collective, workdir: Path, size: int) -> dict:
    lake, day = synthetic_lake(workdir, size)
    start = time.perf_counter()
    seconds = run_jobs(spark, books, lake, day, HEADLINE_JOBS)
    history = lake.read_partition("features/user_history", day, columns=["n_interactions"])
    interactions, users = int(history["n_interactions"].sum()), len(history)
    n_items = len(lake.read_partition("features/items", day, columns=["item_id"]))
    clusters_seconds = run_jobs(spark, collective, lake, day, (clusters,))["clusters"]
    mode = resolve_mode(books, users, n_items)
    print(f"{size}: {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(lake.local_path(), ignore_errors=True)
    return {
        "interactions": interactions,
        "users": users,
        "items": n_items,
        "seconds": seconds,
        "interactions_per_s": round(interactions / seconds["total"], 1),
        "clusters_seconds": clusters_seconds,
        "extraction_mode": mode,
        "daily_run_seconds": round(seconds["total"] + (clusters_seconds if mode == "collective" else 0.0), 2),
    }


def bench_ml100k(spark, cfg, workdir: Path) -> dict:
    """Full build of the last day against its daily run. The daily run is timed in steady state (the day
    before was itself a daily run); the daily run right after a full build is timed too: a full build flags
    every user for refresh, so that one day rewrites every user bucket."""
    inter, users, item_frame = movielens.load(movielens.obtain(cfg.data_dir))
    lake = Lake(str(workdir / "ml100k"))
    days = synthetic.write_raw_lake(lake, inter, users, item_frame)
    day, prev, before = days[-1], days[-2], days[-3]
    jobs = HEADLINE_JOBS + ((clusters,) if resolve_mode(cfg, users["user_id"].nunique(), len(item_frame)) == "collective" else ())
    full = run_jobs(spark, cfg, lake, day, jobs)
    shutil.rmtree(lake.local_path("features"), ignore_errors=True)
    run_jobs(spark, cfg, lake, before, jobs)
    after_full = run_jobs(spark, cfg, lake, prev, jobs)
    incremental = run_jobs(spark, cfg, lake, day, jobs)
    return {"day": day.isoformat(), "previous_day": prev.isoformat(), "jobs": [job_name(j) for j in jobs],
            "full_seconds": full, "incremental_seconds": incremental, "incremental_after_full_seconds": after_full}


def warm_up(spark, books, collective, workdir: Path) -> None:
    lake = Lake(str(workdir / "warmup"))
    data = synthetic.generate(WARMUP_INTERACTIONS, days=10, seed=2)
    day = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)[-1]
    run_jobs(spark, books, lake, day, HEADLINE_JOBS)
    run_jobs(spark, collective, lake, day, (clusters,))
    shutil.rmtree(lake.local_path(), ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,3000000,10000000")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench/results/spark_prep.json"))
    parser.add_argument("--skip-ml100k", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    env = {**os.environ, "REKI__SPARK__MASTER": "local[2]"}
    movielens_cfg = load_config(environ=env)
    books = load_config(environ={**env, "REKI__SCENARIO": "books"})
    collective = load_config(environ={**env, "REKI__SCENARIO": "books", "REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}"})
    spark = get_spark(books, "reki-bench-spark-prep", master="local[2]")
    spark.sparkContext.setLogLevel("ERROR")
    result: dict = {
        "machine": f"{psutil.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "master": "local[2]",
        "driver_memory": books.spark.driver_memory,
        "shuffle_partitions": books.spark.shuffle_partitions,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(),
        # Other work on the machine slows every figure: the 1-minute load average when each step was written.
        "load_average_1m": {"start": round(os.getloadavg()[0], 2)},
        "headline_jobs": [job_name(j) for j in HEADLINE_JOBS],
        "notes": "interactions_per_s and time_ratio_10m_over_1m: full build of the last day, jobs in headline_jobs. "
                 "clusters_seconds: the clusters job alone (collective mode forced); daily_run_seconds adds it where "
                 "the books scenario's auto mode is collective. Jobs warmed up on a small lake first. "
                 "ml100k_incremental_s: the last day's daily run after a daily run (steady state); "
                 "ml100k_incremental_after_full_s: a daily run right after a full build (every user bucket rewritten).",
        "sizes": {},
    }
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="reki-bench-") as tmp, PeakRss() as rss:
        warm_up(spark, books, collective, Path(tmp))
        # The cheap comparison first; the file is rewritten after every step, so a cut-short run keeps what it measured.
        if not args.skip_ml100k:
            result["ml100k"] = bench_ml100k(spark, movielens_cfg, Path(tmp))
            print(result["ml100k"], flush=True)
            write_result(result, rss, out)
        for size in sizes:
            result["sizes"][str(size)] = bench_synthetic(spark, books, collective, Path(tmp), size)
            print(size, result["sizes"][str(size)], flush=True)
            write_result(result, rss, out)
    spark.stop()
    write_result(result, rss, out)
    print(json.dumps({k: result[k] for k in ("interactions_per_s", "clusters_seconds", "time_ratio_10m_over_1m", "peak_rss_mb",
                                             "ml100k_full_s", "ml100k_incremental_s", "incremental_over_full",
                                             "ml100k_incremental_after_full_s")}))
    return 0


def write_result(result: dict, rss: PeakRss, out: Path) -> None:
    """Fill the summary keys from what was measured so far and write the JSON file."""
    result["interactions_per_s"] = {k: v["interactions_per_s"] for k, v in result["sizes"].items()}
    result["clusters_seconds"] = {k: v["clusters_seconds"] for k, v in result["sizes"].items()}
    totals = {int(k): v["seconds"]["total"] for k, v in result["sizes"].items()}
    result["time_ratio_10m_over_1m"] = round(totals[10_000_000] / totals[1_000_000], 3) if {1_000_000, 10_000_000} <= totals.keys() else None
    result["peak_rss_mb"] = round(rss.peak_mb, 1)
    result["load_average_1m"][f"after_{len(result['sizes'])}_sizes" + ("_and_ml100k" if "ml100k" in result else "")] = round(
        os.getloadavg()[0], 2)
    if "ml100k" in result:
        full, inc = result["ml100k"]["full_seconds"]["total"], result["ml100k"]["incremental_seconds"]["total"]
        after_full = result["ml100k"]["incremental_after_full_seconds"]["total"]
        result.update(ml100k_full_s=full, ml100k_incremental_s=inc, incremental_over_full=round(inc / full, 3),
                      ml100k_incremental_after_full_s=after_full)
    else:
        result.update(ml100k_full_s=None, ml100k_incremental_s=None, incremental_over_full=None,
                      ml100k_incremental_after_full_s=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    raise SystemExit(main())
