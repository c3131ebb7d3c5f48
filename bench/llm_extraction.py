"""Benchmark of LLM knowledge extraction on MovieLens-100K -> bench/results/llm_extraction.json.

Measured in one run, each on a fresh lake under a temporary folder, with the embedded smoke model
(its text is meaningless; calls and tokens are what this measures):

- full build of `run_date` in individual mode vs collective mode: LLM calls and tokens;
- the day after the full build (individual): calls as a share of the full build's calls;
- the same day run again: calls (must be 0, everything is in the knowledge store);
- the `transformers` backend batched (llm.engine.batch_size) vs one prompt at a time, same prompts: ratio
  of completion tokens per second.

Usage: python bench/llm_extraction.py [--max-tokens 16] [--throughput-prompts 64]
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
from reki_core.storage.lake import Lake  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "llm_extraction.json"


def _config(lake_dir: Path, mode: str, max_tokens: int) -> Config:
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={
        "REKI__PATHS__STATE_DIR": str(lake_dir / "state"),
        "REKI__PATHS__LAKE_URI": str(lake_dir / "lake"),
        "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
        "REKI__SCENARIO_OVERRIDES": f"{{extraction_mode: {mode}}}",
        "REKI__LLM__SAMPLING__MAX_TOKENS": str(max_tokens),
    })


def prepare_day(cfg: Config, day: dt.date, spark) -> dict:
    """Landing, feature jobs and prompts of `day`: the inputs of extraction (other stages' public functions)."""
    from reki_core.landing import land
    from reki_core.prompts import build_prompts
    from spark_jobs import clusters, items, user_history

    lake = Lake(cfg.lake_uri)
    land(cfg, day)
    items.run(spark, cfg, lake, day)
    user_history.run(spark, cfg, lake, day)
    if cfg.scenario.extraction_mode == "collective":
        clusters.run(spark, cfg, lake, day)
    return build_prompts(cfg, day, lake)


def extract_day(cfg: Config, day: dt.date, backend) -> dict:
    """Plan, run every shard with one shared backend, assign: the extraction of one day."""
    from reki_core.llm.runner import assign_knowledge, extraction_summary, plan_shards, run_shard

    for shard in plan_shards(cfg, day):
        run_shard(cfg, day, shard["shard_id"], backend=backend)
    assign_knowledge(cfg, day)
    return extraction_summary(cfg, day)


def throughput_ratio(cfg: Config, backend, n_prompts: int) -> dict:
    """Completion tokens/s of the transformers backend batched vs one prompt at a time, same prompts."""
    from reki_core.llm.backends import GenerationRequest
    from reki_core.llm.runner import extraction_prompts

    prompts, _ = extraction_prompts(cfg, cfg.run_date)
    requests = [GenerationRequest(h, t) for h, t in zip(prompts["prompt_hash"][:n_prompts], prompts["text"][:n_prompts])]

    def tokens_per_s(run) -> float:
        start = time.perf_counter()
        results = run()
        return sum(r.completion_tokens for r in results) / (time.perf_counter() - start)

    backend.generate(requests[:2])  # warm-up
    batched = tokens_per_s(lambda: backend.generate(requests))
    single = tokens_per_s(lambda: [backend.generate([r])[0] for r in requests])
    return {"prompts": len(requests), "batch_size": cfg.llm.engine.batch_size,
            "batched_tokens_per_s": round(batched, 1), "single_tokens_per_s": round(single, 1),
            "batched_over_single_throughput": round(batched / single, 2)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from reki_core.llm.backends import make_backend
    from reki_core.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per call (smoke model)")
    parser.add_argument("--throughput-prompts", type=int, default=64)
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
            throughput = throughput_ratio(individual, backend, args.throughput_prompts)
            rerun = extract_day(individual, day, backend)
            prepare_day(individual, next_day, spark)
            incremental = extract_day(individual, next_day, backend)
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
        "rerun_calls": rerun["calls"],
        "batched_over_single_throughput": throughput["batched_over_single_throughput"],
        "throughput": throughput,
        "dt": day.isoformat(), "next_dt": next_day.isoformat(),
        "model_id": individual.llm.engine.model_id, "is_smoke_model": individual.llm.is_smoke_model,
        "max_tokens": args.max_tokens,
        "note": "smoke model: answers are meaningless; calls and tokens are the measured quantities",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
