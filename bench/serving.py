"""Serving latency: why REKI pre-stores its vectors.

Scores one ranking request (one user, N candidate items) three ways and reports p50/p99 in ms:
  backbone         the served (knowledge-augmented) backbone with its vectors already in hand
  lookup           VectorStore lookups of the published user and item vectors + that backbone
  online_encoding  the text encoder and the adaptor run on the knowledge texts per request + that backbone
and, for scale, the same backbone without the augmented input (what the knowledge costs the model itself).

The VectorStore path is the real one: a version is published to a local SeaweedFS (credentials
enforced) and loaded with the read-only identity. Weights are freshly initialised (latency does not
depend on their values); vocabulary sizes are MovieLens-100K's.

    .venv/bin/python bench/serving.py [--candidates 100] [--iters 300] [--threads 1]
writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.pop(_name, None)  # this benchmark brings its own object store and credentials

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402
from reki_core.localstack import free_port_block  # noqa: E402

N_USERS, N_ITEMS, N_GENRES, HIST_LEN = 943, 1682, 19, 10  # MovieLens-100K

# A knowledge text of typical length (history part + LLM answer), varied per entity.
_USER_TEXT = ("The user watched {a}, {b} and {c}, rating dramas highly and thrillers low. Preferences: the user "
              "enjoys character-driven stories with strong performances, prefers films from the 1990s, likes "
              "comedies with dark humour, and avoids slow science fiction. Mood: reflective. Pace: medium.")
_ITEM_TEXT = ("Movie {a} ({year}) is a {genre} film. Directed with an ensemble cast, it follows a small-town "
              "family through one summer. Critics praised its writing and score; audiences found it warm and "
              "funny. Themes: loyalty, growing up, second chances. Tone: light with dramatic moments.")


def _percentiles(samples_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples_s) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _time(fn, iters: int, warmup: int, label: str) -> list[float]:
    from tqdm.auto import tqdm

    for _ in range(warmup):
        fn()
    samples = []
    for _ in tqdm(range(iters), desc=label, unit="req", leave=False):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _time_round_robin(paths: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Time each path once per round, rotating the order, so load changes hit all paths alike."""
    from tqdm.auto import tqdm

    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in tqdm(range(iters), desc="fast paths, round-robin", unit="round", leave=False):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            paths[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def _vectors_file(kind: str, ids: list[str], vectors: np.ndarray) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "entity_kind": pa.array([kind] * len(ids), pa.string()),
        "entity_id": pa.array(ids, pa.string()),
        "vector": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        "model_version": pa.array(["bench"] * len(ids), pa.string()),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=100, help="candidate items scored per request")
    parser.add_argument("--iters", type=int, default=1000, help="timed requests for backbone and lookup paths")
    parser.add_argument("--online-iters", type=int, default=10, help="timed requests for the online-encoding path")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "serving.json"))
    args = parser.parse_args(argv)

    import torch

    from reki_core.encoding import TextEncoder
    from reki_core.localstack import SeaweedFS, ensure_credentials
    from reki_core.models import build_backbone
    from reki_core.models.adaptor import HybridExpertAdaptor
    from reki_core.serving.vector_store import VectorStore
    from reki_core.storage.publish import publish_version

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = load_config()
    m = cfg.model
    encoder = TextEncoder.from_config(cfg)
    adaptor = HybridExpertAdaptor.from_config(m, encoder.dim).eval()
    augmented_dim = 2 * adaptor.output_dim
    vocab = {"user": N_USERS + 1, "item": N_ITEMS + 1, "genre": N_GENRES + 1}
    plain = build_backbone(m.backbone, vocab, m, augmented_dim=0).eval()
    augmented = build_backbone(m.backbone, vocab, m, augmented_dim=augmented_dim).eval()

    n = args.candidates
    user = int(rng.integers(1, N_USERS + 1))
    items = rng.choice(np.arange(1, N_ITEMS + 1), size=n, replace=False)
    batch = {
        "user": torch.full((n,), user, dtype=torch.long),
        "item": torch.from_numpy(items.astype(np.int64)),
        "item_genre": torch.from_numpy(rng.integers(1, N_GENRES + 1, n).astype(np.int64)),
        "hist_items": torch.from_numpy(np.tile(rng.integers(1, N_ITEMS + 1, HIST_LEN), (n, 1)).astype(np.int64)),
        "hist_genres": torch.from_numpy(np.tile(rng.integers(1, N_GENRES + 1, HIST_LEN), (n, 1)).astype(np.int64)),
    }
    user_text = _USER_TEXT.format(a="Fargo", b="Heat", c="Big")
    item_texts = [_ITEM_TEXT.format(a=f"#{i}", year=1980 + i % 20, genre=["drama", "comedy", "thriller"][i % 3])
                  for i in items]

    with tempfile.TemporaryDirectory(prefix="reki-bench-") as state, torch.inference_mode():
        endpoint = f"http://127.0.0.1:{free_port_block()}"
        server = SeaweedFS(Path(state), endpoint, "bench")
        server.start()
        try:
            creds = ensure_credentials(Path(state))
            # Publish the adaptor's pre-stored outputs for every user and item (random knowledge vectors).
            users_out = adaptor.tower("user", torch.from_numpy(rng.normal(size=(N_USERS, encoder.dim)).astype(np.float32)))
            items_out = adaptor.tower("item", torch.from_numpy(rng.normal(size=(N_ITEMS, encoder.dim)).astype(np.float32)))
            user_ids = [str(i) for i in range(1, N_USERS + 1)]
            item_ids = [str(i) for i in range(1, N_ITEMS + 1)]
            files = {"user_vectors.parquet": _vectors_file("user", user_ids, users_out.numpy()),
                     "item_vectors.parquet": _vectors_file("item", item_ids, items_out.numpy()),
                     "adaptor.pt": b"bench"}
            bench_cfg = cfg.model_copy(update={"object_store": cfg.object_store.model_copy(
                update={"endpoint_url": endpoint, "bucket": "bench"})})
            publish_version(bench_cfg, cfg.run_date, "bench", files, {}, access_key=creds["writer"].access_key,
                            secret_key=creds["writer"].secret_key)
            store = VectorStore.from_config(bench_cfg, access_key=creds["reader"].access_key,
                                            secret_key=creds["reader"].secret_key)
        finally:
            server.stop()  # lookups are served from memory: the store is not on the request path

        request_items = [str(i) for i in items]
        fixed_augmented = torch.from_numpy(np.concatenate(store.lookup([str(user)] * n, request_items), axis=1))

        def score_without_knowledge():
            return plain(batch)

        def score_lookup():
            u, v = store.lookup([str(user)], request_items)  # one user per request, broadcast to its candidates
            return augmented(batch, torch.from_numpy(np.concatenate([np.repeat(u, n, axis=0), v], axis=1)))

        def lookups_only():
            u, v = store.lookup([str(user)], request_items)
            return torch.from_numpy(np.concatenate([np.repeat(u, n, axis=0), v], axis=1))

        def score_backbone():
            return augmented(batch, fixed_augmented)

        def score_online():
            vectors = torch.from_numpy(encoder.encode([user_text] + item_texts, batch_size=64, progress=False))
            u = adaptor.tower("user", vectors[:1]).expand(n, -1)
            v = adaptor.tower("item", vectors[1:])
            return augmented(batch, torch.cat([u, v], dim=-1))

        # Round-robin per request, so drift on the shared machine hits every fast path alike.
        paths = {"backbone": score_backbone, "lookup": score_lookup, "plain": score_without_knowledge,
                 "lookups_only": lookups_only}
        samples = _time_round_robin(paths, args.iters, warmup=20)
        online_s = _time(score_online, args.online_iters, 2, "backbone + online encoding")

    p50_b, p99_b = _percentiles(samples["backbone"])
    p50_l, p99_l = _percentiles(samples["lookup"])
    p50_o, p99_o = _percentiles(online_s)
    p50_p, p99_p = _percentiles(samples["plain"])
    p50_v, p99_v = _percentiles(samples["lookups_only"])
    result = {
        # "backbone" is the model the recommender serves (augmented input), given its vectors in hand;
        # "lookup" adds fetching those vectors from the VectorStore on each request.
        "p50_ms_backbone": round(p50_b, 4), "p99_ms_backbone": round(p99_b, 4),
        "p50_ms_lookup": round(p50_l, 4), "p99_ms_lookup": round(p99_l, 4),
        "p50_ms_online_encoding": round(p50_o, 4), "p99_ms_online_encoding": round(p99_o, 4),
        "lookup_overhead": round(p50_l / p50_b - 1.0, 4),
        "online_encoding_multiple": round(p50_o / p50_b, 2),
        "lookup_overhead_target": 0.10,
        "lookup_overhead_target_met": bool(p50_l / p50_b - 1.0 <= 0.10),
        # What knowledge costs the model itself: the same backbone without the augmented input (narrower).
        "p50_ms_backbone_without_knowledge": round(p50_p, 4),
        "p99_ms_backbone_without_knowledge": round(p99_p, 4),
        "augmented_input_cost": round(p50_b / p50_p - 1.0, 4),
        "lookup_overhead_vs_backbone_without_knowledge": round(p50_l / p50_p - 1.0, 4),
        "p50_ms_vector_store_lookups": round(p50_v, 4), "p99_ms_vector_store_lookups": round(p99_v, 4),
        "setup": {
            "candidates_per_request": n, "timed_requests": len(samples["backbone"]),
            "timed_online_requests": len(online_s),
            "backbone": m.backbone, "augmented_dim": augmented_dim, "encoder": encoder.encoder_id,
            "encoder_dim": encoder.dim, "torch_threads": args.threads, "device": "cpu",
            "published_users": N_USERS, "published_items": N_ITEMS, "vector_version": store.version,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} "
                       f"{platform.python_version()}, torch {torch.__version__}",
            "note": "weights freshly initialised; latency does not depend on their values; timed round-robin "
                    "per request",
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
