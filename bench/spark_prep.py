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
is recorded too (`ml100k_incremental_after_full_s`). The same comparison runs on the synthetic sizes named by
`--daily-sizes` (1M by default), where the data, not Spark's fixed cost per action, sets the time. Jobs run
as spark-submit runs them (`common.run_step`): a small daily run in the driver (`spark_jobs/in_driver.py`),
anything else in Spark; each run records the engine of each job. The ML-100K daily run is also timed with
every job in Spark (`ml100k_incremental_spark_only_s`, `incremental_over_full_spark_only`). Each run
counts its Spark jobs, and the least a Spark action costs here is measured too: together they show where
the ML-100K time goes. A quiet day (no interactions, unchanged snapshots) gives the daily run's floor at
ML-100K (`ml100k_quiet_day_s`): what the jobs cost with nothing to recompute. All of that is timed in one warm
Spark session; the DAG instead starts a JVM per spark-submit, so the ML-100K full build and daily run are
also timed through spark-submit, with and without the class archive of `reki setup`
(`ml100k_submit_full_s`, `ml100k_submit_incremental_s`, `class_archive_saves`).

    .venv/bin/python bench/spark_prep.py [--sizes 1000000,3000000,10000000] [--daily-sizes 1000000] [--out ...]
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
import uuid
from pathlib import Path

import psutil

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402
from reki_core.datasets import movielens, synthetic  # noqa: E402
from reki_core.prompts import resolve_mode  # noqa: E402
from reki_core.spark import class_archive, get_spark, spark_submit, submit_conf  # noqa: E402
from reki_core.storage.lake import Lake  # noqa: E402
from spark_jobs import clusters, ctr_samples, items, user_history  # noqa: E402
from spark_jobs.common import read_parquet, run_step  # noqa: E402

HEADLINE_JOBS = (items, user_history, ctr_samples)
WARMUP_INTERACTIONS = 5_000
ML100K_REPEATS = 2  # the ML-100K runs take seconds: time each twice, keep the fastest


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


def run_jobs(spark, cfg, lake, day, jobs) -> dict:
    """Seconds per job and in total, plus `spark_jobs`: how many Spark jobs (actions and their stages) they ran,
    and `engines`: where each job ran (`run_step`, as spark-submit runs them: a small daily run in the driver)."""
    group = f"bench-{uuid.uuid4().hex[:8]}"
    spark.sparkContext.setJobGroup(group, "spark_prep benchmark")
    seconds, engines = {}, {}
    for job in jobs:
        start = time.perf_counter()
        engines[job_name(job)] = run_step(job.run, f"features_{job_name(job)}", lambda: spark, cfg, lake, day)["engine"]
        seconds[job_name(job)] = round(time.perf_counter() - start, 2)
    seconds["total"] = round(sum(seconds.values()), 2)
    seconds["spark_jobs"] = len(spark.sparkContext.statusTracker().getJobIdsForGroup(group))
    seconds["engines"] = engines
    return seconds


def synthetic_lake(workdir: Path, size: int, snapshot_days: int = 1) -> tuple[Lake, list[dt.date]]:
    """A raw lake of `size` synthetic interactions; user/item snapshots for the last `snapshot_days` days only
    (all a full build of the last day reads; a daily run reads its own day's and the previous one's)."""
    lake = Lake(str(workdir / f"synthetic-{size}"))
    data = synthetic.generate(size, days=180, seed=1)
    days = sorted(set(synthetic.interaction_days(data.interactions)))
    synthetic.write_raw_lake(lake, data.interactions, data.users, data.items, snapshot_days=days[-snapshot_days:])
    return lake, days


def bench_synthetic(spark, books, collective, workdir: Path, size: int, daily: bool) -> dict:
    """Full build of the last day; with `daily`, also the steady-state daily run of that day (`full_vs_daily`)."""
    lake, days = synthetic_lake(workdir, size, snapshot_days=3 if daily else 1)
    day = days[-1]
    start = time.perf_counter()
    seconds = run_jobs(spark, books, lake, day, HEADLINE_JOBS)
    history = lake.read_partition("features/user_history", day, columns=["n_interactions"])
    interactions, users = int(history["n_interactions"].sum()), len(history)
    n_items = len(lake.read_partition("features/items", day, columns=["item_id"]))
    clusters_seconds = run_jobs(spark, collective, lake, day, (clusters,))["clusters"]
    mode = resolve_mode(books, users, n_items)
    daily_run = full_vs_daily(spark, books, lake, days, HEADLINE_JOBS, full=seconds) if daily else None
    if daily:  # the same day with every job forced into the driver: where the driver's limit should sit
        forced = books.model_copy(update={"spark": books.spark.model_copy(update={"in_driver_max_interactions": 10**12})})
        daily_run["in_driver"] = full_vs_daily(spark, forced, lake, days, HEADLINE_JOBS, full=seconds)
    print(f"{size}: {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(lake.local_path(), ignore_errors=True)
    return {
        "full_vs_daily": daily_run,
        "interactions": interactions,
        "users": users,
        "items": n_items,
        "seconds": seconds,
        "interactions_per_s": round(interactions / seconds["total"], 1),
        "clusters_seconds": clusters_seconds,
        "extraction_mode": mode,
        "daily_run_seconds": round(seconds["total"] + (clusters_seconds if mode == "collective" else 0.0), 2),
    }


def full_vs_daily(spark, cfg, lake, days, jobs, full: dict | None = None, repeats: int = 1) -> dict:
    """Full build of the last day against its daily run. The daily run is timed in steady state (the day
    before was itself a daily run); the daily run right after a full build is timed too: a full build flags
    every user for refresh, so that one day rewrites every user bucket. `full`: an already measured full build.
    With `repeats`, the full build and the steady-state daily run are each timed that many times, alternating,
    and the fastest of each counts: at small sizes a warmer JVM alone moves a run by seconds."""
    day, prev, before = days[-1], days[-2], days[-3]
    fulls, dailies = ([] if full is None else [full]), []
    for _ in range(repeats):
        if full is None:
            shutil.rmtree(lake.local_path("features"), ignore_errors=True)
            fulls.append(run_jobs(spark, cfg, lake, day, jobs))
        shutil.rmtree(lake.local_path("features"), ignore_errors=True)
        run_jobs(spark, cfg, lake, before, jobs)
        after_full = run_jobs(spark, cfg, lake, prev, jobs)
        dailies.append(run_jobs(spark, cfg, lake, day, jobs))
    full, incremental = min(fulls, key=lambda r: r["total"]), min(dailies, key=lambda r: r["total"])
    return {"day": day.isoformat(), "previous_day": prev.isoformat(), "jobs": [job_name(j) for j in jobs],
            "full_seconds": full, "incremental_seconds": incremental, "incremental_after_full_seconds": after_full,
            "incremental_over_full": round(incremental["total"] / full["total"], 3),
            "full_totals": [r["total"] for r in fulls], "incremental_totals": [r["total"] for r in dailies]}


def bench_ml100k(spark, cfg, workdir: Path) -> dict:
    inter, users, item_frame = movielens.load(movielens.obtain(cfg.data_dir))
    lake = Lake(str(workdir / "ml100k"))
    days = synthetic.write_raw_lake(lake, inter, users, item_frame)
    jobs = HEADLINE_JOBS + ((clusters,) if resolve_mode(cfg, users["user_id"].nunique(), len(item_frame)) == "collective" else ())
    result = full_vs_daily(spark, cfg, lake, days, jobs, repeats=ML100K_REPEATS)
    # The same daily run with every job in Spark (no driver path): what the driver path saves.
    spark_only = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"in_driver_max_interactions": 0})})
    result["spark_only"] = full_vs_daily(spark, spark_only, lake, days, jobs, full=result["full_seconds"], repeats=ML100K_REPEATS)
    result["spark_action_floor_s"] = action_floor(spark, lake, days[-1])
    result["spark_submit"] = submitted_runs(cfg, lake, days)
    result["quiet_day"] = quiet_day(spark, cfg, lake, days, jobs, result["full_seconds"]["total"])
    return result


def submitted_runs(cfg, lake, days) -> dict:
    """Full build against daily run as the DAG runs them: `spark_jobs/features.py` through spark-submit, a new
    JVM each time, wall time from submit to exit. Each is timed with and without the class archive that
    `reki setup` builds (the only difference between the two: `-XX:SharedArchiveFile`), alternating, twice;
    the fastest of each counts."""
    if not class_archive(cfg).is_file():
        return {"skipped": f"no class archive at {class_archive(cfg)}: run `reki setup` first"}
    day, prev, before = days[-1], days[-2], days[-3]
    without = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"class_archive": False})})
    options = {"archive": submit_conf(cfg), "no_archive": submit_conf(without)}
    runs: dict[str, dict[str, list[float]]] = {kind: {"full": [], "daily": []} for kind in options}
    for _ in range(ML100K_REPEATS):
        for kind, opts in options.items():
            shutil.rmtree(lake.local_path("features"), ignore_errors=True)
            runs[kind]["full"].append(submit_features(cfg, lake, day, opts))
    shutil.rmtree(lake.local_path("features"), ignore_errors=True)
    for d in (before, prev):
        submit_features(cfg, lake, d, options["archive"])
    for _ in range(ML100K_REPEATS):
        for kind, opts in options.items():  # a re-run of the day reads the previous day's state again: a daily run
            runs[kind]["daily"].append(submit_features(cfg, lake, day, opts))
    best = {kind: {run: min(times) for run, times in r.items()} for kind, r in runs.items()}
    return {"runs_s": runs, "best_s": best, "submit_conf": options,
            "incremental_over_full": round(best["archive"]["daily"] / best["archive"]["full"], 3),
            "archive_saves": {run: round(1 - best["archive"][run] / best["no_archive"][run], 3) for run in ("full", "daily")}}


def submit_features(cfg, lake, day: dt.date, conf: dict[str, str]) -> float:
    """Seconds of one `spark-submit spark_jobs/features.py` of `day`, as the DAG's spark_features task runs it."""
    start = time.perf_counter()
    result = spark_submit(cfg, PROJECT_ROOT / "spark_jobs/features.py",
                          ["--lake", str(lake.local_path()), "--dt", day.isoformat()], conf, timeout_s=600)
    seconds = round(time.perf_counter() - start, 2)
    if result.returncode != 0:
        raise RuntimeError(f"spark-submit features {day} failed:\n{result.stderr[-3000:]}")
    return seconds


def quiet_day(spark, cfg, lake, days, jobs, full_s: float) -> dict:
    """The least a daily run costs at this size: two days with no interactions and unchanged snapshots are
    appended, and the second one's daily run is timed (fastest of ML100K_REPEATS; the first quiet day still
    rewrites the buckets of the users refreshed the day before). Nothing is recomputed that day, so what it
    costs is the jobs' fixed cost, the floor under `incremental_over_full`."""
    last = days[-1]
    quiet = [last + dt.timedelta(days=1), last + dt.timedelta(days=2)]
    empty = lake.read_partition("raw/interactions", last).iloc[0:0]
    users, item_rows = lake.read_partition("raw/users", last), lake.read_partition("raw/items", last)
    for day in quiet:
        lake.write_partition(empty, "raw/interactions", day)
        lake.write_partition(users, "raw/users", day)
        lake.write_partition(item_rows, "raw/items", day)
    shutil.rmtree(lake.local_path("features"), ignore_errors=True)
    run_jobs(spark, cfg, lake, last, jobs)
    run_jobs(spark, cfg, lake, quiet[0], jobs)
    runs = [run_jobs(spark, cfg, lake, quiet[1], jobs) for _ in range(ML100K_REPEATS)]  # a re-run rebuilds from quiet[0]
    best = min(runs, key=lambda r: r["total"])
    return {"day": quiet[1].isoformat(), "seconds": best, "totals": [r["total"] for r in runs],
            "over_full": round(best["total"] / full_s, 3)}


def action_floor(spark, lake, day: dt.date) -> dict:
    """The least a Spark action costs here, on a small partition (features/items, a few thousand rows): a count
    and a rewrite. Every job pays it per action, whatever the data size."""
    folder = lake.local_path(f"features/items/dt={day.isoformat()}")

    def best_of_3(action) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
        return round(min(times), 3)

    out = str(lake.local_path("_floor"))
    return {"count": best_of_3(lambda: read_parquet(spark, [folder]).count()),
            "write": best_of_3(lambda: read_parquet(spark, [folder]).write.mode("overwrite").parquet(out))}


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
    parser.add_argument("--daily-sizes", default="1000000", help="sizes that also get a steady-state daily run")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    daily_sizes = {int(s) for s in args.daily_sizes.split(",") if s}

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
                 "ml100k_full_s / ml100k_incremental_s: the fastest of 2 full builds and of 2 steady-state daily runs "
                 "(the last day's daily run after a daily run), timed alternately; "
                 "ml100k_incremental_after_full_s: a daily run right after a full build (every user bucket rewritten). "
                 "incremental_over_full_by_size: the same steady-state comparison on synthetic sizes (--daily-sizes); "
                 "incremental_over_full_in_driver_by_size: that daily run with every job forced into the driver "
                 "(spark.in_driver_max_interactions unbounded), where the driver's limit should sit. "
                 "ml100k_quiet_day_s / quiet_day_over_full: the daily run of a day with no interactions and "
                 "unchanged snapshots (after another such day): the fixed cost under incremental_over_full. "
                 "engines: where each job ran (driver: spark_jobs/in_driver.py, a small daily run without Spark); "
                 "ml100k_incremental_spark_only_s / incremental_over_full_spark_only: the same daily run with every "
                 "job in Spark (spark.in_driver_max_interactions 0). "
                 "spark_jobs: Spark jobs run (each action and adaptive stage is one); ml100k.spark_action_floor_s: "
                 "the least one count or one rewrite of a small partition costs here.",
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
            result["sizes"][str(size)] = bench_synthetic(spark, books, collective, Path(tmp), size, size in daily_sizes)
            print(size, result["sizes"][str(size)], flush=True)
            write_result(result, rss, out)
    spark.stop()
    write_result(result, rss, out)
    print(json.dumps({k: result[k] for k in ("interactions_per_s", "clusters_seconds", "time_ratio_10m_over_1m", "peak_rss_mb",
                                             "ml100k_full_s", "ml100k_incremental_s", "incremental_over_full",
                                             "ml100k_incremental_after_full_s", "ml100k_spark_jobs", "ml100k_incremental_engines",
                                             "ml100k_incremental_spark_only_s", "incremental_over_full_spark_only",
                                             "ml100k_quiet_day_s", "quiet_day_over_full", "ml100k_submit_full_s",
                                             "ml100k_submit_incremental_s", "submit_incremental_over_full", "class_archive_saves",
                                             "incremental_over_full_by_size", "incremental_over_full_in_driver_by_size")}))
    return 0


def write_result(result: dict, rss: PeakRss, out: Path) -> None:
    """Fill the summary keys from what was measured so far and write the JSON file."""
    result["interactions_per_s"] = {k: v["interactions_per_s"] for k, v in result["sizes"].items()}
    result["clusters_seconds"] = {k: v["clusters_seconds"] for k, v in result["sizes"].items()}
    totals = {int(k): v["seconds"]["total"] for k, v in result["sizes"].items()}
    result["time_ratio_10m_over_1m"] = round(totals[10_000_000] / totals[1_000_000], 3) if {1_000_000, 10_000_000} <= totals.keys() else None
    result["incremental_over_full_by_size"] = {k: v["full_vs_daily"]["incremental_over_full"]
                                               for k, v in result["sizes"].items() if v.get("full_vs_daily")}
    result["incremental_over_full_in_driver_by_size"] = {k: v["full_vs_daily"]["in_driver"]["incremental_over_full"]
                                                         for k, v in result["sizes"].items() if v.get("full_vs_daily")}
    result["peak_rss_mb"] = round(rss.peak_mb, 1)
    result["load_average_1m"][f"after_{len(result['sizes'])}_sizes" + ("_and_ml100k" if "ml100k" in result else "")] = round(
        os.getloadavg()[0], 2)
    if "ml100k" in result:
        full, inc = result["ml100k"]["full_seconds"]["total"], result["ml100k"]["incremental_seconds"]["total"]
        after_full = result["ml100k"]["incremental_after_full_seconds"]["total"]
        result.update(ml100k_full_s=full, ml100k_incremental_s=inc, incremental_over_full=round(inc / full, 3),
                      ml100k_incremental_after_full_s=after_full,
                      ml100k_quiet_day_s=result["ml100k"]["quiet_day"]["seconds"]["total"],
                      quiet_day_over_full=result["ml100k"]["quiet_day"]["over_full"],
                      ml100k_spark_jobs={"full": result["ml100k"]["full_seconds"]["spark_jobs"],
                                         "daily": result["ml100k"]["incremental_seconds"]["spark_jobs"]},
                      ml100k_incremental_engines=result["ml100k"]["incremental_seconds"]["engines"],
                      ml100k_incremental_spark_only_s=result["ml100k"]["spark_only"]["incremental_seconds"]["total"],
                      incremental_over_full_spark_only=result["ml100k"]["spark_only"]["incremental_over_full"])
        submitted = result["ml100k"]["spark_submit"]
        result.update(ml100k_submit_full_s=submitted.get("best_s", {}).get("archive", {}).get("full"),
                      ml100k_submit_incremental_s=submitted.get("best_s", {}).get("archive", {}).get("daily"),
                      submit_incremental_over_full=submitted.get("incremental_over_full"),
                      class_archive_saves=submitted.get("archive_saves"))
    else:
        result.update(ml100k_full_s=None, ml100k_incremental_s=None, incremental_over_full=None,
                      ml100k_quiet_day_s=None, quiet_day_over_full=None,
                      ml100k_incremental_after_full_s=None, ml100k_spark_jobs=None, ml100k_submit_full_s=None,
                      ml100k_incremental_engines=None, ml100k_incremental_spark_only_s=None, incremental_over_full_spark_only=None,
                      ml100k_submit_incremental_s=None, submit_incremental_over_full=None, class_archive_saves=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    raise SystemExit(main())
