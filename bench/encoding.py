"""Knowledge encoding: texts per second batched versus one at a time, and the next-day cache hit rate.

Self-contained: in a fresh lake under a temporary folder it runs the pipeline's own steps (landing, the
Spark feature jobs, prompts, LLM extraction with the configured backend, assignment) for two consecutive
days D and D+1 (--next-day, default run_date), then the daily encoding step `encode_knowledge` for D (which
fills the lake's embedding cache) and for D+1. Measured in that one run:

- next-day cache hit rate: the share of D+1's unique knowledge texts found in the cache D filled (the
  `cache_hits / unique_texts` that `encode_knowledge` records for D+1), plus how many D+1 entities kept
  the same text as on D (new and changed entities are what the cache cannot hold);
- throughput on up to --texts of D+1's texts, batched (encoding.batch_size) and one at a time (the
  first --single of them), with --threads torch threads.

The smoke LLM's answers are short and often identical across items, so identical texts of different
entities also hit the cache; `unchanged_entities` counts only entities whose own text is unchanged.

    .venv/bin/python bench/encoding.py [--next-day YYYY-MM-DD] [--texts 512] [--single 64] [--threads 1] [--max-tokens N]
writes bench/results/encoding.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from reki_core.config import PROJECT_ROOT, Config, load_config  # noqa: E402

# The same day-building steps the LLM extraction benchmark drives (one way to run them without Airflow).
from llm_extraction import extract_day, prepare_day  # noqa: E402


def bench_config(folder: Path, next_day: str | None, max_tokens: int | None) -> Config:
    """The project's config on a fresh lake in `folder` (ML-100K from the project's data cache)."""
    environ = {"REKI__PATHS__STATE_DIR": str(folder / "state"), "REKI__PATHS__LAKE_URI": str(folder / "lake"),
               "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
               "REKI__LAKE__TABLES_IN_STORE": "false"}  # a scratch folder lake, tables included
    if next_day:
        environ["REKI__RUN_DATE"] = next_day
    if max_tokens:
        environ["REKI__LLM__SAMPLING__MAX_TOKENS"] = str(max_tokens)
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=environ)


def build_two_days(cfg, day: dt.date, next_day: dt.date) -> dict:
    """Knowledge (`knowledge/assigned/`) of `day` and `next_day` in cfg's lake, through the pipeline's steps."""
    from reki_core.llm.backends import make_backend
    from reki_core.spark import get_spark

    spark = get_spark(cfg, "bench-encoding")
    backend = make_backend(cfg)
    extraction = {}
    try:
        for d in (day, next_day):
            start = time.perf_counter()
            prepare_day(cfg, d, spark)
            extraction[d.isoformat()] = {**extract_day(cfg, d, backend), "seconds": round(time.perf_counter() - start, 1)}
    finally:
        spark.stop()
    return extraction


def throughput(encoder, texts: list[str], n_single: int, batch_size: int) -> dict:
    """Texts per second encoding `texts` in batches, and the first `n_single` of them one at a time."""
    encoder.encode(texts[:8], batch_size=8, progress=False)  # warm-up
    start = time.perf_counter()
    encoder.encode(texts, batch_size=batch_size, progress=True)
    batched = len(texts) / (time.perf_counter() - start)
    single = texts[:n_single]
    start = time.perf_counter()
    for text in single:
        encoder.encode([text], batch_size=1, progress=False)
    one_at_a_time = len(single) / (time.perf_counter() - start)
    return {"texts": len(texts), "single_texts": len(single),
            "mean_chars": round(sum(map(len, texts)) / max(len(texts), 1), 1), "batch_size": batch_size,
            "texts_per_s_batched": round(batched, 2), "texts_per_s_single": round(one_at_a_time, 2),
            "batched_over_single": round(batched / one_at_a_time, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--next-day", default=None, help="D+1 (YYYY-MM-DD); default: run_date of the config")
    parser.add_argument("--texts", type=int, default=512, help="D+1 texts encoded batched")
    parser.add_argument("--single", type=int, default=64, help="of those, encoded one at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the throughput measurement")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="LLM answer tokens per call; default: llm.sampling.max_tokens of the config")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "encoding.json"))
    args = parser.parse_args(argv)

    import pandas as pd
    import torch

    from reki_core.encoding import ASSIGNED, TextEncoder, encode_knowledge, text_hash
    from reki_core.storage.lake import lake_of

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory(prefix="reki-bench-encoding-") as tmp:
        cfg = bench_config(Path(tmp), args.next_day, args.max_tokens)
        next_day = cfg.run_date
        day = next_day - dt.timedelta(days=1)
        extraction = build_two_days(cfg, day, next_day)
        encoder = TextEncoder.from_config(cfg)
        # The daily step itself: D fills the lake's embedding cache, D+1 records what it found there.
        encoded = {d.isoformat(): encode_knowledge(cfg, d, encoder=encoder) for d in (day, next_day)}

        lake = lake_of(cfg)
        texts = {d: lake.read_partition(ASSIGNED, d) for d in (day, next_day)}
        before = {(k, str(e)): text_hash(t) for k, e, t in
                  zip(texts[day]["entity_kind"], texts[day]["entity_id"], texts[day]["encode_text"].astype(str))}
        after = pd.DataFrame({"key": list(zip(texts[next_day]["entity_kind"], texts[next_day]["entity_id"].astype(str))),
                              "hash": texts[next_day]["encode_text"].astype(str).map(text_hash)})
        unchanged = int(sum(before.get(k) == h for k, h in zip(after["key"], after["hash"])))
        new_entities = int(sum(k not in before for k in after["key"]))

        torch.set_num_threads(args.threads)
        speed = throughput(encoder, texts[next_day]["encode_text"].astype(str).tolist()[:args.texts], args.single,
                           cfg.encoding.batch_size)

    next_record = encoded[next_day.isoformat()]
    result = {
        "encoder_id": encoder.encoder_id, "dim": encoder.dim, "device": str(encoder.device),
        "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(),
        **speed,
        "next_day_cache_hit_rate": round(next_record["cache_hits"] / next_record["unique_texts"], 4),
        "day": day.isoformat(), "next_day": next_day.isoformat(),
        "next_day_rows": int(next_record["rows"]), "next_day_unique_texts": int(next_record["unique_texts"]),
        "next_day_cache_hits": int(next_record["cache_hits"]), "next_day_encoded": int(next_record["encoded"]),
        "unchanged_entities": unchanged, "new_entities": new_entities,
        "changed_entities": int(len(after)) - unchanged - new_entities,
        "encode_knowledge": {d: {k: r[k] for k in ("rows", "unique_texts", "cache_hits", "encoded", "seconds")}
                             for d, r in encoded.items()},
        "extraction": {d: {k: r.get(k) for k in ("calls", "prompt_tokens", "completion_tokens", "seconds")}
                       for d, r in extraction.items()},
        "llm_model_id": cfg.llm.engine.model_id, "is_smoke_model": cfg.llm.is_smoke_model,
        "extraction_mode": cfg.scenario.extraction_mode, "max_tokens": cfg.llm.sampling.max_tokens,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
