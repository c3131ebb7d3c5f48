"""One arm of `bench/spark_prep.py --layouts`: the feature jobs of one checkout, timed on one lake layout.

Run with the checkout's root as the working directory and first on PYTHONPATH (so `reki_core` and `spark_jobs` are
that checkout's: the baseline commit's, or this one's), on the raw data of `--inputs` (interactions, users, items
as Parquet, written by the orchestrator so both arms get the very same rows). Uses only what both layouts share:
`load_config`, `Lake(folder)` and its `read_partition`/`write_partition`, `synthetic.write_raw_lake`, `get_spark`, `jobs_named`/`run_jobs`. One classic
session (local[2]) serves every run of the arm. Prints one JSON line: the seconds of each timed run.

    python bench/spark_prep_arm.py --inputs DIR --work DIR --scenario books [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

FEATURE_JOBS = ("items", "user_history", "ctr_samples")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--scenario", default="books")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each kind; the fastest counts")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    import pandas as pd

    from reki_core.config import load_config
    from reki_core.datasets import synthetic
    from reki_core.spark import get_spark
    from reki_core.storage.lake import Lake
    from spark_jobs.common import jobs_named, run_jobs, write_partition

    work = Path(args.work)
    cfg = load_config(environ={**os.environ, "REKI__PATHS__LAKE_URI": str(work / "lake"),
                               "REKI__PATHS__STATE_DIR": str(work / "state"), "REKI__SCENARIO": args.scenario,
                               "REKI__SPARK__MASTER": "local[2]"})
    lake = Lake(str(work / "lake"))
    inputs = Path(args.inputs)
    frames = [pd.read_parquet(inputs / f"{name}.parquet") for name in ("interactions", "users", "items")]
    started = time.perf_counter()
    # User and item snapshots for the three days the runs read (every day's would cost both arms minutes, untimed).
    last_three = sorted(set(synthetic.interaction_days(frames[0])))[-3:]
    days = synthetic.write_raw_lake(lake, *frames, snapshot_days=last_three)
    raw_s = round(time.perf_counter() - started, 1)
    day, prev, before = days[-1], days[-2], days[-3]
    spark = get_spark(cfg, "reki-bench-layout")

    def reset() -> None:  # the feature datasets gone, whatever the layout keeps them as
        if hasattr(lake, "drop_namespace"):
            lake.drop_namespace("features")
        shutil.rmtree(work / "lake" / "features", ignore_errors=True)

    def timed(d: dt.date) -> dict:
        start = time.perf_counter()
        steps = run_jobs(spark, jobs_named(FEATURE_JOBS), cfg, lake, d)
        return {**{s.removeprefix("features_"): p["seconds"] for s, p in steps.items()},
                "total": round(time.perf_counter() - start, 2),
                "written": {s.removeprefix("features_"): p.get("users_written", p.get("samples_written",
                                                                                         p.get("rewritten_buckets")))
                            for s, p in steps.items() if s != "features_items"}}

    timed(before)  # warm-up: the session's first jobs load and compile the code
    fulls, dailies, after_full = [], [], None
    for _ in range(args.repeats):
        reset()
        fulls.append(timed(day))
        reset()
        timed(before)
        after_full = timed(prev)
        dailies.append(timed(day))
    # A quiet day after it: the same snapshots, no interactions. What the three jobs cost when nothing changed, the
    # floor under any daily run (the fastest of 2; the second is a re-run of the day).
    quiet_day = day + dt.timedelta(days=1)
    for dataset in ("raw/users", "raw/items"):
        lake.write_partition(lake.read_partition(dataset, day), dataset, quiet_day)
    quiets = [timed(quiet_day) for _ in range(2)]
    # A commit's own cost: one task writing a one-row day of a small dataset (the table commit and the day's record,
    # or the folder write and swap), the fastest of 3. The row comes from the JVM: a classic createDataFrame of a Python
    # list runs its tasks through Python workers, about 0.5 s that a commit does not cost.
    from pyspark.sql import functions as F

    probe = spark.range(1).select(F.lit("u").alias("user_id"), F.lit(1).alias("n"))
    commits = []
    for i in range(3):
        start = time.perf_counter()
        write_partition(probe, lake, "bench/commit_probe", day + dt.timedelta(days=2 + i))
        commits.append(time.perf_counter() - start)
    spark.stop()
    history = lake.read_partition("features/user_history", day, ["n_interactions"])
    print(json.dumps({"raw_write_s": raw_s, "full": min(fulls, key=lambda r: r["total"]),
                      "daily": min(dailies, key=lambda r: r["total"]), "daily_after_full": after_full,
                      "quiet": min(quiets, key=lambda r: r["total"]),
                      "full_totals": [r["total"] for r in fulls], "daily_totals": [r["total"] for r in dailies],
                      "commit_s": round(min(commits), 3), "users": len(history),
                      "interactions": int(history["n_interactions"].sum()), "day": day.isoformat()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
