"""Benchmark of the Spark feature jobs as the DAG runs them: Spark Connect clients of a warm server.
Writes bench/results/spark_prep.json.

The benchmark starts its own Connect server (`localstack.SparkConnectServer`, local[2], the configured driver
memory) and warms it up on a small lake, as a server that has served earlier days is warm. Every timed run
is one task's worth of work: a new Connect session (`connect_client`, as `SparkConnectJobs` opens one per task
try), the jobs, the session released; its wall time includes the session's creation.

- ML-100K (movielens scenario, individual mode: clusters skipped): the full build of the last day against its
  daily run in steady state (the day before was itself a daily run), each the fastest of 2, timed
  alternately: `incremental_over_full`. The daily run right after a full build (every user flagged) too.
  Where the daily run's time goes: each job's seconds, the session's own cost (`session_s`), a quiet day (no
  interactions, unchanged snapshots: the jobs' fixed cost) and the least one Spark action costs on a small
  partition (`spark_action_floor_s`). The same full build and daily run through `spark-submit` (a cold JVM
  per run, the class archive of `reki setup` mapped): `submit_incremental_over_full`.
- Synthetic 1M / 3M / 10M interactions (books scenario, 180 days, Zipf): a full build of the last day of each
  through Connect: `interactions_per_s`, `time_ratio_10m_over_1m`; the clusters job alone (collective mode);
  with --daily-sizes, the steady-state daily run too (`incremental_over_full_by_size`).
- The server's resident memory (its JVM and Python workers): peak over the run, and after warm-up.
- With --layouts: the per-user feature datasets as today's tables (keyed, written as changes) against the layout
  of `--baseline` (the commit before the lake moved to tables: Parquet folders, user-bucketed files hard-linked
  from day to day), each arm its own checkout's jobs on one classic local[2] session (bench/spark_prep_arm.py),
  on the same rows: ML-100K and synthetic histories of --layout-sizes interactions (180 days) whose last day has
  1% of the users active. Full build of the last day, and its daily run after a full build and a daily run:
  `daily_over_full_<size>`, `full_over_today_<size>`, `daily_over_today_<size>`; a quiet day after it (no interactions,
  the same snapshots: the jobs' fixed cost), `quiet_over_full_<size>`; and a commit's own cost (`commit_s`).
  `--layouts-only` keeps the rest of the results file as it was and replaces only those keys.

    .venv/bin/python bench/spark_prep.py [--sizes 1000000,3000000,10000000] [--daily-sizes 1000000] [--out ...]
    .venv/bin/python bench/spark_prep.py --layouts-only [--layout-sizes 1000000,4000000] [--baseline 53f35f3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402
from reki_core.datasets import movielens, synthetic  # noqa: E402
from reki_core.localstack import CONNECT_TOKEN_ENV, SparkConnectServer, ensure_connect_token, free_port_block  # noqa: E402
from reki_core.process_memory import ProcessTreePeak  # noqa: E402
from reki_core.prompts import resolve_mode  # noqa: E402
from reki_core.spark import class_archive, connect_client, ensure_class_archive, spark_submit, submit_conf, task_session_id  # noqa: E402
from reki_core.storage.lake import Lake  # noqa: E402
from spark_jobs.common import jobs_named, read_partition, run_jobs  # noqa: E402
from spark_jobs.features import FEATURE_JOBS  # noqa: E402

WARMUP_INTERACTIONS = 5_000
ML100K_REPEATS = 2  # the ML-100K runs take seconds: time each twice, keep the fastest


class Runner:
    """Times `jobs` for a day as one DAG task runs them: a new Connect session per run, released after."""

    def __init__(self, url: str):
        self.url = url
        self.runs = 0

    def run(self, cfg, lake: Lake, day: dt.date, jobs: tuple[str, ...]) -> dict:
        """Seconds per job (their run-log steps'), of the session's creation, and in total (wall)."""
        self.runs += 1
        start = time.perf_counter()
        with connect_client(cfg, self.url, task_session_id(), tag="bench") as spark:
            session_s = round(time.perf_counter() - start, 3)
            steps = run_jobs(spark, jobs_named(jobs), cfg, lake, day)
        seconds = {step.removeprefix("features_"): payload["seconds"] for step, payload in steps.items()}
        # How much of the user-keyed data the day wrote (everyone else's rows stay as they are).
        written = {step.removeprefix("features_"): payload.get("users_written", payload.get("samples_written"))
                   for step, payload in steps.items() if step in ("features_user_history", "features_ctr_samples")}
        return {**seconds, "session_s": session_s, "total": round(time.perf_counter() - start, 2), "written": written}

    def floor(self, cfg, lake: Lake, day: dt.date) -> dict:
        """The least a Spark action costs here, on a small partition (features/items): a count and a rewrite."""
        out = str(Path(lake.root) / "_floor")
        with connect_client(cfg, self.url, task_session_id()) as spark:
            def best_of_3(action) -> float:
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    action()
                    times.append(time.perf_counter() - t)
                return round(min(times), 3)

            def items():
                return read_partition(spark, lake, "features/items", day)

            return {"count": best_of_3(lambda: items().count()),
                    "write": best_of_3(lambda: items().write.mode("overwrite").parquet(out))}


def full_vs_daily(runner: Runner, cfg, lake: Lake, days, jobs, full: dict | None = None, repeats: int = 1) -> dict:
    """Full build of the last day against its steady-state daily run (the day before was a daily run too); the
    daily run right after a full build is recorded as well (a full build flags every user, so that day rewrites
    every bucket). With `repeats`, each is timed that many times, alternating, and the fastest counts."""
    day, prev, before = days[-1], days[-2], days[-3]
    fulls, dailies = ([] if full is None else [full]), []
    for _ in range(repeats):
        if full is None:
            lake.drop_namespace("features")
            fulls.append(runner.run(cfg, lake, day, jobs))
        lake.drop_namespace("features")
        runner.run(cfg, lake, before, jobs)
        after_full = runner.run(cfg, lake, prev, jobs)
        dailies.append(runner.run(cfg, lake, day, jobs))
    full, incremental = min(fulls, key=lambda r: r["total"]), min(dailies, key=lambda r: r["total"])
    return {"day": day.isoformat(), "previous_day": prev.isoformat(), "jobs": list(jobs),
            "full_seconds": full, "incremental_seconds": incremental, "incremental_after_full_seconds": after_full,
            "incremental_over_full": round(incremental["total"] / full["total"], 3),
            "full_totals": [r["total"] for r in fulls], "incremental_totals": [r["total"] for r in dailies]}


def quiet_day(runner: Runner, cfg, lake: Lake, days, jobs, full_s: float) -> dict:
    """The least a daily run costs at this size: two days with no interactions and unchanged snapshots are
    appended and the second one's daily run is timed; nothing is recomputed, so it is the jobs' fixed cost."""
    last = days[-1]
    quiet = [last + dt.timedelta(days=1), last + dt.timedelta(days=2)]
    empty = lake.read_partition("raw/interactions", last).iloc[0:0]
    users, item_rows = lake.read_partition("raw/users", last), lake.read_partition("raw/items", last)
    for day in quiet:
        lake.write_partition(empty, "raw/interactions", day)
        lake.write_partition(users, "raw/users", day)
        lake.write_partition(item_rows, "raw/items", day)
    lake.drop_namespace("features")
    runner.run(cfg, lake, last, jobs)
    runner.run(cfg, lake, quiet[0], jobs)
    runs = [runner.run(cfg, lake, quiet[1], jobs) for _ in range(ML100K_REPEATS)]
    best = min(runs, key=lambda r: r["total"])
    return {"day": quiet[1].isoformat(), "seconds": best, "totals": [r["total"] for r in runs],
            "over_full": round(best["total"] / full_s, 3)}


def submitted_runs(cfg, lake: Lake, days) -> dict:
    """The same full build and daily run through `spark-submit spark_jobs/features.py` (a new JVM each, the class
    archive mapped when set-up built it), twice each; the fastest counts. For comparison only: the DAG does not."""
    day, prev, before = days[-1], days[-2], days[-3]
    # The best a spark-submit gets: the opt-in class archive, built here once (kept in the project's state dir).
    archived = load_config(environ={**os.environ, "REKI__SPARK__CLASS_ARCHIVE": "true"})
    ensure_class_archive(archived)
    conf = submit_conf(archived)

    def submit(d: dt.date) -> float:
        start = time.perf_counter()
        result = spark_submit(cfg, PROJECT_ROOT / "spark_jobs/features.py",
                              ["--lake", str(Path(lake.root)), "--dt", d.isoformat()], conf, timeout_s=600)
        if result.returncode != 0:
            raise RuntimeError(f"spark-submit features {d} failed:\n{(result.stdout + result.stderr)[-3000:]}")
        return round(time.perf_counter() - start, 2)

    fulls = []
    for _ in range(ML100K_REPEATS):
        lake.drop_namespace("features")
        fulls.append(submit(day))
    lake.drop_namespace("features")
    submit(before)
    submit(prev)
    dailies = [submit(day) for _ in range(ML100K_REPEATS)]  # a re-run reads the previous day's state again
    return {"full_s": min(fulls), "daily_s": min(dailies), "full_runs_s": fulls, "daily_runs_s": dailies,
            "class_archive": str(class_archive(archived)) if class_archive(archived).is_file() else None,
            "incremental_over_full": round(min(dailies) / min(fulls), 3)}


def bench_ml100k(runner: Runner, cfg, workdir: Path, submit: bool = True) -> dict:
    inter, users, item_frame = movielens.load(movielens.obtain(cfg.data_dir))
    lake = Lake(str(workdir / "ml100k"))
    days = synthetic.write_raw_lake(lake, inter, users, item_frame)
    collective = resolve_mode(cfg, users["user_id"].nunique(), len(item_frame)) == "collective"
    jobs = FEATURE_JOBS + (("clusters",) if collective else ())
    result = full_vs_daily(runner, cfg, lake, days, jobs, repeats=ML100K_REPEATS)
    result["spark_action_floor_s"] = runner.floor(cfg, lake, days[-1])
    result["spark_submit"] = submitted_runs(cfg, lake, days) if submit else {"skipped": "--skip-submit"}
    result["quiet_day"] = quiet_day(runner, cfg, lake, days, jobs, result["full_seconds"]["total"])
    return result


def bench_synthetic(runner: Runner, books, collective, workdir: Path, size: int, daily: bool) -> dict:
    lake = Lake(str(workdir / f"synthetic-{size}"))
    data = synthetic.generate(size, days=180, seed=1)
    days = sorted(set(synthetic.interaction_days(data.interactions)))
    synthetic.write_raw_lake(lake, data.interactions, data.users, data.items, snapshot_days=days[-(3 if daily else 1):])
    day = days[-1]
    start = time.perf_counter()
    seconds = runner.run(books, lake, day, FEATURE_JOBS)
    history = lake.read_partition("features/user_history", day, columns=["n_interactions"])
    interactions, users = int(history["n_interactions"].sum()), len(history)
    n_items = len(lake.read_partition("features/items", day, columns=["item_id"]))
    clusters_seconds = runner.run(collective, lake, day, ("clusters",))["clusters"]
    daily_run = full_vs_daily(runner, books, lake, days, FEATURE_JOBS, full=seconds) if daily else None
    print(f"{size}: {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(Path(lake.root), ignore_errors=True)
    return {"interactions": interactions, "users": users, "items": n_items, "seconds": seconds,
            "interactions_per_s": round(interactions / seconds["total"], 1), "clusters_seconds": clusters_seconds,
            "extraction_mode": resolve_mode(books, users, n_items), "full_vs_daily": daily_run}


def warm_up(runner: Runner, books, collective, workdir: Path) -> None:
    """A server that has served earlier days: its JVM has loaded and compiled the jobs' code."""
    lake = Lake(str(workdir / "warmup"))
    data = synthetic.generate(WARMUP_INTERACTIONS, days=10, seed=2)
    day = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)[-1]
    for _ in range(2):
        runner.run(books, lake, day, FEATURE_JOBS)
        runner.run(collective, lake, day, ("clusters",))
    shutil.rmtree(Path(lake.root), ignore_errors=True)


def summarise(result: dict) -> None:
    """The headline keys, from what was measured so far."""
    sizes = result["sizes"]
    result["interactions_per_s"] = {k: v["interactions_per_s"] for k, v in sizes.items()}
    result["clusters_seconds"] = {k: v["clusters_seconds"] for k, v in sizes.items()}
    totals = {int(k): v["seconds"]["total"] for k, v in sizes.items()}
    result["time_ratio_10m_over_1m"] = (round(totals[10_000_000] / totals[1_000_000], 3)
                                        if {1_000_000, 10_000_000} <= totals.keys() else None)
    result["incremental_over_full_by_size"] = {k: v["full_vs_daily"]["incremental_over_full"]
                                               for k, v in sizes.items() if v["full_vs_daily"]}
    ml = result.get("ml100k")
    if ml:
        result.update(ml100k_full_s=ml["full_seconds"]["total"], ml100k_incremental_s=ml["incremental_seconds"]["total"],
                      incremental_over_full=ml["incremental_over_full"],
                      ml100k_incremental_after_full_s=ml["incremental_after_full_seconds"]["total"],
                      ml100k_quiet_day_s=ml["quiet_day"]["seconds"]["total"], quiet_day_over_full=ml["quiet_day"]["over_full"],
                      ml100k_submit_full_s=ml["spark_submit"].get("full_s"),
                      ml100k_submit_incremental_s=ml["spark_submit"].get("daily_s"),
                      submit_incremental_over_full=ml["spark_submit"].get("incremental_over_full"))


BASELINE = "53f35f3"  # the last commit before issue 27's lake tables: folders, user buckets, hard links
ACTIVE_SHARE = 0.01  # the daily run's day: 1% of the users active


def one_percent_day(interactions, seed: int = 7):
    """`interactions` with its last day thinned to the interactions of 1% of all users (drawn among those active
    that day): a daily run as most days of a large user base look."""
    days = synthetic.interaction_days(interactions)
    last = days == days.max()
    users = interactions["user_id"].unique()
    active_today = interactions.loc[last, "user_id"].unique()
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(active_today, size=min(len(active_today), max(1, round(len(users) * ACTIVE_SHARE))),
                          replace=False))
    return interactions[~last | interactions["user_id"].isin(keep)].reset_index(drop=True), len(keep), len(users)


def bench_layouts(sizes: list[int], baseline: str, workdir: Path, repeats: int) -> dict:
    """Each size's full build and daily run on today's tables and on the baseline's layout (see the docstring)."""
    checkout = workdir / "baseline"
    subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", str(checkout), baseline],
                   check=True, capture_output=True)
    commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    arms = {"today": checkout, "tables": PROJECT_ROOT}
    out = {"baseline_commit": baseline, "measured_commit": commit.strip()[:12], "sizes": {}}
    try:
        for size in sizes:
            inputs = workdir / f"inputs-{size}"
            inputs.mkdir()
            if size == 100_000:  # ML-100K itself, as it lands
                cfg = load_config()
                inter, users, item_frame = movielens.load(movielens.obtain(cfg.data_dir))
                scenario, active, n_users = "movielens", None, int(users["user_id"].nunique())
            else:
                data = synthetic.generate(size, days=180, seed=1)
                inter, active, n_users = one_percent_day(data.interactions)
                users, item_frame, scenario = data.users, data.items, "books"
            for name, frame in (("interactions", inter), ("users", users), ("items", item_frame)):
                frame.to_parquet(inputs / f"{name}.parquet")
            entry = {"interactions": len(inter), "users": n_users, "active_users_last_day": active, "arms": {}}
            for arm, root in arms.items():
                work = workdir / f"{arm}-{size}"
                proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench/spark_prep_arm.py"), "--inputs",
                                       str(inputs), "--work", str(work), "--scenario", scenario, "--repeats",
                                       str(repeats if size <= 1_000_000 else 1)],
                                      cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                                      text=True, timeout=3600)
                if proc.returncode != 0:
                    raise RuntimeError(f"{arm} arm, {size}: {proc.stderr[-3000:]}")
                entry["arms"][arm] = json.loads(proc.stdout.strip().splitlines()[-1])
                shutil.rmtree(work, ignore_errors=True)
                print(f"layouts {size} {arm}: full {entry['arms'][arm]['full']['total']} s, "
                      f"daily {entry['arms'][arm]['daily']['total']} s", flush=True)
            shutil.rmtree(inputs, ignore_errors=True)
            today, tables = entry["arms"]["today"], entry["arms"]["tables"]
            label = "ml100k" if size == 100_000 else f"{size // 1_000_000}m"
            entry.update({f"daily_over_full_{label}": round(tables["daily"]["total"] / tables["full"]["total"], 3),
                          f"full_over_today_{label}": round(tables["full"]["total"] / today["full"]["total"], 3),
                          f"daily_over_today_{label}": round(tables["daily"]["total"] / today["daily"]["total"], 3),
                          "today_daily_over_full": round(today["daily"]["total"] / today["full"]["total"], 3),
                          # A day with no interactions and unchanged snapshots: the jobs' fixed cost, under any daily run.
                          f"quiet_over_full_{label}": round(tables["quiet"]["total"] / tables["full"]["total"], 3),
                          "today_quiet_over_full": round(today["quiet"]["total"] / today["full"]["total"], 3),
                          "commit_s": {"today": today["commit_s"], "tables": tables["commit_s"]}})
            entry["measured_commit"] = out["measured_commit"]  # sizes re-run alone keep their own commit
            out["sizes"][label] = entry
    finally:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force", str(checkout)],
                       capture_output=True)
    return out


def layouts_only(args) -> int:
    """Replace the layout comparison's keys of the results file, keeping the rest as it was measured."""
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    sizes = [int(s) for s in args.layout_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="reki-bench-layouts-") as tmp:
        layouts = bench_layouts(sizes, args.baseline, Path(tmp), repeats=2)
    layouts["measured_at"] = dt.datetime.now(dt.UTC).isoformat()
    # Sizes not re-run this time keep their figures, each with the commit it measured.
    earlier = result.get("layouts", {})
    kept = {label: {"measured_commit": earlier.get("measured_commit"), **entry}
            for label, entry in earlier.get("sizes", {}).items()}
    layouts["sizes"] = {**kept, **layouts["sizes"]}
    result["layouts"] = layouts
    for entry in layouts["sizes"].values():
        result.update({k: v for k, v in entry.items() if k.startswith(("daily_over_", "full_over_", "quiet_over_"))})
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("daily_over_", "full_over_", "quiet_over_"))}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts-only", action="store_true", help="only the layout comparison (see the docstring)")
    parser.add_argument("--layout-sizes", default="100000,1000000,4000000",
                        help="100000 is ML-100K itself; others synthetic")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose layout is today's")
    parser.add_argument("--sizes", default="1000000,3000000,10000000")
    parser.add_argument("--daily-sizes", default="1000000", help="sizes that also get a steady-state daily run")
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--skip-submit", action="store_true", help="no spark-submit comparison (minutes on 2 cores)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench/results/spark_prep.json"))
    args = parser.parse_args()
    if args.layouts_only:
        return layouts_only(args)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    daily_sizes = {int(s) for s in args.daily_sizes.split(",") if s}
    out = Path(args.out)

    with tempfile.TemporaryDirectory(prefix="reki-bench-") as tmp:
        url = f"sc://localhost:{free_port_block(1)}"
        env = {**os.environ, "REKI__SPARK__MASTER": "local[2]", "REKI__SPARK__CONNECT_URL": url,
               "REKI__PATHS__STATE_DIR": str(Path(tmp) / "state")}
        movielens_cfg = load_config(environ=env)
        books = load_config(environ={**env, "REKI__SCENARIO": "books"})
        collective = load_config(environ={**env, "REKI__SCENARIO": "books",
                                          "REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}"})
        server = SparkConnectServer(books)
        started = time.perf_counter()
        server.start()
        os.environ[CONNECT_TOKEN_ENV] = ensure_connect_token(books.state_dir)
        result: dict = {
            "machine": f"{psutil.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
            "engine": "Spark Connect server (spark-submit --class ...SparkConnectServer), local[2]; a new client session per timed run",
            "driver_memory": books.spark.driver_memory, "shuffle_partitions": books.spark.shuffle_partitions,
            "measured_at": dt.datetime.now(dt.UTC).isoformat(),
            "load_average_1m": {"start": round(os.getloadavg()[0], 2)},
            "connect_server_start_s": round(time.perf_counter() - started, 2),
            "headline_jobs": list(FEATURE_JOBS), "sizes": {},
            "notes": "Every timed run is one DAG task's worth: a new Connect session (session_s), the jobs, the session "
                     "released. interactions_per_s, time_ratio_10m_over_1m: full build of the last day, headline_jobs. "
                     "ml100k_*: fastest of 2, full build and steady-state daily run timed alternately; "
                     "incremental_after_full: the daily run right after a full build (every bucket rewritten). "
                     "quiet_day: a day with nothing to recompute, the jobs' fixed cost. spark_action_floor_s: the least "
                     "a count and a rewrite of a small partition cost. ml100k_submit_*: the same through spark-submit "
                     "(a cold JVM per run, class archive mapped), for comparison; the DAG does not spark-submit. "
                     "connect_server_rss_mb: the server's JVM and Python workers.",
        }
        runner = Runner(url)
        try:
            with ProcessTreePeak(server.pid(), interval_s=0.5) as rss:
                warm_up(runner, books, collective, Path(tmp))
                result["connect_server_rss_mb"] = {"after_warm_up": round(rss.now_mib(), 1)}

                def write() -> None:
                    summarise(result)
                    result["connect_server_rss_mb"].update(peak=round(rss.peak_mib, 1), now=round(rss.now_mib(), 1))
                    result["load_average_1m"][f"after_{len(result['sizes'])}_sizes"] = round(os.getloadavg()[0], 2)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(result, indent=2, sort_keys=True))

                if not args.skip_ml100k:  # the cheap comparison first; the file is rewritten after every step
                    result["ml100k"] = bench_ml100k(runner, movielens_cfg, Path(tmp), not args.skip_submit)
                    write()
                for size in sizes:
                    result["sizes"][str(size)] = bench_synthetic(runner, books, collective, Path(tmp), size,
                                                                 size in daily_sizes)
                    write()
                write()
        finally:
            server.stop()
    print(json.dumps({k: result.get(k) for k in (
        "incremental_over_full", "ml100k_full_s", "ml100k_incremental_s", "ml100k_quiet_day_s",
        "submit_incremental_over_full", "time_ratio_10m_over_1m", "interactions_per_s", "connect_server_rss_mb")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
