"""Benchmark of LLM serving: engine per shard (today's path before the warm server) vs shards as clients of
the warm server -> bench/results/llm_serving.json.

The same fixed prompts (the first `--prompts` MovieLens-100K item prompts, rendered by the scenario's item
template: at least 500) are written as one day's prompts partition and cut into shards as the DAG cuts them
(`plan_shards`: llm.shard_size; each shard answered in batches of llm.engine.batch_size). Each arm has its own
lake (its own answer key); all run the real model (llm.engine.model_path) with greedy decoding:

- `engine_per_shard`: the transformers backend in a fresh process per shard (`llm.engine.python`: the DAG's
  `run_shard_in_process_or_venv` -> `python -m reki_core.llm.extract_shard`), one shard at a time, as the
  `gpu` pool with one slot ran them. Per shard: process wall = load (interpreter, imports, weights) + generate.
- for each server program of `--servers` (`servers.<program>` in the JSON; the first names `server_speedup`):
  llama.cpp's `llama-server` of the GGUF (the stack's default) and `transformers serve --continuous-batching`
  of the safetensors, each started once (`reki_core.localstack.LLMServer`; timed apart, not in the arms), then
  - `one_shard_at_a_time`: shards as its clients one after another;
  - `concurrent_shards`: every shard a concurrent client (`llm.max_active_shards`).

`server_speedup` = engine_per_shard wall / server_concurrent_shards wall, and its exact factorisation:
  load  = engine_per_shard wall / its generate time        (what loading an engine per shard costs)
  engine = engine_per_shard generate time / server one-shard-at-a-time wall   (the server's engine and batching)
  across_shards = server one-at-a-time wall / server concurrent wall          (batching requests of several shards)
Memory bandwidth: a numpy copy of a 512 MiB array (read + write) gives this machine's bytes/s; a decode step
reads every weight once, so one sequence is bounded by bandwidth / weight bytes steps/s, a batch of B by B x
that in tokens/s; the JSON shows the arithmetic. The 8B-on-one-GPU extrapolation uses published figures (cited).

Usage: python bench/llm_serving.py [--prompts 512] [--max-tokens 48] [--servers llama.cpp,transformers]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reki_core.config import PROJECT_ROOT, Config, load_config  # noqa: E402
from reki_core.storage.lake import lake_of  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "llm_serving.json"
DAY = dt.date(1998, 3, 31)


def arm_environment(root: Path, max_tokens: int, **extra: str) -> dict[str, str]:
    """REKI__ overrides of one arm (its own lake and state), on top of conf/reki.yaml's real model."""
    return {"REKI__PATHS__STATE_DIR": str(root / "state"), "REKI__PATHS__LAKE_URI": str(root / "lake"),
            "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
            "REKI__LAKE__TABLES_IN_STORE": "false",  # a scratch folder lake, tables included
            "REKI__LLM__SAMPLING__MAX_TOKENS": str(max_tokens), "REKI__LLM__IS_SMOKE_MODEL": "false", **extra}


def config_of(env: dict[str, str]) -> Config:
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=env)


def write_item_prompts(cfg: Config, n: int) -> int:
    """The first `n` ML-100K items (by id) as item prompts of DAY, in the prompts partition's contract."""
    import pandas as pd

    from reki_core.datasets import movielens
    from reki_core.prompts import prompt_hash, render_item

    _, _, items = movielens.load(movielens.obtain(cfg.data_dir))
    items = items.assign(order=pd.to_numeric(items["item_id"])).sort_values("order").head(n)
    texts = [render_item(cfg, t, y) for t, y in zip(items["title"], items["year"])]
    v = cfg.scenario.template_version
    frame = pd.DataFrame({"prompt_id": [f"item:{i}" for i in items["item_id"]], "entity_kind": "item",
                          "entity_id": items["item_id"].astype(str).tolist(), "text": texts,
                          "history_text": "", "prompt_hash": [prompt_hash(v, t) for t in texts],
                          "template_version": v, "as_of": 0, "ask_llm": True})
    lake_of(cfg).write_partition(frame, "prompts", DAY)
    return frame["prompt_hash"].nunique()


def shard_totals(results: list[dict]) -> dict:
    tokens = sum(r["completion_tokens"] for r in results)
    return {"shards": len(results), "answered": sum(r["answered"] for r in results),
            "failed": sum(r["failed"] for r in results), "completion_tokens": tokens,
            "prompt_tokens": sum(r["prompt_tokens"] for r in results)}


def finish_reasons(cfg: Config) -> dict:
    from reki_core.llm.store import read_answers, sampling_version

    answers = read_answers(lake_of(cfg), cfg.llm.engine.model_id, sampling_version(cfg))
    counts = answers["finish_reason"].value_counts().to_dict()
    return {k: int(v) for k, v in counts.items()} | {"stop_share": round(counts.get("stop", 0) / max(1, len(answers)), 3)}


def engine_per_shard(root: Path, n: int, max_tokens: int) -> dict:
    """Today's path: one fresh process per shard (transformers backend), one shard at a time."""
    from reki_core.llm.runner import plan_shards, run_shard_in_process_or_venv

    env = arm_environment(root, max_tokens, REKI__LLM__BACKEND="transformers", REKI__LLM__ENGINE__PYTHON=sys.executable)
    os.environ.update(env)  # the shard processes load their config from the environment, as a DAG task's do
    cfg = config_of(env)
    write_item_prompts(cfg, n)
    shards = plan_shards(cfg, DAY)
    started = time.perf_counter()
    per_shard = []
    for s in shards:
        t = time.perf_counter()
        result = run_shard_in_process_or_venv(cfg, DAY, s["shard_id"])
        wall = time.perf_counter() - t
        per_shard.append({"shard_id": s["shard_id"], "prompts": s["n_prompts"], "process_wall_s": round(wall, 2),
                          "generate_s": result["generate_seconds"],
                          "load_s": round(wall - result["generate_seconds"], 2), "_result": result})
    wall = time.perf_counter() - started
    results = [p.pop("_result") for p in per_shard]
    generate = sum(p["generate_s"] for p in per_shard)
    for key in env:
        os.environ.pop(key, None)
    return {"wall_s": round(wall, 2), "generate_s": round(generate, 2), "load_s": round(wall - generate, 2),
            "per_shard": per_shard, **shard_totals(results),
            "tokens_per_s": round(shard_totals(results)["completion_tokens"] / wall, 2),
            "finish_reasons": finish_reasons(cfg)}


def server_arm(root: Path, n: int, max_tokens: int, url: str, concurrent: bool, program: str) -> dict:
    """Shards as clients of the warm server: one after another, or all at once (threads, as parallel tasks)."""
    from reki_core.llm.runner import plan_shards, run_shard

    cfg = config_of(arm_environment(root, max_tokens, REKI__LLM__BACKEND="openai", REKI__LLM__SERVER__PROGRAM=program,
                                    REKI__LLM__ENGINE__BASE_URLS=f"[{url}]"))
    write_item_prompts(cfg, n)
    shards = plan_shards(cfg, DAY)
    results: dict[int, dict] = {}
    started = time.perf_counter()
    if concurrent:
        def one(shard_id: int) -> None:
            results[shard_id] = run_shard(cfg, DAY, shard_id)

        threads = [threading.Thread(target=one, args=(s["shard_id"],)) for s in shards]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for s in shards:
            results[s["shard_id"]] = run_shard(cfg, DAY, s["shard_id"])
    wall = time.perf_counter() - started
    totals = shard_totals(list(results.values()))
    if totals["shards"] != len(shards):
        raise RuntimeError(f"only {totals['shards']} of {len(shards)} shards finished")
    return {"wall_s": round(wall, 2), **totals, "tokens_per_s": round(totals["completion_tokens"] / wall, 2),
            "requests_in_flight": cfg.llm.engine.max_concurrency * (len(shards) if concurrent else 1),
            "finish_reasons": finish_reasons(cfg)}


def memory_bandwidth_bytes_per_s() -> dict:
    """Best of 5 copies of a 512 MiB float32 array: bytes read + written per second."""
    import numpy as np

    src = np.ones(128 * 1024 * 1024, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    moved = 2 * src.nbytes
    return {"method": "numpy copyto of 512 MiB float32, best of 5, read + write", "bytes_moved": moved,
            "seconds": round(best, 4), "bytes_per_s": round(moved / best)}


def weights_served(cfg: Config, program: str) -> dict:
    """Parameters and the bytes a decode step reads: the GGUF llama.cpp serves (Q4_0 here, re-quantised at
    set-up) or the safetensors dequantised to llm.engine.dtype (transformers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from reki_core.llm.instruct_model import gguf_path

    folder = cfg.resolve(cfg.llm.engine.model_path)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # counts parameters without allocating them
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if program == "llama.cpp":
        gguf = gguf_path(folder)
        return {"model_type": config.model_type, "parameters": params, "form": f"GGUF {gguf.name}",
                "weight_bytes": gguf.stat().st_size}
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.llm.engine.dtype]
    return {"model_type": config.model_type, "parameters": params, "form": cfg.llm.engine.dtype,
            "weight_bytes": params * size}


def bandwidth_bound(weights: dict, bandwidth: float, batch: int, measured_tokens_per_s: float) -> dict:
    """Tokens/s that weight traffic alone allows at `batch` sequences per decode step, and the measured share."""
    weight_bytes = weights["weight_bytes"]
    steps_per_s = bandwidth / weight_bytes
    bound = steps_per_s * batch
    return {
        **weights, "bandwidth_bytes_per_s": bandwidth,
        "decode_steps_per_s_bound": round(steps_per_s, 2),
        "arithmetic": f"{bandwidth:.3g} B/s / {weight_bytes:.3g} B = {steps_per_s:.1f} decode steps/s (each reads every "
                      f"weight once); x {batch} sequences per step = {bound:.0f} tokens/s at most",
        "batch": batch, "tokens_per_s_bound": round(bound, 1), "measured_tokens_per_s": measured_tokens_per_s,
        "share_of_bound": round(measured_tokens_per_s / bound, 4),
        "note": "a bound for weight traffic alone; KV-cache reads and CPU compute (2 cores) come on top",
    }


def extrapolate_8b(n_shards: int, prompts: int, max_tokens: int) -> dict:
    """The same breakdown for an 8B model on one GPU, from published figures (not run here)."""
    weight_bytes = 16.06e9  # Llama-3.1-8B in bf16: 8.03B parameters x 2 bytes
    hbm = 3.35e12  # H100 SXM HBM3 (NVIDIA's H100 datasheet; 3.0 TB/s is quoted for some SKUs)
    load_s = 60.0  # assumed per engine: 16 GB read at ~1 GB/s from network or NVMe storage + CUDA graphs/warm-up
    # Published: one Llama-3.1-8B stream on an A100 40GB ~75 tokens/s (77% of its roofline), batching gains 6.6x at
    # 8 concurrent requests (johnmusgrave.com, vLLM 0.23); vLLM 0.6 on one H100: 2.7x the throughput of 0.5 on 8B.
    single_stream = 0.77 * hbm / weight_bytes
    concurrent_tokens_per_s = single_stream * 6.6  # 8 in flight (more would gain more: a conservative figure)
    tokens = prompts * max_tokens
    generate_s = tokens / concurrent_tokens_per_s
    per_shard_wall = n_shards * (load_s + generate_s / n_shards)
    return {
        "model": "Llama-3.1-8B-Instruct bf16 on one H100 SXM (not run: vLLM cannot be installed here)",
        "weight_bytes": weight_bytes, "hbm_bytes_per_s": hbm,
        "single_stream_tokens_per_s": round(single_stream, 1),
        "arithmetic": f"0.77 x {hbm:.3g} / {weight_bytes:.3g} = {single_stream:.0f} tokens/s per stream; x 6.6 (8 in "
                      f"flight) = {concurrent_tokens_per_s:.0f} tokens/s",
        "assumed_load_s_per_engine": load_s,
        "this_benchmark": {"prompts": prompts, "max_tokens": max_tokens, "shards": n_shards,
                           "generate_s": round(generate_s, 1),
                           "engine_per_shard_wall_s": round(per_shard_wall, 1),
                           "warm_server_wall_s": round(generate_s, 1),
                           "load_share_of_engine_per_shard": round(n_shards * load_s / per_shard_wall, 3),
                           "server_speedup": round(per_shard_wall / generate_s, 1)},
        "sources": [
            "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on (Llama-3.1-8B, A100 40GB, vLLM 0.23: 75 tok/s "
            "at 1 request, 77% of the bandwidth roofline, 6.6x at 8 concurrent)",
            "https://wk.788897.xyz/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md (Lambda: vLLM on H100 vs A100, "
            "H100 about 2x A100 throughput)",
            "https://roastidio.us/links_from/15447269 (vLLM blog v0.6.0: 2.7x throughput on Llama 8B, one H100)",
            "NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s",
        ],
        "at_scale": "a real day is ~2,500 prompts in ~10 shards: with a 60 s load per engine the load is ~600 s of "
                    "engine-per-shard time against seconds of generation per shard on a GPU: the load dominates",
    }


def server_arms(root: Path, program: str, prompts: int, max_tokens: int) -> dict:
    """One warm server (`llm.server.program` = program), started once (timed apart), then both client arms."""
    from reki_core.localstack import LLMServer, free_port_block

    cfg = config_of(arm_environment(root / "server", max_tokens, REKI__LLM__SERVER__PROGRAM=program))
    server = LLMServer(cfg, port=free_port_block(1))
    t = time.perf_counter()
    server.start()
    start_s = time.perf_counter() - t
    try:
        print(f"==> {program} server, shards one at a time", flush=True)
        sequential = server_arm(root / "sequential", prompts, max_tokens, server.url, False, program)
        print(json.dumps({"wall_s": sequential["wall_s"]}), flush=True)
        print(f"==> {program} server, shards concurrent", flush=True)
        concurrent = server_arm(root / "concurrent", prompts, max_tokens, server.url, True, program)
        print(json.dumps({"wall_s": concurrent["wall_s"]}), flush=True)
    finally:
        server.stop()
    return {"program": program, "command": server.command()[1:], "environment": server.settings_environment(),
            "start_s_once": round(start_s, 2),
            "one_shard_at_a_time": sequential, "concurrent_shards": concurrent, "_cfg": cfg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--servers", default="llama.cpp,transformers",
                        help="server programs to measure; the first is the one server_speedup names")
    args = parser.parse_args(argv)
    if args.prompts < 500:
        parser.error("--prompts: the benchmark compares at least 500 prompts")
    programs = args.servers.split(",")

    started = time.perf_counter()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reki-llm-serving-") as tmp:
        tmp = Path(tmp)
        print("==> engine per shard (fresh process each, one at a time)", flush=True)
        baseline = engine_per_shard(tmp / "engine-per-shard", args.prompts, args.max_tokens)
        print(json.dumps({k: baseline[k] for k in ("wall_s", "generate_s", "load_s")}), flush=True)
        servers = {p: server_arms(tmp / p, p, args.prompts, args.max_tokens) for p in programs}
    bandwidth = memory_bandwidth_bytes_per_s()
    engine_tokens_per_s = round(baseline["completion_tokens"] / baseline["generate_s"], 2)
    configs = {program: arm.pop("_cfg") for program, arm in servers.items()}
    cfg = configs[programs[0]]  # the named server's settings for the payload below
    for program, arm in servers.items():
        sequential, concurrent = arm["one_shard_at_a_time"], arm["concurrent_shards"]
        arm["server_speedup"] = round(baseline["wall_s"] / concurrent["wall_s"], 3)
        arm["breakdown"] = {
            "load": round(baseline["wall_s"] / baseline["generate_s"], 3),
            "engine": round(baseline["generate_s"] / sequential["wall_s"], 3),
            "across_shards": round(sequential["wall_s"] / concurrent["wall_s"], 3),
            "product": "load x engine x across_shards = server_speedup",
        }
        arm["bandwidth_bound"] = bandwidth_bound(weights_served(configs[program], program), bandwidth["bytes_per_s"],
                                                 min(concurrent["requests_in_flight"],
                                                     cfg.llm.server.parallel if program == "llama.cpp" else 10**9),
                                                 concurrent["tokens_per_s"])
    chosen = servers[programs[0]]
    payload = {
        "benchmark": "llm_serving", "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_id": cfg.llm.engine.model_id, "is_smoke_model": False, "device": "cpu",
        "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
        "prompts": args.prompts, "prompt_kind": "item (scenario item template, ML-100K items by id)",
        "shard_size": cfg.llm.shard_size, "batch_size": cfg.llm.engine.batch_size,
        "max_concurrency_per_shard": cfg.llm.engine.max_concurrency, "max_tokens": args.max_tokens,
        "max_tokens_why": "chosen so every arm fits about 25 minutes on 2 CPU cores",
        "engine_per_shard": baseline,
        "server_program": programs[0],
        "server_speedup": chosen["server_speedup"], "server_speedup_target": 1.5,
        "breakdown": chosen["breakdown"],
        "servers": servers,
        "memory_bandwidth": bandwidth,
        "bandwidth_bound_engine_per_shard": bandwidth_bound(weights_served(cfg, "transformers"), bandwidth["bytes_per_s"],
                                                            cfg.llm.engine.batch_size, engine_tokens_per_s),
        "extrapolated_8b_one_gpu": extrapolate_8b(len(baseline["per_shard"]), args.prompts, args.max_tokens),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"server_speedup": {p: a["server_speedup"] for p, a in servers.items()},
                      "breakdown": {p: a["breakdown"] for p, a in servers.items()},
                      "total_seconds": payload["total_seconds"]}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
