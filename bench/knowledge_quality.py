"""Knowledge quality: does an LLM's item answer know the item's MovieLens genres, which its prompt does not contain?

The item prompt (`reki_core.prompts.render_item`) gives only the quoted title and year. MovieLens-100K lists each
item's genres (19 labels). For a fixed, seeded sample of items, each model answers; a genre counts as named when
one of its keywords (GENRE_KEYWORDS, whole words, case-insensitive) occurs in the answer with the item's own title
removed (so "Star Wars" does not name War). Per model: micro precision (named genres that are right / named
genres), micro recall (right genres named / true genres), F1, and the same against a shuffled pairing of answers
and items (200 seeded shuffles; p_value_f1: the share of shuffles scoring at least the real F1), the score a model would
get without knowing which item it answered about.

Models (one entry each):
- the smoke model (random weights) with the pipeline's item prompt through its chat template;
- SmolLM2-135M-Instruct (`reki setup`) with the same chat prompt, and with the completion prompt below;
- Gemma 3 270M (pretrained, not instruction-tuned; fetched here, Gemma terms of use) with a completion-style
  prompt: `The movie "<title>" (<year>) is a` (the same one SmolLM2 also gets, for a like-for-like comparison).
Greedy decoding, batch 32, in-process transformers on CPU (`reki_core.llm.backends.TransformersBackend`).
Answers are cached under .reki/cache/knowledge_quality/ (keyed by model weights, prompt style and max_tokens).

    .venv/bin/python bench/knowledge_quality.py [--items 300] [--seed 0]
writes bench/results/knowledge_quality.json and bench/results/knowledge_quality.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reki_core.config import PROJECT_ROOT, load_config  # noqa: E402

# Whole-word, case-insensitive patterns; a genre is named when any of its patterns matches.
GENRE_KEYWORDS: dict[str, list[str]] = {
    "Action": [r"action", r"martial arts?", r"shoot-?outs?", r"car chases?"],
    "Adventure": [r"adventures?", r"adventurous", r"quests?", r"expeditions?"],
    "Animation": [r"animated", r"animation", r"cartoons?", r"pixar", r"anime"],
    "Children's": [r"child(?:ren)?'?s?", r"kids?", r"family[- ]friendly", r"family (?:film|movie|comedy)"],
    "Comedy": [r"comed(?:y|ies)", r"comedic", r"comic", r"funny", r"humou?r(?:ous)?", r"hilarious"],
    "Crime": [r"crimes?", r"criminals?", r"gangsters?", r"mafia", r"mob", r"heists?"],
    "Documentary": [r"documentar(?:y|ies)"],
    "Drama": [r"drama", r"dramas", r"dramatic"],
    "Fantasy": [r"fantasy", r"fantastical", r"magic(?:al)?", r"fairy[- ]tales?", r"wizards?"],
    "Film-Noir": [r"film[- ]noir", r"noir"],
    "Horror": [r"horror", r"scary", r"terrifying", r"slasher", r"haunted"],
    "Musical": [r"musicals?"],
    "Mystery": [r"myster(?:y|ies|ious)", r"detectives?", r"whodunn?it"],
    "Romance": [r"romance", r"romantic", r"love stor(?:y|ies)"],
    "Sci-Fi": [r"science[- ]fiction", r"sci-?fi", r"futuristic", r"aliens?", r"outer space", r"space ?ships?"],
    "Thriller": [r"thrillers?", r"suspense(?:ful)?"],
    "War": [r"war", r"wartime", r"world war (?:i|ii|one|two)", r"soldiers?", r"battlefields?"],
    "Western": [r"westerns?", r"cowboys?", r"wild west"],
}
_PATTERNS = {g: re.compile(r"\b(?:" + "|".join(ps) + r")\b", re.IGNORECASE) for g, ps in GENRE_KEYWORDS.items()}
COMPLETION_TEMPLATE = 'The movie "{title}" ({year}) is a'
SHUFFLES = 200


def named_genres(answer: str, title: str) -> set[str]:
    text = re.sub(re.escape(title), " ", answer, flags=re.IGNORECASE) if title else answer
    return {g for g, pattern in _PATTERNS.items() if pattern.search(text)}


def scores(named: list[set[str]], truth: list[set[str]]) -> dict:
    hits = sum(len(n & t) for n, t in zip(named, truth))
    n_named, n_true = sum(map(len, named)), sum(map(len, truth))
    precision = hits / n_named if n_named else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "named_per_item": n_named / len(named)}


def shuffled_scores(named: list[set[str]], truth: list[set[str]], seed: int) -> dict:
    """Mean scores over SHUFFLES seeded shuffles of the truth, and the permutation p-value of the real F1."""
    rng = random.Random(seed)
    runs = []
    for _ in range(SHUFFLES):
        perm = list(truth)
        rng.shuffle(perm)
        runs.append(scores(named, perm))
    real_f1 = scores(named, truth)["f1"]
    p_value = (1 + sum(r["f1"] >= real_f1 for r in runs)) / (1 + len(runs))
    return {**{k: sum(r[k] for r in runs) / len(runs) for k in ("precision", "recall", "f1")}, "p_value_f1": p_value}


def sample_items(cfg, n: int, seed: int):
    from reki_core.datasets import movielens

    _, _, items = movielens.load(movielens.obtain(cfg.data_dir))
    items = items[items["genres"].map(lambda gs: bool(gs) and "unknown" not in gs)]
    return items.sample(n=n, random_state=seed).reset_index(drop=True)


def prompts_for(cfg, items, style: str) -> list[str]:
    from reki_core.prompts import clean_text, render_item

    if style == "chat":
        return [render_item(cfg, t, y) for t, y in zip(items["title"], items["year"])]
    limit = cfg.scenario.prompts.max_title_chars
    return [COMPLETION_TEMPLATE.format(title=clean_text(t, limit), year=y) for t, y in zip(items["title"], items["year"])]


def weights_id(folder: Path) -> str:
    """What identifies the weights: the provenance's GGUF sha256, or the smoke model's marker."""
    for marker in ("REKI_MODEL.json", "REKI_SMOKE_MODEL.json"):
        if (folder / marker).is_file():
            return hashlib.sha256((folder / marker).read_bytes()).hexdigest()[:16]
    raise SystemExit(f"{folder}: no REKI_MODEL.json or REKI_SMOKE_MODEL.json: not a model folder built by reki setup")


def generate(cfg, folder: Path, style: str, prompts: list[str], max_tokens: int, cache_dir: Path) -> tuple[list, dict]:
    from reki_core.llm.backends import GenerationRequest, TransformersBackend

    class CompletionBackend(TransformersBackend):
        """A pretrained model continues the text as given: no chat template."""

        def render(self, text: str) -> str:
            tok = self._tokenizer  # the backend tokenizes without special tokens: add BOS where the model expects it
            adds_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
            return tok.bos_token + text if adds_bos else text

    cache_file = cache_dir / f"{folder.name}-{weights_id(folder)}-{style}-{max_tokens}.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    keys = [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
    todo = [GenerationRequest(k, p) for k, p in zip(keys, prompts) if k not in cached]
    timing = {"generated_now": len(todo), "from_cache": len(prompts) - len(todo)}
    if todo:
        engine = cfg.llm.engine.model_copy(update={"model_path": str(folder), "device": "cpu", "batch_size": 32})
        sampling = cfg.llm.sampling.model_copy(update={"max_tokens": max_tokens, "temperature": 0.0})
        t = time.perf_counter()
        backend = (TransformersBackend if style == "chat" else CompletionBackend)(engine, sampling, str(folder))
        timing["load_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        results = []
        for start in range(0, len(todo), 32):
            results += backend.generate(todo[start:start + 32])
            print(f"  {folder.name} ({style}): {len(results)}/{len(todo)} answers", flush=True)
        seconds = time.perf_counter() - t
        backend.close()
        tokens = sum(r.completion_tokens for r in results)
        timing.update(generate_s=round(seconds, 1), completion_tokens=tokens, tokens_per_s=round(tokens / seconds, 1))
        for r in results:
            cached[r.request_id] = {"text": r.text, "finish_reason": r.finish_reason, "completion_tokens": r.completion_tokens}
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached))
        with cache_file.with_suffix(".runs.jsonl").open("a") as runs:  # what generating the cached answers cost
            runs.write(json.dumps(timing) + "\n")
    runs_file = cache_file.with_suffix(".runs.jsonl")
    timing["generation_runs"] = [json.loads(x) for x in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    return [cached[k] for k in keys], timing


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{e['model']}\n({e['prompt_style']})" for e in entries]
    x = np.arange(len(entries))
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (metric, colour) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"))):
        ax.bar(x + (k - 0.5) * 0.38, [e[metric] for e in entries], 0.36, color=colour, label=metric)
        ax.bar(x + (k - 0.5) * 0.38, [e["shuffled_baseline"][metric] for e in entries], 0.36, fill=False,
               hatch="//", edgecolor="black", label=f"{metric}, shuffled items" if k == 0 else None)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"MovieLens genres named in item answers ({entries[0]['n_items']} items; hatched: answers shuffled across items)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "knowledge_quality.json"))
    args = parser.parse_args(argv)

    import torch

    from reki_core.llm.instruct_model import GEMMA3_270M, SMOLLM2_135M_INSTRUCT, ensure_gguf_model
    from reki_core.llm.smoke_model import ensure_smoke_model

    torch.set_num_threads(args.threads)
    cfg = load_config()
    models_dir, downloads = cfg.resolve(cfg.paths.models_dir), cfg.state_dir / "downloads"
    cache_dir = cfg.state_dir / "cache" / "knowledge_quality"
    items = sample_items(cfg, args.items, args.seed)
    truth = [set(g) for g in items["genres"]]
    runs = [  # (model, licence, folder, prompt style, max_tokens)
        ("reki-smoke-lm", "generated locally", ensure_smoke_model(models_dir / "smoke-lm"), "chat", 64),
        (SMOLLM2_135M_INSTRUCT.model_id, SMOLLM2_135M_INSTRUCT.licence,
         ensure_gguf_model(SMOLLM2_135M_INSTRUCT, models_dir, downloads), "chat", 64),
        (SMOLLM2_135M_INSTRUCT.model_id, SMOLLM2_135M_INSTRUCT.licence,
         ensure_gguf_model(SMOLLM2_135M_INSTRUCT, models_dir, downloads), "completion", 40),
        (GEMMA3_270M.model_id, GEMMA3_270M.licence, ensure_gguf_model(GEMMA3_270M, models_dir, downloads), "completion", 40),
    ]
    entries = []
    for model, licence, folder, style, max_tokens in runs:
        answers, timing = generate(cfg, folder, style, prompts_for(cfg, items, style), max_tokens, cache_dir)
        named = [named_genres(a["text"], t) for a, t in zip(answers, items["title"])]
        provenance = folder / "REKI_MODEL.json"
        entry = {
            "model": model, "licence": licence, "prompt_style": style, "max_tokens": max_tokens,
            "is_smoke_model": model == "reki-smoke-lm",
            "parameters": json.loads(provenance.read_text())["parameters"] if provenance.is_file() else None,
            "n_items": len(items), **scores(named, truth),
            "shuffled_baseline": shuffled_scores(named, truth, args.seed),
            "per_genre_recall": {g: round(sum(g in n for n, t in zip(named, truth) if g in t) / c, 3)
                                 for g in GENRE_KEYWORDS if (c := sum(g in t for t in truth))},
            "finish_stop_share": sum(a["finish_reason"] == "stop" for a in answers) / len(answers),
            "mean_completion_tokens": sum(a["completion_tokens"] for a in answers) / len(answers),
            "generation": timing,
            "examples": [{"item": f"{t} ({y})", "genres": sorted(g), "named": sorted(n), "answer": a["text"][:300]}
                         for t, y, g, n, a in list(zip(items["title"], items["year"], truth, named, answers))[:3]],
        }
        entry["f1_above_shuffled"] = entry["f1"] - entry["shuffled_baseline"]["f1"]
        entries.append(entry)
        print(json.dumps({k: entry[k] for k in ("model", "prompt_style", "precision", "recall", "f1", "f1_above_shuffled")}))
    out = Path(args.out)
    result = {
        "what": "MovieLens-100K genres (not in the prompt) named in each model's answer about an item",
        "n_items": len(items), "sample": f"items.sample(n={len(items)}, random_state={args.seed}) of the items with "
                                         "known genres; the same items for every model",
        "genre_detection": "a genre is named when one of its keywords matches as a whole word, case-insensitive, "
                           "in the answer with the item's title removed",
        "genre_keywords": GENRE_KEYWORDS,
        "metrics": "micro precision = right named genres / named genres; micro recall = right named genres / true "
                   f"genres; shuffled_baseline: the same answers scored against the genres of other items "
                   f"(mean of {SHUFFLES} seeded shuffles; p_value_f1 = (1 + shuffles with F1 >= the real F1) / (1 + {SHUFFLES}))",
        "prompts": {"chat": "reki_core.prompts.render_item (the pipeline's item prompt, scenario template "
                            f"{cfg.scenario.template_version}) through the model's chat template",
                    "completion": COMPLETION_TEMPLATE + " (after the tokenizer's BOS where the model expects one)",
                    "examples": {style: prompts_for(cfg, items.head(1), style)[0] for style in ("chat", "completion")}},
        "decoding": "greedy, batch 32, transformers in-process on CPU (2 threads), float32",
        "entries": entries, "plot": out.with_suffix(".png").name,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(entries, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
