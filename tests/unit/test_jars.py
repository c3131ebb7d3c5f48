"""The pinned connector jars: downloaded once into the shared cache, accepted only with the pinned sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from reki_core import jars
from reki_core.jars import JarError, ensure_jars, jar_paths, pinned_jars


def _repository(tmp_path: Path, body: bytes, pinned: bytes | None = None) -> Path:
    """A file:// Maven repository with one jar, and a lock file pinning `pinned` (default: the jar's own hash)."""
    repo = tmp_path / "repo"
    target = repo / "org/example/demo/1.0/demo-1.0.jar"
    target.parent.mkdir(parents=True)
    target.write_bytes(body)
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"repository": repo.as_uri(), "jars": [
        {"coordinates": "org.example:demo:1.0", "sha256": hashlib.sha256(pinned or body).hexdigest()}]}))
    return lock


def test_a_pinned_jar_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(jars.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(jars.REPOSITORY_ENV, raising=False)
    lock = _repository(tmp_path, b"PK demo jar")
    seen = []
    [path] = ensure_jars(report=seen.append, lock_file=lock)
    assert path == tmp_path / "cache/org/example/demo/1.0/demo-1.0.jar"
    assert path.read_bytes() == b"PK demo jar" and seen == ["downloading org.example:demo:1.0"]
    (tmp_path / "repo").rename(tmp_path / "gone")  # a second set-up (another clone) needs no network
    assert ensure_jars(report=seen.append, lock_file=lock) == [path] and len(seen) == 1
    assert jar_paths(lock) == [path]


def test_a_jar_with_another_hash_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(jars.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(jars.REPOSITORY_ENV, raising=False)
    lock = _repository(tmp_path, b"tampered", pinned=b"the real one")
    with pytest.raises(JarError, match="org.example:demo:1.0 .* has sha256 .* pins"):
        ensure_jars(lock_file=lock)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*.jar*"))


def test_a_cached_jar_changed_on_disk_is_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv(jars.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(jars.REPOSITORY_ENV, raising=False)
    lock = _repository(tmp_path, b"PK demo jar")
    [path] = ensure_jars(lock_file=lock)
    path.write_bytes(b"corrupted")
    assert ensure_jars(lock_file=lock) == [path] and path.read_bytes() == b"PK demo jar"


def test_missing_jars_say_to_run_setup(tmp_path, monkeypatch):
    monkeypatch.setenv(jars.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(JarError, match=r"org.example:demo:1.0 .*run `reki setup`"):
        jar_paths(_repository(tmp_path, b"x"))


def test_hadoop_aws_matches_the_hadoop_inside_pyspark():
    """s3a's classes must be the Hadoop version pyspark's own hadoop-client jars are."""
    import pyspark

    client = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    assert client, "pyspark's jars/ has no hadoop-client-api"
    hadoop = client[0].name.removeprefix("hadoop-client-api-").removesuffix(".jar")
    pinned = {f"{j.group}:{j.artifact}": j.version for j in pinned_jars()[0]}
    assert pinned["org.apache.hadoop:hadoop-aws"] == hadoop
    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    assert any(a.startswith(f"org.apache.iceberg:iceberg-spark-runtime-{spark_minor}_") for a in pinned), pinned
