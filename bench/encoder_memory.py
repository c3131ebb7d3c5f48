"""The encode task's memory and speed by encoder batch size, with and without a fixed mmap threshold.

The task `encode` holds the encoder and one forward pass at a time, so its peak is the encoder plus the
activations of the longest batch (max_length tokens) plus whatever the C allocator keeps of earlier batches.
The fixed threshold (glibc's mallopt: freed activations go back to the system) is an arm to compare, not
what the task does: it costs throughput (see docs/design.md).
Each arm runs in a fresh process on the same texts (lengths spread up to past `encoding.max_length`),
streamed in chunks as the task reads them; arms alternate for --rounds rounds, and the figures are each
arm's median. Peak above load: the process's peak RSS minus its RSS once the encoder is loaded.

    .venv/bin/python bench/encoder_memory.py [--texts 1200] [--rounds 2] [--threads 2]
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
ARMS = [(64, False), (16, False), (64, True), (16, True)]  # (batch size, fixed mmap threshold)
CHUNK = 400  # texts per read batch handed to TextEncoder.encode, as lake.batch_rows does


def texts_for(n: int, seed: int = 0) -> list[str]:
    """n texts of 10 to 240 words (about 20 to 480 tokens: the longest are cut at max_length)."""
    rnd = random.Random(seed)
    vocabulary = [f"{rnd.choice(['film', 'book', 'song', 'genre'])}{i}" for i in range(2000)]
    return [" ".join(rnd.choices(vocabulary, k=rnd.randint(10, 240))) for _ in range(n)]


def run_arm(batch_size: int, fixed_mmap: bool, n: int, threads: int) -> dict:
    """In this process: load the encoder, encode the texts chunk by chunk, report peak RSS and speed."""
    import resource

    import torch

    from reki_core.config import load_config
    from reki_core.encoding import TextEncoder

    torch.set_num_threads(threads)
    if fixed_mmap:  # glibc maps blocks of 1 MiB or more and unmaps them when freed (M_MMAP_THRESHOLD = -3)
        import ctypes

        assert ctypes.CDLL("libc.so.6").mallopt(-3, 2**20), "mallopt refused the threshold"
    encoder = TextEncoder.from_config(load_config())
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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # "batch,mmap": one arm, in a fresh process
    args = parser.parse_args()
    if args.arm:
        batch, mmap = args.arm.split(",")
        print(json.dumps(run_arm(int(batch), mmap == "1", args.texts, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {}
    for round_no in range(args.rounds):
        for batch, mmap in ARMS:
            out = subprocess.run([sys.executable, __file__, "--arm", f"{batch},{int(mmap)}", "--texts", str(args.texts),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(f"batch_{batch}{'_fixed_mmap' if mmap else ''}", []).append(figures)
            print(f"round {round_no + 1}: batch {batch}, fixed mmap {mmap}: {figures}", flush=True)
    arms = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base = arms["batch_64"]
    summary = {name: {**a, "peak_above_load_over_batch_64": round(a["peak_above_load_mib"] / base["peak_above_load_mib"], 3),
                      "speed_over_batch_64": round(a["texts_per_s"] / base["texts_per_s"], 3)} for name, a in arms.items()}
    RESULTS.write_text(json.dumps({
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{os.cpu_count()} cores, "
        f"{platform.machine()}", "texts": args.texts, "chunk": CHUNK, "rounds": args.rounds, "torch_threads": args.threads,
        "arms": summary, "runs": runs}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
