"""The encode task's memory by encoder batch size and padding, and how it grows with the number of batches.

The task `encode` holds the encoder and one forward pass at a time, so its peak should be the encoder plus the
activations of the longest batch (max_length tokens), whatever the number of texts. Each arm runs in a fresh process
on the same texts (lengths spread up to past `encoding.max_length`), streamed in chunks as the task reads them, once
with --texts texts and once with 4x as many: `growth_4x` is the ratio of the two peaks above the loaded encoder (1.0 =
bounded by the batch). Arm `batch_16_unpadded` is the encoder before `PAD_TO_MULTIPLE_OF` (a shape per batch length).
Arms alternate for --rounds rounds; the figures are each arm's median. Peak above load: the process's peak RSS minus
its RSS once the encoder is loaded.

    .venv/bin/python bench/encoder_memory.py [--texts 1200] [--rounds 1] [--threads 2]
writes bench/results/encoder_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "encoder_memory.json"
ARMS = {"batch_16": (16, True), "batch_16_unpadded": (16, False), "batch_64": (64, True)}  # (batch size, padded)
CHUNK = 400  # texts per read batch handed to TextEncoder.encode, as lake.batch_rows does


def texts_for(n: int, seed: int = 0) -> list[str]:
    """n texts of 10 to 240 words (about 20 to 480 tokens: the longest are cut at max_length)."""
    rnd = random.Random(seed)
    vocabulary = [f"{rnd.choice(['film', 'book', 'song', 'genre'])}{i}" for i in range(2000)]
    return [" ".join(rnd.choices(vocabulary, k=rnd.randint(10, 240))) for _ in range(n)]


def run_arm(batch_size: int, padded: bool, n: int, threads: int) -> dict:
    """In this process: load the encoder, encode the texts chunk by chunk, report peak RSS and speed."""
    import resource

    import torch

    from reki_core import encoding
    from reki_core.config import load_config

    torch.set_num_threads(threads)
    if not padded:  # the baseline: padded to the batch's longest text only
        encoding.PAD_TO_MULTIPLE_OF = None
    encoder = encoding.TextEncoder.from_config(load_config())
    texts = texts_for(n)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for offset in range(0, n, CHUNK):
        encoder.encode(texts[offset:offset + CHUNK], batch_size, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loaded_mib": round(loaded, 1), "peak_mib": round(peak, 1), "peak_above_load_mib": round(peak - loaded, 1),
            "texts_per_s": round(n / seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # "batch,padded": one arm, in a fresh process
    args = parser.parse_args()
    if args.arm:
        batch, padded = args.arm.split(",")
        print(json.dumps(run_arm(int(batch), padded == "1", args.texts, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {}
    for round_no in range(args.rounds):
        for name, (batch, padded) in ARMS.items():
            for n in (args.texts, 4 * args.texts):
                out = subprocess.run([sys.executable, __file__, "--arm", f"{batch},{int(padded)}", "--texts", str(n),
                                      "--threads", str(args.threads)], check=True, capture_output=True, text=True)
                figures = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(f"{name}@{n}", []).append(figures)
                print(f"round {round_no + 1}: {name}, {n} texts: {figures}", flush=True)
    medians = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    summary = {}
    for name in ARMS:
        small, large = medians[f"{name}@{args.texts}"], medians[f"{name}@{4 * args.texts}"]
        summary[name] = {"peak_above_load_mib": small["peak_above_load_mib"],
                         "peak_above_load_mib_4x": large["peak_above_load_mib"],
                         "growth_4x": round(large["peak_above_load_mib"] / small["peak_above_load_mib"], 3),
                         "texts_per_s_4x": large["texts_per_s"]}
    RESULTS.write_text(json.dumps({
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{os.cpu_count()} cores, "
        f"{platform.machine()}", "texts": [args.texts, 4 * args.texts], "chunk": CHUNK, "rounds": args.rounds,
        "torch_threads": args.threads, "arms": summary, "runs": runs}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
