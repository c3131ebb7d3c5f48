"""Benchmark of the Spark feature jobs: synthetic 1M / 3M / 10M interactions on local[2], and a full
versus next-day incremental build on MovieLens-100K. Writes bench/results/spark_prep.json.

Each size gets a fresh synthetic lake (180 days, Zipf activity and popularity); the four jobs
(items, user_history, ctr_samples, clusters) run in one SparkSession for the last day, as a full build.
Peak RSS is sampled over this process and its children (the JVM) every half second.

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
from reki_core.spark import get_spark  # noqa: E402
from reki_core.storage.lake import Lake  # noqa: E402
from spark_jobs import clusters, ctr_samples, items, user_history  # noqa: E402

JOBS = (items, user_history, ctr_samples, clusters)


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


def run_jobs(spark, cfg, lake, day) -> dict[str, float]:
    seconds = {}
    for job in JOBS:
        start = time.perf_counter()
        job.run(spark, cfg, lake, day)
        seconds[job.__name__.rsplit(".", 1)[-1]] = round(time.perf_counter() - start, 2)
    seconds["total"] = round(sum(seconds.values()), 2)
    return seconds


def clear_features(lake: Lake) -> None:
    shutil.rmtree(lake.local_path("features"), ignore_errors=True)


def bench_synthetic(spark, cfg, workdir: Path, size: int) -> dict:
    lake = Lake(str(workdir / f"synthetic-{size}"))
    data = synthetic.generate(size, days=180, seed=1)
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items, snapshot_days=None)
    del data
    seconds = run_jobs(spark, cfg, lake, days[-1])
    interactions = int(lake.read_partition("features/user_history", days[-1], columns=["n_interactions"])["n_interactions"].sum())
    shutil.rmtree(lake.local_path(), ignore_errors=True)
    return {"interactions": interactions, "seconds": seconds, "interactions_per_s": round(interactions / seconds["total"], 1)}


def bench_ml100k(spark, cfg, workdir: Path) -> dict:
    inter, users, item_frame = movielens.load(movielens.obtain(cfg.data_dir))
    lake = Lake(str(workdir / "ml100k"))
    days = synthetic.write_raw_lake(lake, inter, users, item_frame)
    day, prev = days[-1], days[-2]
    full = run_jobs(spark, cfg, lake, day)
    clear_features(lake)
    run_jobs(spark, cfg, lake, prev)
    incremental = run_jobs(spark, cfg, lake, day)
    return {"day": day.isoformat(), "full_seconds": full, "incremental_seconds": incremental}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,3000000,10000000")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench/results/spark_prep.json"))
    parser.add_argument("--skip-ml100k", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    cfg = load_config(environ={**os.environ, "REKI__SPARK__MASTER": "local[2]"})
    books = load_config(environ={**os.environ, "REKI__SPARK__MASTER": "local[2]", "REKI__SCENARIO": "books"})
    spark = get_spark(cfg, "reki-bench-spark-prep", master="local[2]")
    spark.sparkContext.setLogLevel("ERROR")
    result: dict = {"machine": f"{psutil.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
                    "master": "local[2]", "measured_at": dt.datetime.now(dt.UTC).isoformat(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="reki-bench-") as tmp, PeakRss() as rss:
        for size in sizes:
            result["sizes"][str(size)] = bench_synthetic(spark, books, Path(tmp), size)
            print(size, result["sizes"][str(size)], flush=True)
        if not args.skip_ml100k:
            result["ml100k"] = bench_ml100k(spark, cfg, Path(tmp))
            print(result["ml100k"], flush=True)
    spark.stop()

    result["interactions_per_s"] = {k: v["interactions_per_s"] for k, v in result["sizes"].items()}
    totals = {int(k): v["seconds"]["total"] for k, v in result["sizes"].items()}
    result["time_ratio_10m_over_1m"] = round(totals[10_000_000] / totals[1_000_000], 3) if {1_000_000, 10_000_000} <= totals.keys() else None
    result["peak_rss_mb"] = round(rss.peak_mb, 1)
    if "ml100k" in result:
        full, inc = result["ml100k"]["full_seconds"]["total"], result["ml100k"]["incremental_seconds"]["total"]
        result.update(ml100k_full_s=full, ml100k_incremental_s=inc, incremental_over_full=round(inc / full, 3))
    else:
        result.update(ml100k_full_s=None, ml100k_incremental_s=None, incremental_over_full=None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps({k: result[k] for k in ("interactions_per_s", "time_ratio_10m_over_1m", "peak_rss_mb",
                                             "ml100k_full_s", "ml100k_incremental_s", "incremental_over_full")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
