"""Training entrypoint, evaluation gate and adaptor application (the functions the DAGs call).

- `train_model(cfg, dt)`: trains HEIN jointly with `cfg.model.backbone` on the train split of
  `features/ctr_samples/dt=D/` (early stopping on valid), streaming each split from the lake in record batches of
  `lake.batch_rows` rows each time it is read (shuffled within `model.shuffle_buffer_rows` rows), trains the same backbone without knowledge,
  evaluates both and the currently published version on the test split, applies the evaluation gate,
  registers the version and moves `_CURRENT.json` only when the gate passed.
- `apply_adaptor(cfg, dt)`: runs the current adaptor (on a re-run of D, the one that wrote D before) over
  every knowledge vector of D, batch by batch, and writes `vectors/augmented/dt=D/`; serving then needs neither encoder
  nor adaptor.

torch is imported inside the functions, so DAG files can import this module cheaply.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from reki_core.config import Config, ModelConfig
from reki_core.models import registry
from reki_core.models.data import (SAMPLE_COLUMNS, SAMPLE_VALUES_REQUIRED, AssemblyError, FeatureMap, KnowledgeIndex,
                                   assemble, build_feature_map, check_samples)
from reki_core.runlog import timed_step
from reki_core.storage.lake import Lake, as_date, lake_of

CTR_SAMPLES = "features/ctr_samples"
AUGMENTED_VECTORS = "vectors/augmented"
SPLITS = ("train", "valid", "test")


@dataclass
class TrainedModel:
    model: Any  # CTRModel
    fmap: FeatureMap
    fit: dict[str, Any]
    test: dict[str, float]


@dataclass
class Samples:
    """The CTR samples of D, checked and counted by split; `frames(split)` reads a split again, batch by batch."""
    lake: Lake
    day: dt.date
    batch_rows: int
    rows: dict[str, int]  # by split

    def frames(self, split: str) -> Iterator[pd.DataFrame]:
        for batch in self.lake.read_batches(CTR_SAMPLES, self.day, SAMPLE_COLUMNS, self.batch_rows,
                                            where={"split": split}):
            yield batch.to_pandas()


class SplitChunks:
    """One split assembled record batch by record batch, anew on each iteration (the trainer's `Chunks`); `stats`
    holds the join statistics of the last whole pass."""

    def __init__(self, samples: Samples, split: str, fmap: FeatureMap, knowledge: KnowledgeIndex | None):
        self.samples, self.split, self.fmap, self.knowledge = samples, split, fmap, knowledge
        self.stats: dict[str, int] = {}

    def __iter__(self):
        stats: Counter = Counter()
        for frame in self.samples.frames(self.split):
            assembled = assemble(frame, self.fmap, self.knowledge)
            stats.update(assembled["stats"])
            yield assembled["batch"]
        self.stats = dict(stats)


def load_samples(lake: Lake, day: dt.date, batch_rows: int) -> Samples:
    """The CTR samples of D (checked in one pass over their required columns); each split must hold both labels."""
    where = lake.describe(CTR_SAMPLES, day)
    if not lake.has_partition(CTR_SAMPLES, day):
        raise FileNotFoundError(f"lake partition missing: {where}")
    batches = (b.to_pandas() for b in lake.read_batches(CTR_SAMPLES, day, SAMPLE_VALUES_REQUIRED, batch_rows))
    splits = check_samples(lake.column_names(CTR_SAMPLES), batches, where)
    for name in SPLITS:
        part = splits.get(name, {"rows": 0, "labels": set()})
        if len(part["labels"]) < 2:
            raise AssemblyError(f"{where}: split {name} has {part['rows']} rows and not both labels: "
                                "AUC is undefined (more data or other split fractions needed)")
    return Samples(lake, as_date(day), batch_rows, {s: splits[s]["rows"] for s in SPLITS})


def fit_and_evaluate(cfg: Config, samples: Samples, knowledge: KnowledgeIndex | None,
                     backbone: str, seed: int, checkpoint_name: str, progress: bool = True) -> TrainedModel:
    """Train one model (with the adaptor when `knowledge` is given) and evaluate it on the test split."""
    import torch

    from reki_core.models import build_backbone
    from reki_core.models.adaptor import HybridExpertAdaptor
    from reki_core.models.trainer import CTRModel, Trainer, seed_everything

    m = cfg.model
    fmap = build_feature_map(samples.frames("train"), cfg.scenario.max_hist_len,
                             knowledge.encoder_id if knowledge else "", knowledge.dim if knowledge else 0)
    data = {s: SplitChunks(samples, s, fmap, knowledge) for s in SPLITS}
    seed_everything(seed)
    adaptor = HybridExpertAdaptor.from_config(m, knowledge.dim) if knowledge else None
    augmented_dim = 2 * m.expert_output_dim if knowledge else 0
    model = CTRModel(build_backbone(backbone, fmap.vocab_sizes(), m, augmented_dim), adaptor)
    checkpoint = cfg.resolve(cfg.paths.models_dir) / "checkpoints" / f"{checkpoint_name}.pt"
    trainer = Trainer(model, m.learning_rate, m.weight_decay, m.batch_size, m.max_epochs, m.patience, seed,
                      checkpoint, progress=progress, shuffle_buffer_rows=m.shuffle_buffer_rows)
    fit = trainer.fit(data["train"], data["valid"])
    test = trainer.evaluate(data["test"])
    model = model.cpu().eval()
    fmap.extra = {"backbone": backbone, "model": m.model_dump(), "augmented_dim": augmented_dim, "seed": seed}
    if adaptor is not None:
        with torch.no_grad():
            zero = torch.zeros(1, knowledge.dim)
            # What serving uses for an entity without knowledge (training fed it zero knowledge vectors).
            fmap.extra["no_knowledge_vectors"] = {t: adaptor.tower(t, zero)[0].tolist() for t in ("user", "item")}
    fit["join_stats"] = {s: data[s].stats for s in SPLITS}
    return TrainedModel(model, fmap, fit, test)


def load_model(lake: Lake, version: str):
    """(CTRModel in eval mode, FeatureMap) of a registered version."""
    from reki_core.models import build_backbone
    from reki_core.models.adaptor import HybridExpertAdaptor
    from reki_core.models.trainer import CTRModel

    fmap = FeatureMap.from_json(registry.read_file(lake, version, "feature_map.json").decode())
    model_cfg = ModelConfig(**fmap.extra["model"])
    adaptor = HybridExpertAdaptor.from_config(model_cfg, fmap.knowledge_dim)
    adaptor.load_state_dict(registry.load_state(lake, version, "adaptor.pt"))
    backbone = build_backbone(fmap.extra["backbone"], fmap.vocab_sizes(), model_cfg, fmap.extra["augmented_dim"])
    backbone.load_state_dict(registry.load_state(lake, version, "backbone.pt"))
    return CTRModel(backbone, adaptor).eval(), fmap


def evaluation_gate(knowledge_auc: float, baseline_auc: float, published_auc: float | None,
                    tolerance_vs_baseline: float, tolerance_vs_published: float) -> dict[str, Any]:
    """Pass only if AUC with knowledge >= baseline - tol and >= published - tol (when a version is published)."""
    checks = [{"check": "vs_no_knowledge", "auc": knowledge_auc, "reference_auc": baseline_auc,
               "tolerance": tolerance_vs_baseline, "passed": bool(knowledge_auc >= baseline_auc - tolerance_vs_baseline)}]
    if published_auc is not None:
        checks.append({"check": "vs_published", "auc": knowledge_auc, "reference_auc": published_auc,
                       "tolerance": tolerance_vs_published,
                       "passed": bool(knowledge_auc >= published_auc - tolerance_vs_published)})
    if not np.isfinite(knowledge_auc):
        checks.append({"check": "auc_defined", "auc": knowledge_auc, "passed": False})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _published_test_metrics(lake: Lake, samples: Samples, knowledge: KnowledgeIndex) -> dict | None:
    """The published version scored on today's test split; its recorded AUC when it cannot be re-scored."""
    from reki_core.models import metrics
    from reki_core.models.trainer import predict

    current = registry.current_version(lake)
    if current is None:
        return None
    version = current["version"]
    try:
        model, fmap = load_model(lake, version)
        if fmap.encoder_id != knowledge.encoder_id:
            raise AssemblyError(f"encoder changed ({fmap.encoder_id} -> {knowledge.encoder_id})")
        probs, labels = predict(model, SplitChunks(samples, "test", fmap, knowledge))
        return {"version": version, "auc": metrics.auc(labels, probs), "logloss": metrics.logloss(labels, probs),
                "source": "rescored_on_this_test_split"}
    except (AssemblyError, RuntimeError, KeyError) as exc:
        card = json.loads(registry.read_file(lake, version, "model_card.json"))
        return {"version": version, "auc": card["test"]["with_knowledge"]["auc"],
                "logloss": card["test"]["with_knowledge"]["logloss"], "source": f"model_card ({exc})"}


def _fingerprint(model_cfg: ModelConfig, *state_dicts: dict) -> str:
    """Same weights and same model config (gate tolerances included) give the same version id."""
    digest = hashlib.sha256(json.dumps(model_cfg.model_dump(), sort_keys=True).encode())
    for state in state_dicts:
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:10]


def _card_markdown(card: dict[str, Any]) -> str:
    t = card["test"]
    rows = [("with knowledge (this version)", t["with_knowledge"]), ("same backbone, no knowledge", t["no_knowledge"])]
    if t.get("published"):
        rows.append((f"published {t['published']['version']}", t["published"]))
    lines = [f"# Model {card['version']}", "",
             f"Backbone `{card['backbone']}`, encoder `{card['encoder_id']}`, trained on `{card['dt']}`."
             + (" LLM: smoke model (its answers carry no knowledge)." if card.get("is_smoke_model") else ""), "",
             "| model | test AUC | test LogLoss |", "|---|---|---|"]
    lines += [f"| {name} | {m['auc']:.4f} | {m['logloss']:.4f} |" for name, m in rows]
    lines += ["", f"Evaluation gate: **{'passed' if card['gate']['passed'] else 'FAILED'}**"]
    lines += [f"- {c['check']}: {c['auc']:.4f} vs {c.get('reference_auc', float('nan')):.4f} "
              f"(tolerance {c.get('tolerance', 0)}): {'ok' if c['passed'] else 'failed'}" for c in card["gate"]["checks"]]
    return "\n".join(lines) + "\n"


def train_model(cfg: Config, dt_: str | dt.date, progress: bool = True) -> dict[str, Any]:
    """Train, gate and register a model version for D; returns the model card (plus `published: bool`)."""
    day = as_date(dt_)
    lake = lake_of(cfg)
    m = cfg.model
    with timed_step(lake, day, "train_model") as record:
        samples = load_samples(lake, day, cfg.lake.batch_rows)
        knowledge = KnowledgeIndex.from_lake(lake, day)
        name = f"{day.isoformat()}-{m.backbone}"
        with_k = fit_and_evaluate(cfg, samples, knowledge, m.backbone, m.seed, f"{name}-knowledge", progress)
        without_k = fit_and_evaluate(cfg, samples, None, m.backbone, m.seed, f"{name}-no-knowledge", progress)
        published = _published_test_metrics(lake, samples, knowledge)
        gate = evaluation_gate(with_k.test["auc"], without_k.test["auc"], published["auc"] if published else None,
                               m.auc_tolerance_vs_baseline, m.auc_tolerance_vs_published)
        adaptor_state = with_k.model.adaptor.state_dict()
        backbone_state = with_k.model.backbone.state_dict()
        version = f"{name}-{_fingerprint(m, adaptor_state, backbone_state)}"
        card = {
            "version": version, "dt": day.isoformat(), "backbone": m.backbone, "encoder_id": knowledge.encoder_id,
            "knowledge_dim": knowledge.dim, "augmented_dim": with_k.fmap.extra["augmented_dim"],
            "is_smoke_model": cfg.llm.is_smoke_model, "llm_model_id": cfg.llm.engine.model_id,
            "samples": samples.rows,
            "join_stats": with_k.fit["join_stats"],
            "training": {k: {kk: v.fit[kk] for kk in ("best_epoch", "best_valid_auc", "epochs_run")}
                         for k, v in (("with_knowledge", with_k), ("no_knowledge", without_k))},
            "test": {"with_knowledge": with_k.test, "no_knowledge": without_k.test, "published": published},
            "auc_gain_vs_no_knowledge": with_k.test["auc"] - without_k.test["auc"],
            "gate": gate, "model_config": m.model_dump(),
        }
        registry.write_version(lake, version, {
            "adaptor.pt": registry.torch_bytes(adaptor_state),
            "backbone.pt": registry.torch_bytes(backbone_state),
            "feature_map.json": with_k.fmap.to_json().encode(),
            "model_card.json": json.dumps(card, indent=2, sort_keys=True, default=str).encode(),
            "model_card.md": _card_markdown(card).encode(),
        })
        if gate["passed"]:
            registry.set_current(lake, version, {"dt": day.isoformat(), "test_auc": with_k.test["auc"],
                                                 "backbone": m.backbone, "encoder_id": knowledge.encoder_id})
        card["published"] = gate["passed"]
        card["model_card_md"] = _card_markdown(card)
        record.update({"version": version, "published": gate["passed"], "gate": gate,
                       "test_auc_with_knowledge": with_k.test["auc"], "test_auc_no_knowledge": without_k.test["auc"]})
    return card


def has_current_model(cfg: Config) -> bool:
    """True once some version passed its gate (the daily DAG trains a first version when this is False)."""
    return registry.current_version(lake_of(cfg)) is not None


def training_day(cfg: Config, interval_end: dt.date) -> dt.date:
    """The newest day with CTR samples before `interval_end` (exclusive): training never reads the future."""
    lake = lake_of(cfg)
    day = lake.latest_partition(CTR_SAMPLES, upto=interval_end - dt.timedelta(days=1))
    if day is None:
        raise ValueError(f"no {lake.uri_of(lake.dataset_path(CTR_SAMPLES))} partition before {interval_end}: "
                         "run reki_daily_refresh first")
    return day


def model_for_day(lake: Lake, day: dt.date, encoders: list[str], batch_rows: int) -> tuple[str, str]:
    """(version, why) of the model that writes D's augmented vectors.

    A re-run of D keeps the model that wrote D's vectors before ("as_before"), so it reproduces its date
    even after a newer model was registered; otherwise, or when that model no longer fits D's encoder or
    left the registry, the current one ("current").
    """
    if lake.has_partition(AUGMENTED_VECTORS, day):
        before = _distinct(lake, AUGMENTED_VECTORS, day, "model_version", batch_rows)
        if len(before) == 1 and lake.fs.exists(registry.version_path(lake, version := before.pop())):
            fmap = FeatureMap.from_json(registry.read_file(lake, version, "feature_map.json").decode())
            if not encoders or encoders == [fmap.encoder_id]:
                return version, "as_before"
    current = registry.current_version(lake)
    if current is None:
        raise registry.RegistryError(
            f"{lake.uri_of(lake.dataset_path(registry.CURRENT))} missing: no model version has passed the "
            "evaluation gate yet; run train_model first")
    return current["version"], "current"


def _distinct(lake: Lake, dataset: str, day: dt.date, column: str, batch_rows: int) -> set:
    """The values of one column of day D, read batch by batch."""
    return {v for batch in lake.read_batches(dataset, day, [column], batch_rows) for v in batch.column(column).to_pylist()}


AUGMENTED_SCHEMA = pa.schema([("entity_kind", pa.string()), ("entity_id", pa.string()),
                              ("vector", pa.list_(pa.float32())), ("model_version", pa.string()), ("as_of", pa.int64())])


def apply_adaptor(cfg: Config, dt_: str | dt.date) -> dict[str, Any]:
    """Write `vectors/augmented/dt=D/`: the adaptor tower's output for every user and item of D (users first), from
    the model `model_for_day` chooses; knowledge vectors in, augmented vectors out, one record batch at a time."""
    import pyarrow.compute as pc
    import torch

    from reki_core.encoding import KNOWLEDGE_VECTORS

    day = as_date(dt_)
    lake = lake_of(cfg)
    batch_rows = cfg.lake.batch_rows
    with timed_step(lake, day, "apply_adaptor") as record:
        encoders = sorted(_distinct(lake, KNOWLEDGE_VECTORS, day, "encoder_id", batch_rows))
        version, chosen = model_for_day(lake, day, encoders, batch_rows)
        model, fmap = load_model(lake, version)
        if encoders and encoders != [fmap.encoder_id]:
            raise AssemblyError(
                f"{KNOWLEDGE_VECTORS} dt={day}: encoder_id {encoders} but model {version} was trained on "
                f"{fmap.encoder_id!r}: retrain (train_model) after changing the encoder")
        counts = {"user": 0, "item": 0}

        def augmented_batches() -> Iterator[pa.RecordBatch]:
            for kind in counts:
                for batch in lake.read_batches(KNOWLEDGE_VECTORS, day, ["entity_id", "vector", "as_of"], batch_rows,
                                               where={"entity_kind": kind}):
                    vectors = batch.column("vector")
                    lengths = pc.list_value_length(vectors)
                    if pc.min(lengths).as_py() != pc.max(lengths).as_py():
                        raise AssemblyError(f"{KNOWLEDGE_VECTORS} dt={day}: column vector has several lengths")
                    x = torch.from_numpy(np.array(vectors.flatten(), np.float32).reshape(batch.num_rows, -1))
                    with torch.no_grad():
                        # 4096 rows a call, as before: batch_rows' multiples keep the calls, and so the floats, the same.
                        towers = torch.cat([model.adaptor.tower(kind, x[s:s + 4096]) for s in range(0, len(x), 4096)])
                    counts[kind] += batch.num_rows
                    yield pa.record_batch([
                        pa.array([kind] * batch.num_rows, pa.string()),
                        batch.column("entity_id").cast(pa.string()),
                        pa.FixedSizeListArray.from_arrays(pa.array(towers.numpy().ravel(), pa.float32()),
                                                          towers.shape[1]).cast(pa.list_(pa.float32())),
                        pa.array([version] * batch.num_rows, pa.string()),
                        batch.column("as_of").cast(pa.int64()),
                    ], schema=AUGMENTED_SCHEMA)

        lake.write_batches(augmented_batches(), AUGMENTED_SCHEMA, AUGMENTED_VECTORS, day)
        record.update({"model_version": version, "model_chosen": chosen, "users": counts["user"],
                       "items": counts["item"], "dim": model.adaptor.output_dim})
    return record
