"""The knowledge-extraction runner: plan shards, run each shard (resumable), assign answers to entities.

Flow for one date `dt` (the DAG maps one task per shard):

1. `plan_shards(cfg, dt)`: prompts of `prompts/dt=D/` to send (individual: user/item prompts; collective:
   group prompts) whose `prompt_hash` has no answer in the knowledge store for this model and sampling
   version, cut into shards of `llm.shard_size` (ids 0..n-1 over the sorted hashes). Writes the plan to
   `knowledge/plan/dt=D/`. Finished batches of a killed shard are folded into the store first.
2. `run_shard(cfg, dt, shard_id)`: generates the shard's answers batch by batch; each batch is
   checkpointed atomically under `knowledge/_inflight/dt=D/shard-N/`, so a retried shard resumes and a
   killed worker loses at most one batch. On success the shard becomes one store file.
3. `knowledge/assigned/dt=D/`, one row per user and item with the text to encode: the Spark job
   `spark_jobs/knowledge.py` (`assign_knowledge(cfg, dt)` runs it outside the DAG).
4. `extraction_summary(cfg, dt)`: calls, tokens, tokens/s, wall time, cache hits, failures, gate warnings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import time
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa

from reki_core.config import Config
from reki_core.llm.store import (
    check_model_weights,
    known_prompt_hashes,
    sampling_version,
    store_table,
    write_parquet_atomically,
    write_store_shard,
)
from reki_core.runlog import read_steps, record_step
from reki_core.storage.lake import Lake, as_date, lake_of

log = logging.getLogger(__name__)

PROMPTS = "prompts"
PLAN = "knowledge/plan"
FAILURES = "knowledge/failures"
ASSIGNED = "knowledge/assigned"
INFLIGHT = "knowledge/_inflight"

INDIVIDUAL_KINDS = ("user", "item")
GROUP_KINDS = ("item_group", "user_pos_group", "user_neg_group")
FAILURE_COLUMNS = ["prompt_hash", "entity_kind", "entity_id", "shard_id", "action", "reason",
                   "model_id", "sampling_version", "recorded_at"]
SHARD_STEP_PREFIX = "llm_shard_"


class ShardFailedError(RuntimeError):
    """More prompts of a shard failed than `llm.max_failure_rate` allows; its finished batches are kept."""


def _day(day: str | dt.date) -> str:
    return as_date(day).isoformat()


def _model_keys(cfg: Config) -> tuple[str, str]:
    return cfg.llm.engine.model_id, sampling_version(cfg)


# ---------------------------------------------------------------- mode and prompts


def extraction_mode(cfg: Config, prompts: pd.DataFrame) -> str:
    """`individual` or `collective`; `auto` picks collective above `auto_collective_above` users + items."""
    mode = cfg.scenario.extraction_mode
    if mode != "auto":
        return mode
    entities = prompts[prompts["entity_kind"].isin(INDIVIDUAL_KINDS)]
    n_entities = entities[["entity_kind", "entity_id"]].drop_duplicates().shape[0]
    return "collective" if n_entities > cfg.scenario.auto_collective_above else "individual"


def extraction_prompts(cfg: Config, day: str | dt.date, lake: Lake | None = None, columns: list[str] | None = None,
                       among: set[str] | None = None) -> tuple[pd.DataFrame, str]:
    """The prompts of `dt` that go to the LLM in this scenario's mode (one row per prompt_hash, `columns` of them, those
    `among` some hashes when given), and the mode. The prompt stage flags those rows (`ask_llm`): only they are read,
    the flag and the hashes pushed down to the table scan."""
    lake = lake or lake_of(cfg)
    present = lake.column_names(PROMPTS)
    if "ask_llm" not in present:  # written before the prompt stage flagged its rows
        prompts, mode = _resolve_whole_day(cfg, day, lake)
        prompts = prompts if among is None else prompts[prompts["prompt_hash"].isin(among)].reset_index(drop=True)
        return (prompts if columns is None else prompts[list(dict.fromkeys(["prompt_hash", *columns]))]), mode
    missing = {"prompt_hash", "entity_kind", "entity_id", "text"} - set(present)
    if missing:
        raise ValueError(f"{lake.describe(PROMPTS, day)}: missing columns {sorted(missing)}")
    wanted = [c for c in present if columns is None or c == "prompt_hash" or c in columns]
    where = {"ask_llm": True, **({"prompt_hash": among} if among is not None else {})}
    batches = list(lake.read_batches(PROMPTS, day, wanted, cfg.lake.batch_rows, where=where))
    chosen = pa.Table.from_batches(batches).to_pandas() if batches else pd.DataFrame(columns=wanted)
    # The first row of a hash in table order, as a whole-day read keeps it: entities with one prompt share one call.
    chosen = chosen.drop_duplicates("prompt_hash").sort_values("prompt_hash").reset_index(drop=True)
    # The stage made group prompts only in the collective mode: one batch of their kinds tells.
    groups = lake.read_batches(PROMPTS, day, ["entity_kind"], 1, where={"entity_kind": set(GROUP_KINDS)})
    return chosen, "collective" if next(groups, None) is not None else "individual"


def _resolve_whole_day(cfg: Config, day: str | dt.date, lake: Lake) -> tuple[pd.DataFrame, str]:
    """A day of prompts without the `ask_llm` flags: the mode from the whole day, then its kinds' prompts."""
    prompts = lake.read_partition(PROMPTS, day)
    missing = {"prompt_hash", "entity_kind", "entity_id", "text"} - set(prompts.columns)
    if missing:
        raise ValueError(f"{lake.describe(PROMPTS, day)}: missing columns {sorted(missing)}")
    mode = extraction_mode(cfg, prompts)
    kinds = INDIVIDUAL_KINDS if mode == "individual" else GROUP_KINDS
    chosen = prompts[prompts["entity_kind"].isin(kinds)]
    if chosen.empty and not prompts.empty:
        raise ValueError(f"{lake.describe(PROMPTS, day)}: extraction mode '{mode}' needs prompts "
                         f"of kind {list(kinds)}, found only {sorted(prompts['entity_kind'].unique())}")
    # Entities with the same prompt share one call.
    return chosen.drop_duplicates("prompt_hash").sort_values("prompt_hash").reset_index(drop=True), mode


# ---------------------------------------------------------------- planning


def _inflight_dir(lake: Lake, day: str | dt.date, shard_id: int | None = None) -> str:
    base = f"{lake.root}/{INFLIGHT}/dt={_day(day)}"
    return base if shard_id is None else f"{base}/shard-{shard_id:05d}"


def _read_checkpoints(lake: Lake, folder: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not lake.fs.exists(folder):
        return store_table([]).to_pandas()
    tables = []
    for path in sorted(lake.fs.find(folder)):
        if path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith("."):
            with lake.fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh))
    if not tables:
        return store_table([]).to_pandas()
    return pa.concat_tables(tables).to_pandas()


def _recover_checkpoints(cfg: Config, lake: Lake, day: str | dt.date) -> int:
    """Fold finished batches of killed shards into the store (they are paid-for answers); returns rows saved.

    Those of `dt`, and those any other date left behind (a shard that ran out of retries, a date nobody
    re-ran: with catchup off that is the usual case). Runs of the DAG never overlap (max_active_runs=1),
    so no other shard is writing here while a plan is made.
    """
    base = f"{lake.root}/{INFLIGHT}"
    folders = {_inflight_dir(lake, day)}
    if lake.fs.exists(base):
        found = (p.rstrip("/") for p in lake.fs.ls(base, detail=False))
        folders |= {f for f in found if f.rsplit("/", 1)[-1].startswith("dt=")}
    model_id, sv = _model_keys(cfg)
    saved = 0
    for folder in sorted(folders):
        done = _read_checkpoints(lake, folder)
        done = done[(done["model_id"] == model_id) & (done["sampling_version"] == sv)]
        if len(done):
            name = folder.rsplit("/", 1)[-1]
            write_store_shard(lake, model_id, sv, f"{name}-recovered-{uuid.uuid4().hex[:8]}", done)
            saved += len(done)
        if lake.fs.exists(folder):
            lake.fs.rm(folder, recursive=True)
    return saved


def plan_shards(cfg: Config, day: str | dt.date) -> list[dict[str, Any]]:
    """Split the prompts of `dt` without knowledge into shards; writes `knowledge/plan/dt=D/`.

    Returns one small dict per shard (`shard_id`, `n_prompts`, `plan_id`): the DAG maps a task over them.
    """
    lake = lake_of(cfg)
    started = time.perf_counter()
    recovered = _recover_checkpoints(cfg, lake, day)
    prompts, mode = extraction_prompts(cfg, day, lake, columns=["prompt_hash"])  # the hashes are the plan
    model_id, sv = _model_keys(cfg)
    weights = check_model_weights(cfg, lake)  # before any cached answer is trusted
    known = known_prompt_hashes(lake, model_id, sv, among=set(prompts["prompt_hash"]))
    pending = prompts[~prompts["prompt_hash"].isin(known)]["prompt_hash"].tolist()
    size = max(1, cfg.llm.shard_size, math.ceil(len(pending) / cfg.llm.max_shards))
    plan_id = hashlib.sha256("\n".join([model_id, sv, *pending]).encode()).hexdigest()[:12]
    shard_of = [i // size for i in range(len(pending))]
    lake.write_partition(pd.DataFrame({"prompt_hash": pd.Series(pending, dtype="string"),
                                       "shard_id": pd.Series(shard_of, dtype="int64")}), PLAN, day)
    shards = [{"shard_id": s, "n_prompts": min(size, len(pending) - s * size), "plan_id": plan_id}
              for s in range(math.ceil(len(pending) / size))]
    lake.write_json(f"{PLAN}/dt={_day(day)}/_plan.json", {
        "plan_id": plan_id, "mode": mode, "model_id": model_id, "sampling_version": sv, "weights_fingerprint": weights,
        "n_prompts": len(prompts), "n_pending": len(pending), "cache_hits": len(prompts) - len(pending),
        "shards": shards,
    })
    # Failures of earlier attempts are pending again in this plan: start their record afresh.
    failures = lake.partition_path(FAILURES, day)
    if lake.fs.exists(failures):
        lake.fs.rm(failures, recursive=True)
    record_step(lake, day, "llm_plan", {
        "mode": mode, "plan_id": plan_id, "n_prompts": len(prompts), "n_pending": len(pending),
        "cache_hits": len(prompts) - len(pending), "n_shards": len(shards), "recovered_from_killed_shards": recovered,
        "seconds": round(time.perf_counter() - started, 3), "is_smoke_model": cfg.llm.is_smoke_model,
    })
    return shards


def read_plan(cfg: Config, day: str | dt.date) -> dict[str, Any]:
    lake = lake_of(cfg)
    plan = lake.read_json(f"{PLAN}/dt={_day(day)}/_plan.json")
    if plan is None:
        raise FileNotFoundError(f"no extraction plan for dt={_day(day)} under "
                                f"{lake.describe(PLAN, day)}: run plan_shards first")
    return plan


# ---------------------------------------------------------------- one shard


def _failure_rows(cfg: Config, rows: pd.DataFrame, shard_id: int, action: str, reasons: list[str]) -> list[dict]:
    model_id, sv = _model_keys(cfg)
    now = dt.datetime.now(dt.UTC).isoformat()
    return [{"prompt_hash": r.prompt_hash, "entity_kind": r.entity_kind, "entity_id": str(r.entity_id),
             "shard_id": shard_id, "action": action, "reason": reason, "model_id": model_id,
             "sampling_version": sv, "recorded_at": now}
            for r, reason in zip(rows.itertuples(index=False), reasons)]


def order_by_length(lengths: list[int]) -> list[int]:
    """Positions sorted by prompt length (stable): a batch is padded to its longest prompt, so mixing short
    item prompts with long user prompts wastes most of a batch's compute."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def run_shard(cfg: Config, day: str | dt.date, shard_id: int, backend=None) -> dict[str, Any]:
    """Answer the prompts of one planned shard; resumable; returns (and records) the shard's accounting.

    `backend` defaults to `make_backend(cfg)` (a test seam: any object with the `Backend` interface).
    """
    from tqdm import tqdm

    from reki_core.llm.backends import GenerationRequest

    started = time.perf_counter()
    lake = lake_of(cfg)
    plan = read_plan(cfg, day)
    model_id, sv = _model_keys(cfg)
    if (plan["model_id"], plan["sampling_version"]) != (model_id, sv):
        raise ValueError(f"plan of dt={_day(day)} was made for {plan['model_id']}/{plan['sampling_version']}, "
                         f"config says {model_id}/{sv}: re-run plan_shards")
    # Only this shard's slice of the plan, the prompts and the store: its memory is bounded by the shard size.
    hashes = {h for batch in lake.read_batches(PLAN, day, ["prompt_hash"], cfg.lake.batch_rows,
                                               where={"shard_id": shard_id})
              for h in batch.column("prompt_hash").to_pylist()}
    if not hashes:
        raise ValueError(f"shard {shard_id} is not in the plan of dt={_day(day)} (shards: "
                         f"{[s['shard_id'] for s in plan['shards']]})")
    prompts, _ = extraction_prompts(cfg, day, lake, among=hashes)

    # Resume: skip what the store or this shard's checkpoints already hold.
    checkpoint_dir = _inflight_dir(lake, day, shard_id)
    checkpoints = _read_checkpoints(lake, checkpoint_dir)
    checkpoints = checkpoints[checkpoints["prompt_hash"].isin(hashes)
                              & (checkpoints["model_id"] == model_id) & (checkpoints["sampling_version"] == sv)]
    known = known_prompt_hashes(lake, model_id, sv, among=hashes)
    done = known | set(checkpoints["prompt_hash"])
    todo = prompts[~prompts["prompt_hash"].isin(done)].reset_index(drop=True)
    # Answers an earlier attempt of this shard paid for count as its calls and tokens, not as cache hits.
    resumed = checkpoints[~checkpoints["prompt_hash"].isin(known)].drop_duplicates("prompt_hash")
    cache_hits = len(prompts) - len(todo) - len(resumed)

    failures: list[dict] = []
    truncated: set[str] = set()
    calls = prompt_tokens = completion_tokens = n_errors = 0
    n_answered = len(resumed)
    generate_seconds = 0.0
    if len(todo):
        backend = backend or _make_backend(cfg, shard_id)
        texts = todo["text"].astype(str).tolist()
        limit = backend.max_prompt_tokens
        lengths = backend.count_prompt_tokens(texts)
        over = [n > limit for n in lengths]
        if any(over):
            over_rows = todo[over]
            reasons = [f"prompt has {n} tokens, limit {limit} (max_model_len - max_tokens)" for n in lengths if n > limit]
            if cfg.llm.over_long_policy == "skip":
                failures += _failure_rows(cfg, over_rows, shard_id, "skipped", reasons)
                todo = todo[[not o for o in over]].reset_index(drop=True)
                texts = todo["text"].astype(str).tolist()
                lengths = [n for n, o in zip(lengths, over) if not o]
            else:
                failures += _failure_rows(cfg, over_rows, shard_id, "truncated", reasons)
                truncated = set(over_rows["prompt_hash"])
                texts = [backend.truncate_prompt(t, limit) if o else t for t, o in zip(texts, over)]
                lengths = [min(n, limit) for n in lengths]
        order = order_by_length(lengths)
        todo = todo.iloc[order].reset_index(drop=True)
        texts = [texts[i] for i in order]
        batch = max(1, cfg.llm.engine.batch_size)
        created = _day(day)
        # More failures than the shard may have: it cannot succeed (a dead or hung server), so stop now
        # rather than wait out every remaining batch's timeouts; its answered batches stay checkpointed.
        failure_budget = cfg.llm.max_failure_rate * len(todo)
        for start in tqdm(range(0, len(todo), batch), desc=f"llm shard {shard_id}", unit="batch"):
            rows = todo.iloc[start:start + batch]
            requests = [GenerationRequest(h, t) for h, t in zip(rows["prompt_hash"], texts[start:start + batch])]
            t0 = time.perf_counter()
            results = backend.generate(requests)
            generate_seconds += time.perf_counter() - t0
            calls += len(requests)
            answers, errors, error_reasons = [], [], []
            for row, res in zip(rows.itertuples(index=False), results):
                prompt_tokens += res.prompt_tokens
                completion_tokens += res.completion_tokens
                if res.finish_reason == "error" or not res.text.strip():
                    errors.append(row)
                    error_reasons.append(res.error or "empty answer")
                    continue
                answers.append({"prompt_hash": res.request_id, "model_id": model_id, "sampling_version": sv,
                                "text": res.text, "prompt_tokens": res.prompt_tokens,
                                "completion_tokens": res.completion_tokens, "finish_reason": res.finish_reason,
                                "created_dt": created, "truncated_prompt": res.request_id in truncated})
            if errors:
                failures += _failure_rows(cfg, pd.DataFrame(errors), shard_id, "error", error_reasons)
                n_errors += len(errors)
            if answers:
                n_answered += len(answers)
                write_parquet_atomically(lake, f"{INFLIGHT}/dt={_day(day)}/shard-{shard_id:05d}/"
                                         f"batch-{start:07d}-{uuid.uuid4().hex[:8]}.parquet", store_table(answers))
            if n_errors > failure_budget:
                break

    failures_path = f"{FAILURES}/dt={_day(day)}/shard-{shard_id:05d}.parquet"
    if failures:
        write_parquet_atomically(lake, failures_path, _failures_table(failures))
    elif lake.fs.exists(f"{lake.root}/{failures_path}"):
        lake.fs.rm(f"{lake.root}/{failures_path}")  # an earlier attempt's failures were answered now
    n_skipped = sum(f["action"] == "skipped" for f in failures)
    failure_rate = n_errors / calls if calls else 0.0
    wall = time.perf_counter() - started
    payload = {
        "shard_id": shard_id, "plan_id": plan["plan_id"], "model_id": model_id, "sampling_version": sv,
        "backend": cfg.llm.backend, "n_prompts": len(prompts), "cache_hits": cache_hits,
        "calls": calls + len(resumed), "resumed_from_earlier_attempt": len(resumed), "answered": n_answered,
        "failed": n_errors, "skipped": n_skipped, "truncated": len(truncated), "failure_rate": round(failure_rate, 4),
        "prompt_tokens": prompt_tokens + _token_sum(resumed, "prompt_tokens"),
        "completion_tokens": completion_tokens + _token_sum(resumed, "completion_tokens"),
        "generate_seconds": round(generate_seconds, 3), "wall_seconds": round(wall, 3),
        "tokens_per_s": round(completion_tokens / generate_seconds, 2) if generate_seconds else 0.0,
        "is_smoke_model": cfg.llm.is_smoke_model,
    }
    if failure_rate > cfg.llm.max_failure_rate:
        payload["success"] = False
        record_step(lake, day, f"{SHARD_STEP_PREFIX}{shard_id:05d}", payload)
        # Checkpoints stay: a retry of this shard resumes after the answered batches.
        first = next((f["reason"] for f in failures if f["action"] == "error"), "")
        stopped = (f" (stopped after {calls} of {len(todo)}: it could no longer succeed)" if calls < len(todo) else "")
        raise ShardFailedError(
            f"shard {shard_id} of dt={_day(day)}: {n_errors} of {calls} prompts failed{stopped} ({failure_rate:.1%} > "
            f"llm.max_failure_rate {cfg.llm.max_failure_rate:.1%}); first reason: {first}; all reasons in "
            f"{lake.uri_of(f'{lake.root}/{failures_path}')}; answered batches are kept and a retry resumes after them")

    finished = _read_checkpoints(lake, checkpoint_dir)
    finished = finished[finished["prompt_hash"].isin(hashes)]
    if len(finished):
        write_store_shard(lake, model_id, sv, f"dt={_day(day)}-plan-{plan['plan_id']}-shard-{shard_id:05d}", finished)
    if lake.fs.exists(checkpoint_dir):
        lake.fs.rm(checkpoint_dir, recursive=True)  # after the store file: a crash here only duplicates rows
    payload["success"] = True
    payload["stored"] = len(finished)
    record_step(lake, day, f"{SHARD_STEP_PREFIX}{shard_id:05d}", payload)
    return payload


def _token_sum(answers: pd.DataFrame, column: str) -> int:
    return int(pd.to_numeric(answers[column]).fillna(0).sum())


def _failures_table(rows: list[dict]):
    import pyarrow as pa

    df = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    df["shard_id"] = df["shard_id"].astype("int64")
    return pa.Table.from_pandas(df, preserve_index=False)


def _make_backend(cfg: Config, shard_id: int = 0):
    from reki_core.llm.backends import make_backend

    return make_backend(cfg, shard_id)


def run_shard_in_process_or_venv(cfg: Config, day: str | dt.date, shard_id: int) -> dict[str, Any]:
    """What a mapped DAG task calls: in-process, or with `llm.engine.python` (the GPU venv) when it is set."""
    import json
    import os

    from reki_core.config import PROJECT_ROOT

    python = cfg.llm.engine.python
    if not python:
        return run_shard(cfg, day, shard_id)
    cmd = [python, "-m", "reki_core.llm.extract_shard", "--config", str(cfg.source_file), "--dt", _day(day),
           "--shard", str(shard_id)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    stdout = run_child(cmd, PROJECT_ROOT, env, f"extraction shard {shard_id} in {python}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_child(cmd: list[str], cwd, env: dict[str, str], what: str) -> str:
    """Run `cmd` in a process group of its own and return its stdout; its stderr (progress, engine logs) goes
    on to this task's log line by line, as it comes.

    vLLM starts engine processes of its own, and one left behind would keep holding the GPU's memory, so
    the whole group is killed however the task ends: when the run ends or raises (Airflow's
    execution_timeout), when the task is told to stop (SIGTERM or SIGINT, which Airflow sends first when a
    task is killed from the UI; the handlers before ours run next), and, for the child itself, when the
    task dies outright (SIGKILL, the OOM killer: the child gets SIGKILL from the kernel).
    """
    import collections
    import os
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True, preexec_fn=_die_with_parent)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    stdout: list[str] = []

    def kill_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child, if still running, and anything it started
        except ProcessLookupError:
            pass  # the group is gone: nothing left behind

    def forward_stderr() -> None:
        for line in proc.stderr:  # read to the end whatever happens: a full pipe would stall the child
            tail.append(line)
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    readers = [threading.Thread(target=forward_stderr, daemon=True),
               threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)]
    for reader in readers:
        reader.start()
    previous = {}

    def on_stop(signum, frame):
        kill_group()
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():  # Python takes signals in the main thread only
        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        kill_group()
        proc.wait()
    for reader in readers:  # the pipes close once the group is gone; what was written before is still read
        reader.join(timeout=30)
    if code != 0:
        raise RuntimeError(f"{what} failed (exit {code}):\n{''.join(tail)[-4000:]}")
    if not stdout or not stdout[0].strip():
        raise RuntimeError(f"{what} exited 0 but wrote no result on stdout:\n{''.join(tail)[-4000:]}")
    return stdout[0]


def _die_with_parent() -> None:
    """In the child, before it runs: the kernel sends it SIGKILL when the task that started it dies (Linux)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# ---------------------------------------------------------------- assignment


def assign_knowledge(cfg: Config, day: str | dt.date, spark=None) -> dict[str, Any]:
    """Write `knowledge/assigned/dt=D/` with the Spark job `spark_jobs/knowledge.py` (the DAG runs it as the Spark
    Connect task `assign_knowledge`), for callers outside the DAG (the in-process pipeline driver, the benchmarks):
    on `spark`, else the active session, else a classic session of its own, stopped after. Records step
    `llm_assign` and returns its payload."""
    from reki_core.spark import session_or_own
    from spark_jobs.common import jobs_named, run_jobs

    with session_or_own(cfg, spark, "reki-assign-knowledge") as session:
        [payload] = run_jobs(session, jobs_named(["knowledge"]), cfg, lake_of(cfg), as_date(day)).values()
    return payload


# ---------------------------------------------------------------- summary


def extraction_summary(cfg: Config, day: str | dt.date) -> dict[str, Any]:
    """Totals of the day's extraction (plan, shards, failures, answers gate); recorded as step `llm_extraction`."""
    lake = lake_of(cfg)
    plan = read_plan(cfg, day)
    steps = {s["step"]: s for s in read_steps(lake, day)}
    shard_ids = {s["shard_id"] for s in plan["shards"]}
    shards = [s for name, s in steps.items() if name.startswith(SHARD_STEP_PREFIX)
              and s.get("plan_id") == plan["plan_id"] and s.get("shard_id") in shard_ids]
    total = lambda key: sum(s.get(key, 0) for s in shards)  # noqa: E731
    generate_seconds = total("generate_seconds")
    failures = (lake.read_partition(FAILURES, day) if lake.has_partition(FAILURES, day)
                else pd.DataFrame(columns=FAILURE_COLUMNS))
    gate = steps.get("llm_answers_gate", {})
    summary = {
        "dt": _day(day), "mode": plan["mode"], "model_id": plan["model_id"], "sampling_version": plan["sampling_version"],
        "backend": cfg.llm.backend, "is_smoke_model": cfg.llm.is_smoke_model,
        "prompts": plan["n_prompts"], "pending": plan["n_pending"],
        "cache_hits": plan["cache_hits"] + total("cache_hits"),
        "shards_planned": len(plan["shards"]), "shards_finished": sum(bool(s.get("success")) for s in shards),
        "calls": total("calls"), "answered": total("answered"), "failed": total("failed"),
        "skipped": total("skipped"), "truncated": total("truncated"),
        "prompt_tokens": total("prompt_tokens"), "completion_tokens": total("completion_tokens"),
        "tokens_per_s": round(total("completion_tokens") / generate_seconds, 2) if generate_seconds else 0.0,
        "generate_seconds": round(generate_seconds, 3), "wall_seconds": round(total("wall_seconds"), 3),
        "failures_recorded": len(failures),
        "gate_success": gate.get("success"), "gate_failed": gate.get("failed", []),
        "gate_warnings": gate.get("warnings", []),
    }
    if cfg.llm.is_smoke_model:
        summary["note"] = ("answers come from the embedded smoke model: the text is meaningless "
                           "(configure a real instruct model for real knowledge)")
    record_step(lake, day, "llm_extraction", summary)
    return summary
