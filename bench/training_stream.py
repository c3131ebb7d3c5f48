"""Training before and after streaming its samples (issue 28): test AUC, peak RSS and wall time on the same lake.

Each arm trains `cfg.model.backbone` with and without knowledge (`fit_and_evaluate`, the seed of the config) on the
configured lake's CTR samples of `--day`, in a process of its own, importing `reki_core` from its checkout: the
baseline commit's (a detached worktree, `--base`) or this one's. Both read the same lake (the state dir of this
checkout); checkpoints go to a scratch folder. Peak RSS is the arm process's `ru_maxrss`; `rss_before_training_mib`
is its RSS once the samples were checked and the knowledge loaded (what training adds is the difference). A third
arm, `new_window_8192`, runs this checkout with `model.shuffle_buffer_rows` 8192: what the window costs.

It also applies the model that wrote the lake's `vectors/augmented` of `--day` (with the code before streaming) with
this checkout's `apply_adaptor` on a scratch copy of its inputs, and compares the rows and vectors.

    flock /tmp/reki-heavy.lock python bench/training_stream.py [--base b5e102e] [--day 1998-03-31]

Writes bench/results/training_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "training_stream.json"
# The last commit before training streamed its samples.
BASE = "b5e102e"

ARM = r"""
import inspect, json, resource, sys, time
import psutil, torch
from reki_core.config import load_config
from reki_core.models.data import KnowledgeIndex
from reki_core.models.training import fit_and_evaluate, load_samples
from reki_core.storage.lake import lake_of

day = sys.argv[1]
cfg = load_config()
lake = lake_of(cfg)
start = time.perf_counter()
streams = "batch_rows" in inspect.signature(load_samples).parameters
samples = load_samples(lake, day, cfg.lake.batch_rows) if streams else load_samples(lake, day)
knowledge = KnowledgeIndex.from_lake(lake, day)
rss_before = psutil.Process().memory_info().rss
runs = {}
for name, index in (("with_knowledge", knowledge), ("no_knowledge", None)):
    began = time.perf_counter()
    trained = fit_and_evaluate(cfg, samples, index, cfg.model.backbone, cfg.model.seed, f"bench-stream-{name}",
                               progress=False)
    runs[name] = {"test_auc": trained.test["auc"], "test_logloss": trained.test["logloss"],
                  "best_epoch": trained.fit["best_epoch"], "epochs_run": trained.fit["epochs_run"],
                  "seconds": round(time.perf_counter() - began, 2)}
print(json.dumps({"streams": streams, "runs": runs, "wall_s": round(time.perf_counter() - start, 2),
                  "rss_before_training_mib": round(rss_before / 2**20, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "batch_rows": getattr(cfg.lake, "batch_rows", None),
                  "shuffle_buffer_rows": getattr(cfg.model, "shuffle_buffer_rows", None),
                  "backbone": cfg.model.backbone, "seed": cfg.model.seed, "reki_core": inspect.getfile(lake_of)}))
"""


def run_arm(checkout: Path, day: str, scratch: Path, **settings: str) -> dict:
    env = {**os.environ, **settings, "PYTHONPATH": f"{checkout}:{checkout / 'plugins'}",
           # The lake of this checkout for both arms; each arm's own conf/reki.yaml (its config's schema).
           "REKI__PATHS__STATE_DIR": str(ROOT / ".reki"), "REKI__PATHS__DATA_DIR": str(ROOT / ".reki" / "data"),
           "REKI__PATHS__MODELS_DIR": str(scratch / checkout.name)}
    env.pop("REKI_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", ARM, day], cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"arm {checkout} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def augmented_check(day: str) -> dict:
    """This checkout's apply_adaptor on a scratch copy of D's knowledge vectors and the model that wrote the lake's
    augmented vectors of D, compared with those vectors."""
    import numpy as np

    from reki_core.config import load_config
    from reki_core.encoding import KNOWLEDGE_VECTORS
    from reki_core.models import registry
    from reki_core.models.training import AUGMENTED_VECTORS, apply_adaptor
    from reki_core.storage.lake import Lake, lake_of

    lake = lake_of(load_config())
    stored = lake.read_partition(AUGMENTED_VECTORS, day)
    (version,) = set(stored["model_version"])
    with tempfile.TemporaryDirectory(prefix="reki-augmented-check-") as scratch:
        cfg = load_config(environ={**os.environ, "REKI__PATHS__LAKE_URI": f"{scratch}/lake",
                                   "REKI__LAKE__TABLES_IN_STORE": "false"})
        copy = Lake(cfg.lake_uri)
        copy.write_partition(lake.read_day_rows(KNOWLEDGE_VECTORS, day), KNOWLEDGE_VECTORS, day)
        for name in registry.VERSION_FILES:
            copy.fs.makedirs(registry.version_path(copy, version), exist_ok=True)
            copy.fs.pipe(f"{registry.version_path(copy, version)}/{name}", registry.read_file(lake, version, name))
        registry.set_current(copy, version, {"dt": day})
        apply_adaptor(cfg, day)
        streamed = copy.read_partition(AUGMENTED_VECTORS, day)
    columns = ["entity_kind", "entity_id", "model_version", "as_of"]
    same_rows = streamed[columns].astype(str).equals(stored[columns].astype(str))
    difference = float(np.abs(np.stack(streamed["vector"]) - np.stack(stored["vector"])).max()) if same_rows else None
    return {"model_version": version, "rows": len(stored), "same_rows_in_order": bool(same_rows),
            "max_abs_vector_difference": difference}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the baseline commit (whole-table training)")
    parser.add_argument("--day", default="1998-03-31")
    args = parser.parse_args()
    base_sha = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="reki-training-stream-") as scratch:
        worktree = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            old = run_arm(worktree, args.day, Path(scratch))
            new = run_arm(ROOT, args.day, Path(scratch))
            small_window = run_arm(ROOT, args.day, Path(scratch), REKI__MODEL__SHUFFLE_BUFFER_ROWS="8192")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=True)
    arms = {"old": old, "new": new, "new_window_8192": small_window}
    auc = {k: {"old": old["runs"][k]["test_auc"], "new": new["runs"][k]["test_auc"],
               "new_minus_old": new["runs"][k]["test_auc"] - old["runs"][k]["test_auc"],
               "new_window_8192": small_window["runs"][k]["test_auc"]} for k in old["runs"]}
    result = {
        "what": "fit_and_evaluate on the configured lake's ML-100K CTR samples, whole splits in memory (old) vs "
                "streamed record batches with a bounded shuffle window (new); same seed, backbone and conf",
        "dt": args.day, "base_commit": base_sha, "new_commit": head.stdout.strip(),
        "test_auc": auc,
        "within_0_002": all(abs(a["new_minus_old"]) <= 0.002 for a in auc.values()),
        "peak_rss_mib": {name: arm["peak_rss_mib"] for name, arm in arms.items()},
        "rss_before_training_mib": {name: arm["rss_before_training_mib"] for name, arm in arms.items()},
        "training_added_mib": {name: round(arm["peak_rss_mib"] - arm["rss_before_training_mib"], 1)
                               for name, arm in arms.items()},
        "wall_s": {name: arm["wall_s"] for name, arm in arms.items()},
        "arms": arms,
        "augmented_vectors_vs_lake": augmented_check(args.day),
        "machine": {"cpus": os.cpu_count(), "torch_threads": "default"},
    }
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("test_auc", "peak_rss_mib", "training_added_mib", "wall_s",
                                               "augmented_vectors_vs_lake")}, indent=1))
    return result


if __name__ == "__main__":
    main()
