"""Benchmark of LLM knowledge extraction on MovieLens-100K -> bench/results/llm_extraction.json.

Measured in one run, each on a fresh lake under a temporary folder, with the embedded smoke model
(its text is meaningless; calls and tokens are what this measures):

- full build of `run_date` (D, on an empty lake: all history up to D) in individual mode vs collective
  mode: LLM calls and tokens;
- D run again from landing (a re-run): calls (must be 0, everything is in the knowledge store);
- D+1, the first incremental day after the full build (individual): calls as a share of the full
  build's calls, and what made them (new users, users whose knowledge window advanced, new items);
- the `transformers` backend on one shard's worth of D's prompts: batched (llm.engine.batch_size, in
  the length order `run_shard` uses) vs one prompt at a time, ratio of completion tokens per second;
  also batched in plain prompt-hash order (mixed lengths), to show what the length order buys.

Each day goes through the functions the DAG's tasks call (landing, the Spark jobs' `run`, prompts,
plan_shards, run_shard, assign_knowledge, extraction_summary); gates and ctr_samples are left out
because they do not change what is sent to the LLM.

Usage: python bench/llm_extraction.py [--max-tokens 16] [--throughput-prompts N (default llm.shard_size)]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reki_core.config import PROJECT_ROOT, Config, load_config  # noqa: E402
from reki_core.storage.lake import lake_of  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "llm_extraction.json"


def _config(lake_dir: Path, mode: str, max_tokens: int, device: str | None = None) -> Config:
    """The benchmark's config on its own lake; `device` overrides llm.engine.device."""
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={
        **({"REKI__LLM__ENGINE__DEVICE": device} if device else {}),
        "REKI__PATHS__STATE_DIR": str(lake_dir / "state"),
        "REKI__PATHS__LAKE_URI": str(lake_dir / "lake"),
        "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
        "REKI__LAKE__TABLES_IN_STORE": "false",  # a scratch folder lake, tables included
        "REKI__SCENARIO_OVERRIDES": f"{{extraction_mode: {mode}}}",
        "REKI__LLM__SAMPLING__MAX_TOKENS": str(max_tokens),
    })


def prepare_day(cfg: Config, day: dt.date, spark) -> dict:
    """Landing, feature jobs and prompts of `day`: the inputs of extraction (other stages' public functions)."""
    from reki_core.landing import land
    from reki_core.prompts import build_prompts
    from spark_jobs import clusters, items, user_history

    lake = lake_of(cfg)
    land(cfg, day, spark)
    items.run(spark, cfg, lake, day)
    user_history.run(spark, cfg, lake, day)
    if cfg.scenario.extraction_mode == "collective":
        clusters.run(spark, cfg, lake, day)
    return build_prompts(cfg, day, lake, spark)


def incremental_breakdown(cfg: Config, day: dt.date) -> dict:
    """Why the prompts planned for `day` were sent: new users, users whose window advanced, new or changed items."""
    from reki_core.llm.runner import PLAN, PROMPTS

    lake = lake_of(cfg)
    previous = lake.read_partition(PROMPTS, lake.latest_partition(PROMPTS, upto=day - dt.timedelta(days=1)))
    prompts = lake.read_partition(PROMPTS, day)
    sent = prompts[prompts["prompt_hash"].isin(lake.read_partition(PLAN, day)["prompt_hash"])]
    sent = sent.drop_duplicates("prompt_hash")
    known = {kind: set(previous.loc[previous["entity_kind"] == kind, "entity_id"].astype(str)) for kind in ("user", "item")}
    is_known = [str(e) in known.get(k, set()) for k, e in zip(sent["entity_kind"], sent["entity_id"])]
    by = sent.assign(known=is_known).groupby(["entity_kind", "known"]).size()
    interactions = lake.read_partition("raw/interactions", day)
    history = lake.read_partition("features/user_history", day)
    return {
        "interactions": len(interactions), "active_users": int(interactions["user_id"].nunique()),
        "users_needing_refresh": int(history["needs_refresh"].sum()),
        "calls_new_users": int(by.get(("user", False), 0)),
        "calls_users_window_advanced": int(by.get(("user", True), 0)),
        "calls_new_items": int(by.get(("item", False), 0)),
        "calls_changed_items": int(by.get(("item", True), 0)),
    }


def extract_day(cfg: Config, day: dt.date, backend) -> dict:
    """Plan, run every shard with one shared backend, assign: the extraction of one day."""
    from reki_core.llm.runner import assign_knowledge, extraction_summary, plan_shards, run_shard

    for shard in plan_shards(cfg, day):
        run_shard(cfg, day, shard["shard_id"], backend=backend)
    assign_knowledge(cfg, day)
    return extraction_summary(cfg, day)


def throughput_ratio(cfg: Config, backend, n_prompts: int) -> dict:
    """Completion tokens/s of the transformers backend batched vs one prompt at a time, same prompts."""
    import torch

    from reki_core.llm.backends import GenerationRequest
    from reki_core.llm.runner import extraction_prompts, order_by_length

    prompts, _ = extraction_prompts(cfg, cfg.run_date)
    # The first prompts in hash order: a shard's random mix of short item and long user prompts.
    mixed = [GenerationRequest(h, t) for h, t in zip(prompts["prompt_hash"][:n_prompts], prompts["text"][:n_prompts])]
    order = order_by_length(backend.count_prompt_tokens([r.text for r in mixed]))
    requests = [mixed[i] for i in order]  # as run_shard sends them

    def tokens_per_s(run) -> float:
        start = time.perf_counter()
        results = run()
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - start)

    backend.generate(requests[:2])  # warm-up
    batched = tokens_per_s(lambda: backend.generate(requests))
    batched_mixed = tokens_per_s(lambda: backend.generate(mixed))
    single = tokens_per_s(lambda: [backend.generate([r])[0] for r in requests])
    return {"prompts": len(requests), "batch_size": cfg.llm.engine.batch_size, "device": cfg.llm.engine.device,
            "torch_threads": torch.get_num_threads(),
            "batched_tokens_per_s": round(batched, 1), "single_tokens_per_s": round(single, 1),
            "batched_mixed_lengths_tokens_per_s": round(batched_mixed, 1),
            "batched_over_single_throughput": round(batched / single, 2),
            "batched_mixed_lengths_over_single_throughput": round(batched_mixed / single, 2)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from reki_core.llm.backends import make_backend
    from reki_core.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per call (smoke model)")
    parser.add_argument("--throughput-prompts", type=int, default=None, help="default: llm.shard_size (one shard)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    with tempfile.TemporaryDirectory(prefix="reki-bench-llm-") as tmp:
        individual = _config(Path(tmp) / "individual", "individual", args.max_tokens)
        collective = _config(Path(tmp) / "collective", "collective", args.max_tokens)
        day, next_day = individual.run_date, individual.run_date + dt.timedelta(days=1)
        spark = get_spark(individual, "bench-llm-extraction")
        backend = make_backend(individual)
        try:
            prepare_day(individual, day, spark)
            full = extract_day(individual, day, backend)
            throughput = throughput_ratio(individual, backend, args.throughput_prompts or individual.llm.shard_size)
            prepare_day(individual, day, spark)  # the same date again, from landing
            rerun = extract_day(individual, day, backend)
            prepare_day(individual, next_day, spark)
            incremental = extract_day(individual, next_day, backend)
            why_incremental = incremental_breakdown(individual, next_day)
            prepare_day(collective, day, spark)
            group = extract_day(collective, day, make_backend(collective))
        finally:
            spark.stop()

    result = {
        "calls_individual": full["calls"],
        "calls_collective": group["calls"],
        "collective_call_reduction": round(full["calls"] / group["calls"], 2) if group["calls"] else None,
        "tokens_individual": full["prompt_tokens"] + full["completion_tokens"],
        "tokens_collective": group["prompt_tokens"] + group["completion_tokens"],
        "incremental_call_share": round(incremental["calls"] / full["calls"], 4) if full["calls"] else None,
        "incremental_calls": incremental["calls"],
        "incremental_breakdown": why_incremental,
        "rerun_calls": rerun["calls"],
        "rerun_cache_hits": rerun["cache_hits"],
        "batched_over_single_throughput": throughput["batched_over_single_throughput"],
        "throughput": throughput,
        "dt": day.isoformat(), "next_dt": next_day.isoformat(),
        "model_id": individual.llm.engine.model_id, "is_smoke_model": individual.llm.is_smoke_model,
        "max_tokens": args.max_tokens,
        "prompt_tokens_individual": full["prompt_tokens"], "prompt_tokens_collective": group["prompt_tokens"],
        "generate_seconds_individual": full["generate_seconds"], "generate_seconds_collective": group["generate_seconds"],
        "note": ("smoke model (random weights): answers are meaningless; calls, tokens and throughput are the "
                 "measured quantities; completion tokens are capped by max_tokens, so token totals are mostly "
                 "prompt tokens"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
