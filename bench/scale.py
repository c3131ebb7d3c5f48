"""Memory and time of the whole daily DAG as the dataset grows (issue 28's `scale` benchmark).

For each size (interactions in total; users and items grow with them, `synthetic.generate`'s defaults), on fresh
state with its own embedded stack (bench/cluster.py's `Embedded`: SeaweedFS, Spark Connect, Airflow with the
LocalExecutor; the smoke model stands in for the LLM, in-process, as the issue allows for this benchmark only), the
upstream deliveries are written to `incoming/` (`source.kind: files`) and the DAG runs three days:

- the set-up day: the first load of `history_days` days of history (every entity extracted and encoded, the model
  trained);
- the measured day: `active_share` of the users (1%) each interact a few times;
- an empty day (no interactions): each task's import baseline.

Each task's peak RSS is that of its whole process tree (shard subprocesses included), sampled in the task's own
process by the task-memory listener (`plugins/reki_airflow/task_memory.py`, XCom `peak_rss_mib`); a mapped task's
figure is its largest map index. Per task, `above_baseline_mib` = measured day minus empty day, and the ratio is
that figure at the largest size over the smallest. The Connect server's peak RSS (and the LLM server's, when one
runs) is sampled separately. Time is the measured day's run, start to end.

    .venv/bin/python bench/scale.py [--sizes 1000000 4000000] [--active-share 0.01] [--reuse-runs]
writes bench/results/scale.json (and scale.png); other sizes than the issue's write scale-<a>-<b>.json. Each size's
raw figures are kept in .reki/cluster-tests/scale-run-<n>.json; --reuse-runs takes them instead of running again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster import DAG_ID, Embedded, _sh  # noqa: E402
from reki_core.config import PROJECT_ROOT  # noqa: E402
from reki_core.llm.smoke_model import SMOKE_LLM_ENV  # noqa: E402
from reki_core.storage.publish import code_version  # noqa: E402

ISSUE_SIZES = (1_000_000, 4_000_000)
START = dt.date(2024, 1, 1)
# The Spark tasks' own processes are Connect clients: the data is in the server, measured on its own.
SPARK_TASKS = ("land", "spark_features", "spark_clusters", "feature_checks", "prompts", "assign_knowledge",
               "encoding_misses", "knowledge_vectors", "vectors_checks")
SETTINGS = {
    "REKI__SCENARIO": "books",
    "REKI__SCENARIO_OVERRIDES__SOURCE__KIND": "files",
    "REKI__SCENARIO_OVERRIDES__SOURCE__START_DATE": START.isoformat(),
    # One extraction mode at every size (auto would switch at 50,000 users + items): REKI's mode for large data.
    "REKI__SCENARIO_OVERRIDES__EXTRACTION_MODE": "collective",
    # The smoke model stands in for the LLM (the issue allows it here only): in-process, an engine per shard, its
    # answer gates warning only. The real model on the local llama.cpp server answers a group prompt in about 6 s on
    # 2 cores, and the 4M first load has 2,401 group prompts.
    **SMOKE_LLM_ENV,
    # The DAG's own shard size, not bench/cluster.py's one shard a day: the extraction task is bounded by its shard.
    "REKI__LLM__SHARD_SIZE": "256",
    # Short answers and one epoch: the benchmark measures the data plane, not the model.
    "REKI__LLM__SAMPLING__MAX_TOKENS": "32",
    "REKI__MODEL__MAX_EPOCHS": "1",
    "REKI__MODEL__AUC_TOLERANCE_VS_BASELINE": "1.0",
}


# ---------------------------------------------------------------- deliveries (run under the profile's environment)


def deliver(n_interactions: int, history_days: int, active_share: float, seed: int) -> dict:
    """Write every delivery of the three days to `incoming/`; returns the days and counts."""
    from reki_core.config import load_config
    from reki_core.datasets import synthetic
    from reki_core.datasets.schema import day_bounds, normalise_interactions
    from reki_core.datasets.source import write_delivery
    from reki_core.storage.lake import lake_of

    cfg = load_config()
    lake = lake_of(cfg)
    data = synthetic.generate(n_interactions, start=START, days=history_days, seed=seed)
    history = data.interactions
    setup_day = START + dt.timedelta(days=history_days - 1)
    measured, empty = setup_day + dt.timedelta(days=1), setup_day + dt.timedelta(days=2)

    # The measured day: a random `active_share` of the users seen so far, each with 1 + Poisson(3) interactions on
    # items drawn by their popularity so far.
    rng = np.random.default_rng(seed + 1)
    seen = history["user_id"].unique()
    active = rng.choice(seen, size=max(1, round(active_share * len(seen))), replace=False)
    per_user = 1 + rng.poisson(3, len(active))
    popularity = history["item_id"].value_counts()
    items = rng.choice(popularity.index.to_numpy(), size=int(per_user.sum()), p=(popularity / popularity.sum()).to_numpy())
    start_ts = day_bounds(measured)[0]
    day_rows = normalise_interactions(pd.DataFrame({
        "user_id": np.repeat(active, per_user), "item_id": items,
        "rating": rng.integers(1, 6, len(items)), "ts": start_ts + rng.integers(0, 86_400, len(items))}))
    day_rows = day_rows.drop_duplicates(["user_id", "item_id", "ts"]).reset_index(drop=True)

    days = synthetic.interaction_days(history)
    for day, part in history.groupby(days, sort=True):
        write_delivery(lake, "interactions", day, part)
    write_delivery(lake, "interactions", measured, day_rows)
    write_delivery(lake, "interactions", empty, day_rows.iloc[:0])
    users = data.users[data.users["user_id"].isin(seen)]
    for day in (setup_day, measured, empty):
        write_delivery(lake, "users", day, users)
        write_delivery(lake, "items", day, data.items)
    return {"setup_day": setup_day.isoformat(), "measured_day": measured.isoformat(), "empty_day": empty.isoformat(),
            "interactions": int(len(history)), "users": int(len(users)), "items": int(len(data.items)),
            "measured_day_interactions": int(len(day_rows)), "measured_day_active_users": int(len(active))}


# ---------------------------------------------------------------- one size


def _pid(folder: Path, name: str) -> int | None:
    for path in folder.rglob(f"pids/{name}.pid"):
        return int(path.read_text().split()[0])
    return None


def _task_figures(api, run_id: str) -> dict[str, dict]:
    """Per task: peak RSS (MiB, the largest map index's), seconds (summed over map indexes), map indexes."""
    out: dict[str, dict] = {}
    tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=500")["task_instances"]
    for ti in tis:
        if ti["state"] != "success":
            continue
        task, index = ti["task_id"], ti.get("map_index", -1)
        entry = out.setdefault(task, {"peak_rss_mib": None, "seconds": 0.0, "instances": 0})
        entry["seconds"] = round(entry["seconds"] + (ti.get("duration") or 0.0), 2)
        entry["instances"] += 1
        try:
            xcom = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task}/xcomEntries/"
                                   f"peak_rss_mib?map_index={index}&deserialize=true")
        except Exception as exc:  # noqa: BLE001 - a task without the figure is reported, not guessed
            print(f"  no peak_rss_mib for {task}[{index}]: {exc}", flush=True)
            continue
        value = float(xcom["value"])
        entry["peak_rss_mib"] = max(entry["peak_rss_mib"] or 0.0, value)
    return out


def _failures(api, run_id: str) -> str:
    """The failed tasks of a run and the end of each one's log."""
    out = []
    tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=500")["task_instances"]
    for ti in tis:
        if ti["state"] not in ("failed", "upstream_failed"):
            continue
        out.append(f"\n--- {ti['task_id']}[{ti.get('map_index', -1)}]: {ti['state']}")
        if ti["state"] == "failed":
            try:
                log = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/"
                                      f"{ti['try_number']}?map_index={ti.get('map_index', -1)}")
                events = []
                for e in log.get("content") or []:
                    events.append(e.get("event", "") if isinstance(e, dict) else str(e))
                    for detail in (e.get("error_detail") or []) if isinstance(e, dict) else []:
                        events.append(f"{detail.get('exc_type')}: {detail.get('exc_value')}")
                out.append("\n".join(str(e) for e in events)[-3000:])
            except Exception as exc:  # noqa: BLE001 - the state is still worth reporting
                out.append(f"(no log: {exc})")
    return "".join(out)


def run_size(n_interactions: int, args, root: Path) -> dict:
    from reki_core.airflow_api import states_of
    from reki_core.process_memory import ProcessTreePeak

    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{n_interactions}-", dir=root))
    tmp.chmod(0o711)
    profile = Embedded(tmp)
    profile.env.update(SETTINGS)
    print(f"==> {n_interactions:,} interactions: stack in {tmp}", flush=True)
    api = profile.start()
    try:
        t0 = time.perf_counter()
        out = _sh(profile.env, f"python bench/scale.py --deliver {n_interactions} --history-days {args.history_days} "
                               f"--active-share {args.active_share} --seed {args.seed}", timeout=3600)
        facts = json.loads(out.stdout.strip().splitlines()[-1])
        facts["deliveries_s"] = round(time.perf_counter() - t0, 1)
        facts["code_version"] = code_version()  # a size's kept figures may be reused later: which code measured them
        print(f"  deliveries: {facts}", flush=True)
        api.unpause(DAG_ID)
        runs, servers = {}, {}
        for label in ("setup_day", "measured_day", "empty_day"):
            day = dt.date.fromisoformat(facts[label])
            connect, llm = _pid(tmp, "spark-connect"), _pid(tmp, "llm-server")
            samplers = {name: ProcessTreePeak(pid, interval_s=0.5).start() for name, pid
                        in (("connect_server", connect), ("llm_server", llm)) if pid}
            t0 = time.perf_counter()
            profile.backfill(day, day)
            run = api.wait_for_days(DAG_ID, [day], timeout_s=args.timeout_s, interval_s=3)[day]
            wall = time.perf_counter() - t0
            peaks = {name: round(s.stop(), 1) for name, s in samplers.items()}
            if not run or run["state"] != "success":
                raise RuntimeError(f"{label} {day}: the run did not succeed: {states_of({day: run})}"
                                   + (_failures(api, run["dag_run_id"]) if run else ""))
            api.wait_backfills_completed(DAG_ID)
            runs[label] = {"day": day.isoformat(), "run_id": run["dag_run_id"], "backfill_wall_s": round(wall, 1),
                           "run_s": round((dt.datetime.fromisoformat(run["end_date"].replace("Z", "+00:00"))
                                           - dt.datetime.fromisoformat(run["start_date"].replace("Z", "+00:00")))
                                          .total_seconds(), 1),
                           "tasks": _task_figures(api, run["dag_run_id"])}
            servers[label] = peaks
            print(f"  {label} {day}: {runs[label]['run_s']} s; servers {peaks}", flush=True)
        return {"facts": facts, "runs": runs, "server_peak_rss_mib": servers}
    finally:
        profile.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- summary


# Below this, a difference between two runs of a 600+ MiB task process is run-to-run variation, not data: the ratio
# divides by at least this much (the raw figures are in `above_baseline_mib`).
NOISE_FLOOR_MIB = 32.0


def above_baseline(size: dict) -> dict[str, float]:
    measured, empty = size["runs"]["measured_day"]["tasks"], size["runs"]["empty_day"]["tasks"]
    return {task: round(f["peak_rss_mib"] - empty[task]["peak_rss_mib"], 1) for task, f in measured.items()
            if f["peak_rss_mib"] is not None and empty.get(task, {}).get("peak_rss_mib") is not None}


def without_baseline(size: dict) -> dict[str, float]:
    """Tasks that run only on a day with work (an extraction shard): their measured-day peak, no empty-day figure."""
    measured, empty = size["runs"]["measured_day"]["tasks"], size["runs"]["empty_day"]["tasks"]
    return {task: f["peak_rss_mib"] for task, f in measured.items()
            if f["peak_rss_mib"] is not None and empty.get(task, {}).get("peak_rss_mib") is None}


def summarise(results: dict[int, dict]) -> dict:
    small, large = min(results), max(results)
    above = {n: above_baseline(r) for n, r in results.items()}
    ratios = {task: round(max(above[large][task], 0.0) / max(above[small][task], NOISE_FLOOR_MIB), 3)
              for task in sorted(set(above[small]) & set(above[large]))}
    unbased = {n: without_baseline(r) for n, r in results.items()}
    # A task without an empty-day run is compared on its whole peak (its import baseline included).
    for task in sorted(set(unbased[small]) & set(unbased[large])):
        ratios[task] = round(unbased[large][task] / unbased[small][task], 3)
    python = {t: r for t, r in ratios.items() if t not in SPARK_TASKS}
    worst = max(python, key=python.get) if python else None
    run_s = {n: r["runs"]["measured_day"]["run_s"] for n, r in results.items()}
    return {
        "python_task_rss_ratio_max": {"ratio": python.get(worst), "task": worst},
        "time_ratio": round(run_s[large] / run_s[small], 3),
        "rss_ratio_by_task": ratios,
        "noise_floor_mib": NOISE_FLOOR_MIB,
        "above_baseline_mib": {str(n): a for n, a in above.items()},
        "peak_without_empty_day_run_mib": {str(n): u for n, u in unbased.items()},
        "measured_day_run_s": {str(n): s for n, s in run_s.items()},
        "code_version_by_size": {str(n): r["facts"].get("code_version") for n, r in results.items()},
        "spark_tasks": list(SPARK_TASKS),
        "targets": {"python_task_rss_ratio_max": 1.25, "time_ratio": 4.5},
    }


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    above = {n: above_baseline(results[n]) for n in sizes}
    tasks = sorted(set.intersection(*(set(a) for a in above.values())), key=lambda t: -above[sizes[-1]][t])
    x = np.arange(len(tasks))
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(tasks)), 4.5))
    for i, n in enumerate(sizes):
        ax.bar(x + i * width, [above[n][t] for t in tasks], width, label=f"{n:,} interactions")
    ax.set_xticks(x + width * (len(sizes) - 1) / 2, tasks, rotation=45, ha="right")
    ax.set_ylabel("peak RSS above the empty day (MiB)")
    ax.set_title("Daily DAG, 1% of users active: memory of each task's process tree")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(ISSUE_SIZES))
    parser.add_argument("--history-days", type=int, default=30)
    parser.add_argument("--active-share", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5400)
    parser.add_argument("--deliver", type=int, help=argparse.SUPPRESS)  # inside a profile's environment
    parser.add_argument("--reuse-runs", action="store_true", help="reuse a size's figures kept by an earlier run")
    parser.add_argument("--resummarise", type=Path, help="recompute the summary and plot of a results file")
    args = parser.parse_args()
    if args.deliver:
        print(json.dumps(deliver(args.deliver, args.history_days, args.active_share, args.seed)))
        return
    if args.resummarise:
        out = json.loads(args.resummarise.read_text())
        results = {int(n): r for n, r in out["sizes"].items()}
        out.update(summarise(results))
        plot(results, PROJECT_ROOT / out["plot"])
        args.resummarise.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps({k: out[k] for k in ("python_task_rss_ratio_max", "time_ratio", "rss_ratio_by_task")}))
        return
    root = PROJECT_ROOT / ".reki" / "cluster-tests"  # bench/cluster.py's scratch root (reachable by system users)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in sorted(args.sizes):
        kept = root / f"scale-run-{n}.json"  # one size's raw figures: --reuse-runs skips a size already measured
        if args.reuse_runs and kept.exists():
            results[n] = json.loads(kept.read_text())
            print(f"==> {n:,} interactions: reusing {kept}", flush=True)
            continue
        results[n] = run_size(n, args, root)
        kept.write_text(json.dumps(results[n], indent=2) + "\n")
    name = "scale" if tuple(sorted(args.sizes)) == ISSUE_SIZES else f"scale-{'-'.join(map(str, sorted(args.sizes)))}"
    out_dir = PROJECT_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, out_dir / f"{name}.png")
    out = {
        "what": f"{DAG_ID} on synthetic histories ({args.history_days} days of history, then a day on which "
                f"{args.active_share:.0%} of the users are active, then an empty day); embedded profile",
        "llm": "the smoke model (reki-smoke-lm, random weights, meaningless text) in-process, an engine per shard, "
               "answers capped at 32 tokens: this benchmark measures the data plane. With no LLM server running, "
               "its RSS is not sampled here (bench/results/llm_serving.json has the server's figures)",
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "settings": SETTINGS,
        **summarise(results),
        "sizes": {str(n): r for n, r in results.items()},
        "plot": f"bench/results/{name}.png",
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("python_task_rss_ratio_max", "time_ratio", "rss_ratio_by_task")}))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
