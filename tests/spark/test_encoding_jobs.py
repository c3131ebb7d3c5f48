"""The day's encoding on a small lake: the Spark jobs `encoding_misses` and `knowledge_vectors` around the Python task
`encode` (reki_core.encoding.encode_misses), the embedding cache table, a retried task, bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from reki_core.encoding import (EMBEDDING_CACHE, KNOWLEDGE_VECTORS, MISSES, EncodingError, TextEncoder,
                                encode_knowledge, encode_misses, text_hash)
from reki_core.runlog import read_step
from reki_core.storage.lake import Lake
from tests.conftest import make_config

torch.set_num_threads(1)
DAY1, DAY2 = "1998-01-01", "1998-01-02"


@pytest.fixture(scope="module")
def encoder():
    from reki_core.config import PROJECT_ROOT, load_config

    return TextEncoder.from_config(load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={}))


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, REKI__LAKE__BATCH_ROWS="2", REKI__SPARK__SHUFFLE_PARTITIONS="2")


@pytest.fixture
def lake(cfg):
    return Lake(cfg.lake_uri)


def write_day(lake: Lake, day: str, assigned: list[dict], users=("1", "2"), items=("10", "11")) -> None:
    lake.write_partition(pd.DataFrame({"user_id": list(users), "n_interactions": [3] * len(users)}),
                         "features/user_history", day)
    lake.write_partition(pd.DataFrame({"item_id": list(items), "title": ["A"] * len(items)}), "features/items", day)
    lake.write_partition(pd.DataFrame(assigned), "knowledge/assigned", day)


def row(kind: str, entity: str, text: str, as_of: int | None = 100) -> dict:
    return {"entity_kind": kind, "entity_id": entity, "encode_text": text, "prompt_hashes": [f"h-{kind}{entity}"],
            "as_of": as_of}


def cache_rows(lake: Lake) -> pd.DataFrame:
    return lake.load_table(EMBEDDING_CACHE).scan().to_arrow().to_pandas()


def test_encoding_writes_vectors_and_next_day_hits_the_cache(spark, cfg, lake, encoder, monkeypatch):
    day1 = [row("user", "1", "likes noir"), row("user", "2", "likes comedy"), row("item", "10", "a comedy"),
            row("item", "11", "a comedy", as_of=None)]  # a duplicate text is encoded once; as_of may be null
    write_day(lake, DAY1, day1)
    first = encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    assert (first["rows"], first["users"], first["items"]) == (4, 2, 2)
    assert (first["unique_texts"], first["encoded"], first["cache_hits"]) == (3, 3, 0)
    assert read_step(lake, DAY1, "encode_knowledge")["encoded"] == 3
    out = lake.read_partition(KNOWLEDGE_VECTORS, DAY1)
    assert list(out.columns) == ["entity_kind", "entity_id", "vector", "prompt_hashes", "as_of", "text_hash",
                                 "encoder_id"]
    out = out.set_index("entity_id")
    assert {len(v) for v in out["vector"]} == {384} and set(out["encoder_id"]) == {encoder.encoder_id}
    assert out.loc["1", "prompt_hashes"].tolist() == ["h-user1"] and out.loc["1", "text_hash"] == text_hash("likes noir")
    assert pd.isna(out.loc["11", "as_of"]) and out.loc["10", "as_of"] == 100
    np.testing.assert_allclose(np.asarray(out.loc["1", "vector"]), encoder.encode(["likes noir"], progress=False)[0],
                               atol=1e-6)

    day2 = day1[:3] + [row("item", "11", "a new drama", as_of=200)]
    write_day(lake, DAY2, day2)
    second = encode_knowledge(cfg, DAY2, encoder=encoder, progress=False, spark=spark)
    assert (second["unique_texts"], second["cache_hits"], second["encoded"]) == (4, 3, 1)
    before = lake.read_partition(KNOWLEDGE_VECTORS, DAY2)
    again = encode_knowledge(cfg, DAY2, encoder=encoder, progress=False, spark=spark)  # a re-run encodes nothing
    assert again["encoded"] == 0 and again["cache_hit_rate"] == 1.0
    with monkeypatch.context() as patched:  # and, as the DAG's task, loads no model for it
        patched.setattr(TextEncoder, "__init__", lambda self, *args, **kwargs: pytest.fail("the encoder was loaded"))
        rerun = encode_misses(cfg, DAY2, progress=False)
    assert (rerun["encoded"], rerun["dim"], rerun["encoder_id"]) == (0, encoder.dim, encoder.encoder_id)
    pd.testing.assert_frame_equal(lake.read_partition(KNOWLEDGE_VECTORS, DAY2), before)
    cached = cache_rows(lake)
    assert list(cached.columns) == ["text_hash", "encoder_id", "vector"]
    assert text_hash("a new drama") in set(cached["text_hash"]) and len(cached) == 4
    assert str(lake.load_table(EMBEDDING_CACHE).schema().find_field("vector").field_type) == "list<float>"


def test_a_retried_encode_goes_on_after_the_batches_it_appended(spark, cfg, lake, encoder):
    from spark_jobs import encoding_misses
    from spark_jobs.common import run_jobs

    write_day(lake, DAY1, [row("user", "1", "one"), row("user", "2", "two"), row("item", "10", "three"),
                           row("item", "11", "four"), ], users=("1", "2"), items=("10", "11"))
    run_jobs(spark, [(encoding_misses.run, encoding_misses.STEP)], cfg, lake, pd.Timestamp(DAY1).date())
    assert read_step(lake, DAY1, "encoding_misses")["misses"] == 4 and len(lake.read_partition(MISSES, DAY1)) == 4
    # One data file per reader batch (lake.batch_rows = 2): encode's reader holds a file, never the day's misses.
    assert [task.file.record_count for task in lake.load_table(MISSES).scan().plan_files()] == [2, 2]

    class Crashing:  # encodes the first batch (lake.batch_rows = 2), then dies
        encoder_id, dim = encoder.encoder_id, encoder.dim
        calls = 0

        def encode(self, texts, batch_size, progress):
            Crashing.calls += 1
            if Crashing.calls > 1:
                raise RuntimeError("killed")
            return encoder.encode(texts, batch_size, progress=False)

    with pytest.raises(RuntimeError, match="killed"):
        encode_misses(cfg, DAY1, encoder=Crashing(), progress=False)
    assert len(cache_rows(lake)) == 2  # the first batch's commit stays
    record = encode_misses(cfg, DAY1, encoder=encoder, progress=False)
    assert (record["encoded"], record["resumed_from_earlier_try"]) == (4, 2)
    cached = cache_rows(lake)
    assert sorted(cached["text_hash"]) == sorted(text_hash(t) for t in ("one", "two", "three", "four"))


def test_cache_is_keyed_by_encoder_id(spark, cfg, lake, encoder):
    write_day(lake, DAY1, [row("user", "1", "likes noir")])
    encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    other = TextEncoder.__new__(TextEncoder)
    other.__dict__.update(encoder.__dict__)
    other.encoder_id = encoder.encoder_id.replace("max_length=256", "max_length=128")
    assert encode_knowledge(cfg, DAY1, encoder=other, progress=False, spark=spark)["encoded"] == 1
    assert set(lake.read_partition(KNOWLEDGE_VECTORS, DAY1)["encoder_id"]) == {other.encoder_id}


def test_bad_assignments_are_clear_errors(spark, cfg, lake, encoder):
    write_day(lake, DAY1, [row("user", "1", "likes noir"), row("item", "10", " \t\x1c ")])
    with pytest.raises(EncodingError, match=r"knowledge/assigned/dt=1998-01-01.*encode_text is empty for 1 rows.*'10'"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    write_day(lake, DAY1, [row("user", "1", "likes noir"), row("item", "999", "an item nobody has")])
    with pytest.raises(EncodingError, match=r"1 knowledge rows for unknown items.*\['999'\]"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    write_day(lake, DAY1, [row("user", "1", "a"), row("user", "1", "b")])
    with pytest.raises(EncodingError, match=r"more than one row per entity for \[\{'entity_kind': 'user', 'entity_id': '1'\}\]"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    assert not lake.has_partition(KNOWLEDGE_VECTORS, DAY1)


def test_each_row_is_its_assignment_with_the_vector_of_its_text(spark, cfg, lake, encoder):
    """What the in-memory step wrote before issue 28 (compared row by row, old against new, before it was removed):
    the assignment's row, its text's own vector, no prompt hash an empty list, a missing as_of null."""
    assigned = [row("user", "1", "likes noir"), row("user", "2", "Ünïcode ✓ text  "), row("item", "10", "a comedy"),
                row("item", "11", "a comedy", as_of=None), {**row("item", "12", "no hashes"), "prompt_hashes": None}]
    write_day(lake, DAY1, assigned, items=("10", "11", "12"))
    # A lake from before: its table created by the in-memory step (pyiceberg, from pandas), now written by Spark.
    lake.write_partition(pd.DataFrame({
        "entity_kind": ["user"], "entity_id": ["1"], "vector": [np.zeros(384, np.float32)], "prompt_hashes": [["h"]],
        "as_of": pd.array([None], "Int64"), "text_hash": ["x"], "encoder_id": [encoder.encoder_id]}), KNOWLEDGE_VECTORS,
        DAY2)
    record = encode_knowledge(cfg, DAY1, encoder=encoder, progress=False, spark=spark)
    assert {k: record[k] for k in ("rows", "users", "items", "unique_texts", "cache_hits", "encoded", "dim")} == {
        "rows": 5, "users": 2, "items": 3, "unique_texts": 4, "cache_hits": 0, "encoded": 4, "dim": 384}
    out = lake.read_partition(KNOWLEDGE_VECTORS, DAY1).sort_values(["entity_kind", "entity_id"], ignore_index=True)
    assert [(f.name, str(f.field_type)) for f in lake.load_table(KNOWLEDGE_VECTORS).schema().fields] == [
        ("entity_kind", "string"), ("entity_id", "string"), ("vector", "list<float>"),
        ("prompt_hashes", "list<string>"), ("as_of", "long"), ("text_hash", "string"), ("encoder_id", "string"),
        ("dt", "date")]
    expected = pd.DataFrame(assigned).sort_values(["entity_kind", "entity_id"], ignore_index=True)
    assert out[["entity_kind", "entity_id"]].values.tolist() == expected[["entity_kind", "entity_id"]].values.tolist()
    assert [list(h) for h in out["prompt_hashes"]] == [["h-item10"], ["h-item11"], [], ["h-user1"], ["h-user2"]]
    assert out["as_of"].astype("Int64").tolist() == [100, pd.NA, 100, 100, 100]
    assert out["text_hash"].tolist() == [text_hash(t) for t in expected["encode_text"]]
    np.testing.assert_allclose(np.stack(out["vector"]), encoder.encode(expected["encode_text"].tolist(), progress=False),
                               atol=1e-5)
