"""LLM knowledge extraction of one MovieLens-100K day on a CUDA GPU vs the CPU -> bench/results/llm_gpu.json.

Two phases, because the GPU machine has no Java (no Spark) and this machine has no GPU:

- `prepare --lake DIR`: landing, feature jobs and prompts of `run_date` into DIR (needs Spark);
- `extract --lake DIR`: on the GPU machine, the whole extraction of that day (plan_shards, every
  shard through `run_shard` with one shared backend, assign_knowledge, extraction_summary) on
  `cuda`, then the same shard of prompts on `cuda` and on `cpu` for completion tokens per second.

The model is the embedded smoke model (2 layers, random weights): the figures show the GPU path
works end to end and what batching buys on it, not what a real 7B model would do.

Usage: python bench/llm_gpu.py prepare --lake .devlake
       python bench/llm_gpu.py extract --lake .devlake [--max-tokens 32] [--out bench/results/llm_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reki_core.config import Config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "llm_gpu.json"


def _config(lake_dir: Path, device: str, max_tokens: int) -> Config:
    from llm_extraction import _config as extraction_config  # bench/ is on sys.path when run as a script

    return extraction_config(lake_dir, "individual", max_tokens, device)


def prepare(lake_dir: Path) -> dict:
    from llm_extraction import prepare_day  # bench/ is on sys.path when run as a script

    from reki_core.spark import get_spark

    shutil.rmtree(lake_dir, ignore_errors=True)
    cfg = _config(lake_dir, "cpu", 16)
    spark = get_spark(cfg, "bench-llm-gpu-prepare")
    try:
        return prepare_day(cfg, cfg.run_date, spark)
    finally:
        spark.stop()


def extract(lake_dir: Path, max_tokens: int) -> dict:
    import torch
    from llm_extraction import extract_day

    from reki_core.llm.backends import GenerationRequest, make_backend, measure_tokens_per_s
    from reki_core.llm.runner import extraction_prompts, order_by_length

    if not torch.cuda.is_available():
        raise SystemExit("extract needs a CUDA GPU (torch.cuda.is_available() is False)")
    gpu_cfg = _config(lake_dir, "cuda", max_tokens)
    gpu = make_backend(gpu_cfg)
    start = time.perf_counter()
    summary = extract_day(gpu_cfg, gpu_cfg.run_date, gpu)
    extraction_s = time.perf_counter() - start

    prompts, _ = extraction_prompts(gpu_cfg, gpu_cfg.run_date)
    shard = [GenerationRequest(h, t) for h, t in
             zip(prompts["prompt_hash"][:gpu_cfg.llm.shard_size], prompts["text"][:gpu_cfg.llm.shard_size])]
    shard = [shard[i] for i in order_by_length(gpu.count_prompt_tokens([r.text for r in shard]))]
    cpu = make_backend(_config(lake_dir, "cpu", max_tokens))
    gpu_rate, cpu_rate = measure_tokens_per_s(gpu, shard)[0], measure_tokens_per_s(cpu, shard)[0]
    return {
        "device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
        "dt": gpu_cfg.run_date.isoformat(), "model_id": gpu_cfg.llm.engine.model_id,
        "is_smoke_model": gpu_cfg.llm.is_smoke_model, "max_tokens": max_tokens,
        "batch_size": gpu_cfg.llm.engine.batch_size,
        "extraction_calls": summary["calls"], "extraction_failed": summary["failed"],
        "extraction_s": round(extraction_s, 1),
        "extraction_summary": summary,
        "shard_prompts": len(shard), "cpu_threads": torch.get_num_threads(),
        "gpu_tokens_per_s": round(gpu_rate, 1), "cpu_tokens_per_s": round(cpu_rate, 1),
        "gpu_over_cpu_throughput": round(gpu_rate / cpu_rate, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["prepare", "extract"])
    parser.add_argument("--lake", type=Path, required=True, help="folder holding the prepared day")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.phase == "prepare":
        print(json.dumps(prepare(args.lake.resolve()), indent=2, default=str))
        return 0
    result = extract(args.lake.resolve(), args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
