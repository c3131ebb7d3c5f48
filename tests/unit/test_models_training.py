"""train_model / evaluation gate / registry / apply_adaptor on a small synthetic lake (contract-shaped frames).

Users are split by user (as the Spark job does), so test users are unknown ids: only their knowledge
vectors tell the model about them, and the knowledge here carries the latent preference.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from reki_core.encoding import KNOWLEDGE_VECTORS
from reki_core.models import registry
from reki_core.models.data import AssemblyError, KnowledgeIndex, assemble, build_feature_map
from reki_core.models.training import (AUGMENTED_VECTORS, CTR_SAMPLES, SplitChunks, apply_adaptor, has_current_model,
                                       load_model, load_samples, train_model, training_day)
from reki_core.storage.lake import Lake
from tests.conftest import copy_lake, make_config

torch.set_num_threads(1)
DAY = "1998-02-01"
KDIM = 16
TINY = {
    "REKI__MODEL__EMBEDDING_DIM": "8", "REKI__MODEL__EXPERT_HIDDEN_DIM": "16", "REKI__MODEL__EXPERT_OUTPUT_DIM": "8",
    "REKI__MODEL__DNN_HIDDEN_UNITS": "[32]", "REKI__MODEL__MAX_EPOCHS": "8", "REKI__MODEL__PATIENCE": "2",
    "REKI__MODEL__BATCH_SIZE": "128", "REKI__MODEL__LEARNING_RATE": "0.01", "REKI__MODEL__NUM_CROSS_LAYERS": "2",
    "REKI__MODEL__DROPOUT": "0.0",
    # Several record batches a split and several shuffle windows an epoch: training streams here as on a big day.
    "REKI__LAKE__BATCH_ROWS": "256", "REKI__MODEL__SHUFFLE_BUFFER_ROWS": "600",
}


def vector_table(df: pd.DataFrame) -> pa.Table:
    table = pa.Table.from_pandas(df.drop(columns=["vector"]), preserve_index=False)
    return table.append_column("vector", pa.array([list(map(float, v)) for v in df["vector"]], pa.list_(pa.float32())))


def build_lake(lake: Lake, encoder_id: str = "synthetic-encoder", kdim: int = KDIM, seed: int = 0,
               n_users: int = 120, n_items: int = 40, per_user: int = 20) -> None:
    rng = np.random.default_rng(seed)
    latent = 4
    u, v = rng.normal(size=(n_users, latent)), rng.normal(size=(n_items, latent))
    proj_u, proj_i = rng.normal(size=(latent, kdim)), rng.normal(size=(latent, kdim))
    rows = []
    for user in range(n_users):
        split = ("train", "train", "train", "train", "valid", "test")[user % 6]
        items = rng.choice(n_items, size=per_user, replace=False)
        for k, item in enumerate(items):
            hist = [str(x) for x in items[max(0, k - 5):k]]
            rows.append({"user_id": str(user), "item_id": str(item), "ts": 2000 + k, "rating": 0,
                         "label": int(u[user] @ v[item] + 0.3 * rng.normal() > 0), "item_genre": f"g{item % 4}",
                         "hist_item_ids": hist, "hist_genres": [f"g{int(x) % 4}" for x in hist],
                         "hist_ratings": [3] * len(hist), "split": split,
                         "knowledge_prompt_hash": None, "knowledge_as_of": 1000})
    samples = pd.DataFrame(rows)
    samples["label"] = samples["label"].astype("int8")
    lake.write_partition(samples, CTR_SAMPLES, DAY)
    users = pd.DataFrame({"entity_kind": "user", "entity_id": [str(i) for i in range(n_users)],
                          "vector": list(u @ proj_u + 0.1 * rng.normal(size=(n_users, kdim))),
                          "prompt_hashes": [[f"hu{i}"] for i in range(n_users)], "as_of": 1000})
    items = pd.DataFrame({"entity_kind": "item", "entity_id": [str(i) for i in range(n_items)],
                          "vector": list(v @ proj_i + 0.1 * rng.normal(size=(n_items, kdim))),
                          "prompt_hashes": [[f"hi{i}"] for i in range(n_items)], "as_of": 900})
    vectors = pd.concat([users, items], ignore_index=True)
    vectors["text_hash"] = "t"
    vectors["encoder_id"] = encoder_id
    lake.write_partition(vector_table(vectors), KNOWLEDGE_VECTORS, DAY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A lake with one trained, gated and published model version (and its augmented vectors)."""
    cfg = make_config(tmp_path_factory.mktemp("train"), **TINY)
    lake = Lake(cfg.lake_uri)
    build_lake(lake)
    card = train_model(cfg, DAY, progress=False)
    return cfg, lake, card


def test_train_model_registers_a_gated_version(trained):
    cfg, lake, card = trained
    version = card["version"]
    assert card["published"] and card["gate"]["passed"] and has_current_model(cfg)
    assert registry.current_version(lake)["version"] == version
    files = {p.rsplit("/", 1)[-1] for p in lake.fs.ls(registry.version_path(lake, version), detail=False)}
    assert files == set(registry.VERSION_FILES)
    stored = json.loads(registry.read_file(lake, version, "model_card.json"))
    assert stored["test"]["with_knowledge"]["auc"] == card["test"]["with_knowledge"]["auc"]
    assert stored["samples"] == {"train": 1600, "valid": 400, "test": 400}
    assert stored["join_stats"]["test"]["user_knowledge_exact"] == 400
    # Test users are unseen ids: knowledge is what the model can use for them.
    assert card["test"]["with_knowledge"]["auc"] > card["test"]["no_knowledge"]["auc"] + 0.05, card["test"]
    md = registry.read_file(lake, version, "model_card.md").decode()
    assert "| with knowledge (this version) |" in md and "Evaluation gate: **passed**" in md
    assert lake.read_json(f"_runs/dt={DAY}/train_model.json")["version"] == version


def test_stored_augmented_vectors_give_the_same_predictions_as_the_online_adaptor(trained):
    cfg, lake, card = trained
    result = apply_adaptor(cfg, DAY)
    assert (result["users"], result["items"], result["model_version"]) == (120, 40, card["version"])
    stored = lake.read_partition(AUGMENTED_VECTORS, DAY)
    assert {len(v) for v in stored["vector"]} == {8} and set(stored["model_version"]) == {card["version"]}

    model, fmap = load_model(lake, card["version"])
    samples = lake.read_partition(CTR_SAMPLES, DAY)
    test = samples[samples["split"] == "test"].reset_index(drop=True)
    batch = assemble(test, fmap, KnowledgeIndex.from_lake(lake, DAY))["batch"]
    table = {(k, e): np.asarray(v, np.float32) for k, e, v in zip(stored["entity_kind"], stored["entity_id"], stored["vector"])}
    augmented = torch.from_numpy(np.concatenate(
        [np.stack([table[("user", u)] for u in test["user_id"]]), np.stack([table[("item", i)] for i in test["item_id"]])], 1))
    with torch.no_grad():
        online = torch.sigmoid(model(batch))
        from_store = torch.sigmoid(model.backbone(batch, augmented))
    assert online.shape == (400,)
    torch.testing.assert_close(from_store, online, atol=1e-6, rtol=0)


def test_a_rerun_keeps_the_model_that_wrote_its_date_after_a_newer_one_is_registered(trained, tmp_path):
    cfg, lake, card = trained
    copy_lake(cfg.lake_uri, tmp_path / "lake")  # its own registry: the new version must not leak
    cfg = make_config(tmp_path, **TINY, REKI__PATHS__LAKE_URI=str(tmp_path / "lake"))
    lake = Lake(cfg.lake_uri)
    lake.delete_partition(AUGMENTED_VECTORS, DAY)
    first = apply_adaptor(cfg, DAY)
    assert (first["model_version"], first["model_chosen"]) == (card["version"], "current")
    written = lake.read_partition(AUGMENTED_VECTORS, DAY)

    newer = train_model(make_config(tmp_path, **TINY, REKI__PATHS__LAKE_URI=cfg.lake_uri, REKI__MODEL__SEED="7",
                                    REKI__MODEL__AUC_TOLERANCE_VS_PUBLISHED="1.0"), DAY, progress=False)
    assert newer["published"] and registry.current_version(lake)["version"] == newer["version"] != card["version"]
    rerun = apply_adaptor(cfg, DAY)
    assert (rerun["model_version"], rerun["model_chosen"]) == (card["version"], "as_before")
    pd.testing.assert_frame_equal(lake.read_partition(AUGMENTED_VECTORS, DAY), written)

    lake.delete_partition(AUGMENTED_VECTORS, DAY)  # a first run of D takes the newest
    assert apply_adaptor(cfg, DAY)["model_version"] == newer["version"]


def test_training_day_is_the_newest_sample_day_before_the_interval_end(trained):
    cfg, _, _ = trained
    day = dt.date.fromisoformat(DAY)
    assert training_day(cfg, day + dt.timedelta(days=7)) == day
    assert training_day(cfg, day + dt.timedelta(days=1)) == day
    with pytest.raises(ValueError, match="features/ctr_samples partition before 1998-02-01"):
        training_day(cfg, day)  # the interval ends on D: D's samples are the future


def test_gate_blocks_a_worse_model_and_keeps_the_published_one(trained, tmp_path):
    cfg, lake, card = trained
    # Same lake, a stricter baseline check no model can pass: knowledge must beat no-knowledge by 1.0 AUC.
    strict = make_config(tmp_path, **TINY, REKI__PATHS__LAKE_URI=cfg.lake_uri,
                         REKI__MODEL__AUC_TOLERANCE_VS_BASELINE="-1.0", REKI__MODEL__SEED="7")
    blocked = train_model(strict, DAY, progress=False)
    assert not blocked["published"] and blocked["version"] != card["version"]
    assert [c["check"] for c in blocked["gate"]["checks"]] == ["vs_no_knowledge", "vs_published"]
    assert blocked["gate"]["checks"][0]["passed"] is False
    assert blocked["test"]["published"]["version"] == card["version"]
    assert blocked["test"]["published"]["source"] == "rescored_on_this_test_split"
    assert blocked["test"]["published"]["auc"] == pytest.approx(card["test"]["with_knowledge"]["auc"], abs=1e-9)
    assert registry.current_version(lake)["version"] == card["version"]
    assert json.loads(registry.read_file(lake, blocked["version"], "model_card.json"))["gate"]["passed"] is False


def test_apply_adaptor_without_a_published_model_is_a_clear_error(tmp_path):
    cfg = make_config(tmp_path, **TINY)
    build_lake(Lake(cfg.lake_uri))
    with pytest.raises(registry.RegistryError, match="no model version has passed the evaluation gate"):
        apply_adaptor(cfg, DAY)


def test_vectors_from_another_encoder_are_refused(trained, tmp_path):
    cfg, lake, card = trained
    other = Lake(str(tmp_path / "lake"))
    build_lake(other, encoder_id="bert-base@abc", kdim=24)
    # Same registry, knowledge of D re-encoded with a 24-d encoder.
    lake.fs.copy(registry.version_path(lake, card["version"]), registry.version_path(other, card["version"]), recursive=True)
    other.write_json(registry.CURRENT, registry.current_version(lake))
    other_cfg = make_config(tmp_path, **TINY)
    with pytest.raises(AssemblyError, match=r"encoder_id \['bert-base@abc'\].*trained on 'synthetic-encoder'"):
        apply_adaptor(other_cfg, DAY)
    model, fmap = load_model(other, card["version"])
    with pytest.raises(AssemblyError, match="knowledge vectors have 24 dims, the feature map expects 16"):
        assemble(other.read_partition(CTR_SAMPLES, DAY), fmap, KnowledgeIndex.from_lake(other, DAY))


def test_samples_that_miss_a_column_are_a_clear_error(tmp_path):
    cfg = make_config(tmp_path, **TINY)
    lake = Lake(cfg.lake_uri)
    build_lake(lake)
    samples = lake.read_partition(CTR_SAMPLES, DAY).drop(columns=["knowledge_as_of"])
    lake.write_partition(samples, CTR_SAMPLES, DAY)
    # The table keeps the column the write dropped, as nulls: either way the error names the day and the column.
    with pytest.raises(AssemblyError, match=r"ctr_samples/dt=1998-02-01.*: missing values .*'knowledge_as_of': 2400"):
        train_model(cfg, DAY, progress=False)  # counted over every batch


def test_streamed_samples_give_the_feature_map_tensors_and_counts_of_the_whole_split(tmp_path):
    cfg = make_config(tmp_path, **TINY)
    lake = Lake(cfg.lake_uri)
    build_lake(lake)
    small, whole = load_samples(lake, DAY, 7), load_samples(lake, DAY, 10**6)
    assert small.rows == whole.rows == {"train": 1600, "valid": 400, "test": 400}
    sizes = [len(frame) for frame in small.frames("train")]
    assert max(sizes) == 7 and sum(sizes) == 1600 and [len(f) for f in whole.frames("train")] == [1600]

    samples = lake.read_partition(CTR_SAMPLES, DAY)
    train, test = (samples[samples["split"] == s].reset_index(drop=True) for s in ("train", "test"))
    knowledge = KnowledgeIndex.from_lake(lake, DAY)
    fmap = build_feature_map([train], 10, knowledge.encoder_id, knowledge.dim)
    assert build_feature_map(small.frames("train"), 10, knowledge.encoder_id, knowledge.dim).vocabs == fmap.vocabs
    one = assemble(test, fmap, knowledge)
    chunks = SplitChunks(small, "test", fmap, knowledge)
    streamed = list(chunks)
    assert len(streamed) == 58 and max(len(c["label"]) for c in streamed) == 7
    for name, tensor in one["batch"].items():
        assert torch.equal(torch.cat([c[name] for c in streamed]), tensor), name
    assert chunks.stats == one["stats"]


def test_augmented_vectors_streamed_in_small_batches_are_those_of_one_batch(trained, tmp_path):
    cfg, lake, card = trained
    apply_adaptor(cfg, DAY)
    copy_lake(cfg.lake_uri, tmp_path / "lake")
    small = make_config(tmp_path, **{**TINY, "REKI__LAKE__BATCH_ROWS": "7"}, REKI__PATHS__LAKE_URI=str(tmp_path / "lake"))
    copy = Lake(small.lake_uri)
    copy.delete_partition(AUGMENTED_VECTORS, DAY)
    assert apply_adaptor(small, DAY)["model_version"] == card["version"]
    streamed, whole = copy.read_partition(AUGMENTED_VECTORS, DAY), lake.read_partition(AUGMENTED_VECTORS, DAY)
    columns = ["entity_kind", "entity_id", "model_version", "as_of"]
    pd.testing.assert_frame_equal(streamed[columns], whole[columns])  # same rows in the same order: users, then items
    np.testing.assert_allclose(np.stack(streamed["vector"]), np.stack(whole["vector"]), rtol=0, atol=1e-6)


def test_user_vector_is_the_joined_version_else_an_earlier_one_never_a_later_one():
    import datetime as dt

    day = dt.date(1998, 2, 2)
    frame = pd.DataFrame({
        "entity_kind": ["user", "user", "item"], "entity_id": ["1", "1", "5"],
        "vector": [np.full(2, 1.0), np.full(2, 2.0), np.full(2, 9.0)],
        "prompt_hashes": [["h-old"], ["h-new"], ["hi"]], "as_of": [100, 200, 50],
        "dt": [dt.date(1998, 2, 1), day, day]})
    index = KnowledgeIndex(frame, day, "enc", 2)
    assert index.user_vector("1", "h-old", None, 500)[1] == "exact"
    assert index.user_vector("1", "h-old", None, 500)[0][0] == 1.0
    vec, how = index.user_vector("1", None, 200, 500)
    assert (vec[0], how) == (2.0, "exact")
    vec, how = index.user_vector("1", None, 150, 180)  # joined version 150 not stored: the newest as_of < ts
    assert (vec[0], how) == (1.0, "earlier_version")
    assert index.user_vector("1", None, 150, 100) == (None, "missing")  # knowledge at ts=100 would leak
    assert index.user_vector("2", None, 150, 900) == (None, "missing")
    assert index.item["5"][0] == 9.0
