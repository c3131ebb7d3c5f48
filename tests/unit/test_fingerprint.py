"""Fingerprints of model folders: every byte of the model counts, download-tool state does not, and big
weights are read again only when they change."""

from reki_core import fingerprint
from reki_core.fingerprint import folder_fingerprint


def _model(folder):
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    weights = folder / "model-00001-of-00002.safetensors"
    weights.write_bytes(bytes(range(256)) * 40_000)
    return weights


def test_one_changed_byte_anywhere_in_the_weights_changes_it(tmp_path):
    weights = _model(tmp_path / "m")
    first = folder_fingerprint(tmp_path / "m")
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 1  # a small fine-tune: one tensor, far from the start, middle and end
    weights.write_bytes(bytes(data))
    assert folder_fingerprint(tmp_path / "m") != first


def test_download_tool_state_is_left_out(tmp_path):
    _model(tmp_path / "m")
    first = folder_fingerprint(tmp_path / "m")
    meta = tmp_path / "m" / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "model.safetensors.metadata").write_text("a1b2\n1764230400.123\n")  # rewritten on every re-download
    assert folder_fingerprint(tmp_path / "m") == first


def test_with_a_cache_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    weights = _model(tmp_path / "m")
    cache = tmp_path / "state" / "files.json"
    reads = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: reads.append(path.name) or real(path))
    first = folder_fingerprint(tmp_path / "m", cache)
    assert sorted(reads) == ["config.json", weights.name]
    reads.clear()
    assert folder_fingerprint(tmp_path / "m", cache) == first and reads == []
    weights.write_bytes(bytes(reversed(range(256))) * 40_000)  # same size, new contents
    assert folder_fingerprint(tmp_path / "m", cache) != first and reads == [weights.name]
    assert folder_fingerprint(tmp_path / "m", cache) == folder_fingerprint(tmp_path / "m")  # the cache changes nothing
