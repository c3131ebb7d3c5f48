"""Model quality: test AUC and LogLoss per backbone, without knowledge, with the pipeline's LLM knowledge,
and with item-metadata text (title, year, genres) through the same encoder and adaptor (a no-LLM text
baseline; users get their prompt's history part, which carries no LLM output either). Three seeds each.

Reads the configured lake at run_date (run the daily pipeline first): `features/ctr_samples`,
`features/knowledge_vectors` (llm), `prompts` and `features/items` (metadata_text). Training is exactly
`reki_core.models.training.fit_and_evaluate` (early stopping on valid; test split evaluated once).

    .venv/bin/python bench/model_quality.py [--backbones din,dcnv2,deepfm,autoint] [--seeds 0,1,2] [--max-epochs N] [--merge]
writes bench/results/model_quality.json and bench/results/model_quality.png. With --merge the new runs join the
runs already in the JSON (same dt, samples, encoder, LLM and epochs required; a rerun of a backbone/knowledge/seed
replaces its old row), and the summary and plot cover all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402

KNOWLEDGE = ("none", "llm", "metadata_text")


def metadata_text(title, year, genres) -> str:
    year_part = f" ({int(year)})" if year is not None and str(year) not in ("", "nan", "<NA>") else ""
    genre_list = ", ".join(str(g) for g in (genres if genres is not None else []))
    return f'"{title}"{year_part}. Genres: {genre_list or "unknown"}.'


def metadata_knowledge(cfg, lake, day, encoder):
    """A KnowledgeIndex whose texts are item metadata and users' prompt history parts (no LLM output)."""
    import pandas as pd

    from reki_core.encoding import EmbeddingCache, encode_texts_cached
    from reki_core.models.data import KnowledgeIndex

    items = lake.read_partition("features/items", day)
    prompts = lake.read_range("prompts", upto=day)
    users = prompts[prompts["entity_kind"] == "user"].drop_duplicates("prompt_hash", keep="last")
    users = users[users["history_text"].fillna("").str.strip() != ""]
    item_texts = [metadata_text(t, y, g) for t, y, g in zip(items["title"], items["year"], items["genres"])]
    cache = EmbeddingCache(lake, encoder.encoder_id)
    item_vecs, _ = encode_texts_cached(encoder, cache, item_texts, cfg.encoding.batch_size)
    user_vecs, _ = encode_texts_cached(encoder, cache, users["history_text"].astype(str).tolist(), cfg.encoding.batch_size)
    frame = pd.concat([
        pd.DataFrame({"entity_kind": "item", "entity_id": items["item_id"].astype(str), "vector": list(item_vecs),
                      "prompt_hashes": [[] for _ in range(len(items))], "as_of": pd.NA, "dt": day}),
        pd.DataFrame({"entity_kind": "user", "entity_id": users["entity_id"].astype(str).to_numpy(),
                      "vector": list(user_vecs), "prompt_hashes": [[h] for h in users["prompt_hash"]],
                      "as_of": users["as_of"].to_numpy(), "dt": users["dt"].to_numpy()}),
    ], ignore_index=True)
    return KnowledgeIndex(frame, day, encoder.encoder_id, encoder.dim)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(KNOWLEDGE)
    for ax, metric in zip(axes, ("auc", "logloss")):
        for k, kind in enumerate(KNOWLEDGE):
            vals = [[r[metric] for r in rows if r["backbone"] == b and r["knowledge"] == kind] for b in backbones]
            means = [np.mean(v) if v else np.nan for v in vals]
            stds = [np.std(v) if v else 0 for v in vals]
            ax.bar(np.arange(len(backbones)) + (k - 1) * width, means, width, yerr=stds, capsize=3, label=kind)
        ax.set_xticks(np.arange(len(backbones)), backbones)
        ax.set_title(f"test {metric.upper() if metric == 'auc' else 'LogLoss'} (mean ± std over seeds)")
        finite = [r[metric] for r in rows]
        ax.set_ylim(min(finite) - 0.02, max(finite) + 0.02)
    axes[0].legend(title="knowledge")
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds for each backbone and knowledge kind, backbones in first-seen order."""
    import numpy as np

    summary = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        for kind in KNOWLEDGE:
            sel = [r for r in rows if r["backbone"] == backbone and r["knowledge"] == kind]
            if not sel:
                continue
            summary.append({"backbone": backbone, "knowledge": kind, "seeds": len(sel),
                            "auc_mean": float(np.mean([r["auc"] for r in sel])),
                            "auc_std": float(np.std([r["auc"] for r in sel])),
                            "logloss_mean": float(np.mean([r["logloss"] for r in sel])),
                            "logloss_std": float(np.std([r["logloss"] for r in sel]))})
    return summary


# Runs are comparable only when these agree; --merge refuses to mix results that differ in any of them.
MERGE_KEYS = ("dt", "samples", "encoder_id", "llm_model_id", "max_epochs", "patience")


def check_mergeable(previous: dict, header: dict) -> None:
    mismatched = {k: (previous.get(k), header[k]) for k in MERGE_KEYS if previous.get(k) != header[k]}
    if mismatched:
        raise SystemExit(f"bench/model_quality.py --merge: the existing results were measured differently "
                         f"(existing, now): {mismatched}; rerun all backbones without --merge")


def merge_runs(previous: dict, result: dict) -> dict:
    """`result` with the runs of `previous` that it does not rerun put first; summary recomputed over all runs."""
    check_mergeable(previous, result)
    rerun = {(r["backbone"], r["knowledge"], r["seed"]) for r in result["runs"]}
    kept = [r for r in previous["runs"] if (r["backbone"], r["knowledge"], r["seed"]) not in rerun]
    runs = kept + result["runs"]
    return {**result, "test_join_stats": {**previous.get("test_join_stats", {}), **result["test_join_stats"]},
            "summary": summarize(runs), "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="din,dcnv2,deepfm,autoint")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: model.max_epochs of the config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "model_quality.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs already in --out (rows of rerun backbone/knowledge/seed are replaced)")
    args = parser.parse_args(argv)

    import torch

    from reki_core.encoding import KNOWLEDGE_VECTORS, TextEncoder
    from reki_core.models.data import KnowledgeIndex
    from reki_core.models.training import CTR_SAMPLES, fit_and_evaluate, load_samples
    from reki_core.storage.lake import Lake

    torch.set_num_threads(args.threads)
    cfg = load_config()
    if args.max_epochs:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_epochs": args.max_epochs})})
    lake = Lake(cfg.lake_uri)
    day = lake.latest_partition(CTR_SAMPLES, upto=cfg.run_date)
    if day is None or not lake.has_partition(KNOWLEDGE_VECTORS, day):
        sys.exit(f"bench/model_quality.py: no {CTR_SAMPLES} and {KNOWLEDGE_VECTORS} partition up to {cfg.run_date} "
                 f"in {cfg.lake_uri}: run the daily pipeline first (make run)")
    splits = load_samples(lake, day)
    encoder = TextEncoder.from_config(cfg)
    out = Path(args.out)
    # Round-trip through JSON so the header compares alike with a stored one (dates as strings).
    header = json.loads(json.dumps({
        "dt": day.isoformat(), "samples": {s: len(splits[s]) for s in splits}, "encoder_id": encoder.encoder_id,
        "llm_model_id": cfg.llm.engine.model_id, "is_smoke_model": cfg.llm.is_smoke_model,
        "note": ("the smoke LLM's answers carry no knowledge; the user text still carries the history titles"
                 if cfg.llm.is_smoke_model else ""),
        "max_epochs": cfg.model.max_epochs, "patience": cfg.model.patience}))
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    if previous is not None:
        check_mergeable(previous, header)  # fail before training, not after
    knowledge = {"none": None, "llm": KnowledgeIndex.from_lake(lake, day),
                 "metadata_text": metadata_knowledge(cfg, lake, day, encoder)}
    rows, join_stats = [], {}
    for backbone in args.backbones.split(","):
        for kind in KNOWLEDGE:
            for seed in (int(s) for s in args.seeds.split(",")):
                start = time.perf_counter()
                trained = fit_and_evaluate(cfg, splits, knowledge[kind], backbone, seed,
                                           f"bench-{backbone}-{kind}-s{seed}", progress=True)
                rows.append({"backbone": backbone, "knowledge": kind, "seed": seed, "auc": trained.test["auc"],
                             "logloss": trained.test["logloss"], "best_epoch": trained.fit["best_epoch"],
                             "best_valid_auc": trained.fit["best_valid_auc"],
                             "seconds": round(time.perf_counter() - start, 1)})
                join_stats[kind] = trained.fit["join_stats"]["test"]
                print(json.dumps(rows[-1]))
    result = json.loads(json.dumps({**header, "test_join_stats": join_stats, "summary": summarize(rows),
                                    "runs": rows, "plot": out.with_suffix(".png").name}, default=str))
    if previous is not None:
        result = merge_runs(previous, result)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result["runs"], out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
