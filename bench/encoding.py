"""Knowledge encoding: texts per second batched versus one at a time, and the next-day cache hit rate.

Reads the pipeline's `knowledge/assigned/` partitions in the configured lake (run the daily DAG first):
- throughput on up to --texts texts of the latest partition <= run_date, batched (encoding.batch_size)
  and one at a time (on the first --single of them);
- next-day cache hit rate: a fresh cache is filled with day D-1's texts (the previous partition),
  then day D's unique texts are looked up: hits / unique texts of D.

    .venv/bin/python bench/encoding.py [--texts 512] [--single 64] [--threads 1]
writes bench/results/encoding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--single", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "encoding.json"))
    args = parser.parse_args(argv)

    import torch

    from reki_core.encoding import ASSIGNED, EmbeddingCache, TextEncoder, encode_texts_cached, text_hash
    from reki_core.storage.lake import Lake

    torch.set_num_threads(args.threads)
    cfg = load_config()
    lake = Lake(cfg.lake_uri)
    days = [d for d in lake.partitions(ASSIGNED) if d <= cfg.run_date]
    if not days:
        sys.exit(f"bench/encoding.py: no {ASSIGNED} partition up to {cfg.run_date} in {cfg.lake_uri}: run the daily "
                 "pipeline first (make run)")
    today = lake.read_partition(ASSIGNED, days[-1])
    texts = today["encode_text"].astype(str).tolist()[:args.texts]
    encoder = TextEncoder.from_config(cfg)
    encoder.encode(texts[:8], batch_size=8, progress=False)  # warm-up

    start = time.perf_counter()
    encoder.encode(texts, batch_size=cfg.encoding.batch_size, progress=True)
    batched_rate = len(texts) / (time.perf_counter() - start)
    single = texts[:args.single]
    start = time.perf_counter()
    for text in single:
        encoder.encode([text], batch_size=1, progress=False)
    single_rate = len(single) / (time.perf_counter() - start)

    next_day: dict = {"next_day_cache_hit_rate": None}
    if len(days) >= 2:
        previous = lake.read_partition(ASSIGNED, days[-2])["encode_text"].astype(str).tolist()
        all_today = today["encode_text"].astype(str).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            cache = EmbeddingCache(Lake(tmp), encoder.encoder_id)
            encode_texts_cached(encoder, cache, previous, cfg.encoding.batch_size)
            unique_today = {text_hash(t) for t in all_today}
            hits = len(cache.lookup(unique_today))
        next_day = {"next_day_cache_hit_rate": round(hits / len(unique_today), 4), "previous_day": days[-2].isoformat(),
                    "day": days[-1].isoformat(), "unique_texts_day": len(unique_today), "cache_hits": hits}
    else:
        next_day["next_day_note"] = f"only one {ASSIGNED} partition ({days[-1]}): run the pipeline for two days"

    result = {
        "encoder_id": encoder.encoder_id, "dim": encoder.dim, "device": str(encoder.device),
        "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "texts": len(texts), "mean_chars": round(sum(map(len, texts)) / max(len(texts), 1), 1),
        "batch_size": cfg.encoding.batch_size,
        "texts_per_s_batched": round(batched_rate, 2), "texts_per_s_single": round(single_rate, 2),
        "batched_over_single": round(batched_rate / single_rate, 3),
        "is_smoke_model": cfg.llm.is_smoke_model, **next_day,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
