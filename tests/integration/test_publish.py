"""Publishing against a real SeaweedFS with enforced credentials (writer + read-only reader)."""

from __future__ import annotations

from pathlib import Path

import datetime as dt
import hashlib
import json
import threading

import pytest

from published_vectors import fresh_bucket_config, gate, reader, version_files, writer
from reki_core.storage import publish
from reki_core.storage.publish import PublishError, apply_retention, publish_version
from reki_core.storage.s3_access import ObjectStore, ObjectStoreError, resolve_s3_access

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _store(cfg, creds) -> ObjectStore:
    return ObjectStore(resolve_s3_access(cfg, **creds))


def _latest(cfg, seaweed):
    pointer, _ = publish.read_latest(_store(cfg, reader(seaweed)), cfg.scenario.name)
    return pointer


def test_round_trip_manifest_lists_every_file_with_checksums(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, users, items = version_files(seed=1)
    result = publish_version(cfg, "1998-03-30", "scheduled__1998-03-30T00:00:00+00:00", files,
                             {"gates": [gate("raw"), gate("vectors")], "source_partitions": {"raw/interactions": "1998-03-30"},
                              "metrics": {"auc": 0.71}}, **writer(seaweed))

    assert result["version"] == "1998-03-30_scheduled__1998-03-30T00-00-00-00-00"
    assert result["uri"] == f"s3://{cfg.object_store.bucket}/movielens/vectors/v={result['version']}/"
    assert result["latest_moved"] is True

    store = _store(cfg, reader(seaweed))
    manifest, _ = store.get_json(f"movielens/vectors/v={result['version']}/manifest.json")
    assert set(manifest["files"]) == set(files) | {"quality_summary.json"}
    for name, entry in manifest["files"].items():
        body, _ = store.get(entry["key"])
        assert entry["size"] == len(body)
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["row_counts"] == {"user": len(users), "item": len(items)}
    assert manifest["vector_dim"] == {"user": 32, "item": 32}
    assert manifest["model_version"] == "m1"
    assert manifest["llm"]["model_id"] == cfg.llm.engine.model_id
    assert manifest["template_version"] == cfg.scenario.template_version
    assert manifest["encoder"] == cfg.encoding.encoder
    assert manifest["metrics"] == {"auc": 0.71}
    assert manifest["source_partitions"] == {"raw/interactions": "1998-03-30"}
    assert [g["gate"] for g in manifest["gates"]] == ["raw", "vectors"]
    assert manifest["code_version"]["package_version"]
    summary, _ = store.get_json(manifest["files"]["quality_summary.json"]["key"])
    assert manifest["files"]["quality_summary.json"]["key"].endswith(
        f"/quality_summary.{manifest['files']['quality_summary.json']['sha256'][:16]}.json")
    assert summary["all_passed"] is True and len(summary["gates"]) == 2

    pointer = _latest(cfg, seaweed)
    assert pointer["version"] == result["version"]
    assert pointer["manifest_uri"] == result["manifest_uri"]


def test_retry_with_same_content_is_a_no_op_and_different_content_is_refused(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files(seed=1)
    first = publish_version(cfg, "1998-03-30", "run1", files, {"gates": [gate("raw")]}, **writer(seaweed))
    again = publish_version(cfg, "1998-03-30", "run1", files, {"gates": [gate("raw")]}, **writer(seaweed))
    assert again["manifest"]["created_at"] == first["manifest"]["created_at"]
    # A retried task rewrites its run report (new timings): the version keeps the one it was published with.
    retried = publish_version(cfg, "1998-03-30", "run1", {**files, "run_report_1998-03-30.md": b"# retry"},
                              {"gates": [gate("raw")]}, **writer(seaweed))
    assert retried["manifest"]["created_at"] == first["manifest"]["created_at"]
    assert "run_report_1998-03-30.md" not in retried["manifest"]["files"]
    changed, _, _ = version_files(seed=2)
    with pytest.raises(PublishError, match="immutable"):
        publish_version(cfg, "1998-03-30", "run1", changed, {"gates": [gate("raw")]}, **writer(seaweed))


def test_failed_gate_or_bad_vectors_refuse_to_publish(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files()
    with pytest.raises(PublishError, match="quality gates failed: knowledge on knowledge"):
        publish_version(cfg, "1998-03-30", "r", files, {"gates": [gate("raw"), gate("knowledge", False)]}, **writer(seaweed))
    bad = dict(files, **{"item_vectors.parquet": files["user_vectors.parquet"]})
    with pytest.raises(PublishError, match="item_vectors.parquet: column 'entity_kind' has \\['user'\\]"):
        publish_version(cfg, "1998-03-30", "r", bad, {}, **writer(seaweed))
    assert publish.list_versions(_store(cfg, writer(seaweed)), "movielens") == {}


def test_failure_before_manifest_leaves_no_visible_version_and_latest_unchanged(tmp_path, seaweed, monkeypatch):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files(seed=1)
    first = publish_version(cfg, "1998-03-30", "r1", files, {}, **writer(seaweed))

    def crash(*args, **kwargs):
        raise ConnectionError("injected: publisher died after uploading the vectors")

    real_put_manifest = publish._put_manifest
    monkeypatch.setattr(publish, "_put_manifest", crash)
    files2, _, _ = version_files(seed=2)
    with pytest.raises(ConnectionError):
        publish_version(cfg, "1998-03-31", "r2", files2, {}, **writer(seaweed))
    monkeypatch.setattr(publish, "_put_manifest", real_put_manifest)  # not undo(): that would restore AWS_* too

    store = _store(cfg, writer(seaweed))
    versions = publish.list_versions(store, "movielens")
    assert versions["1998-03-31_r2"]["complete"] is False  # vectors were uploaded...
    assert any(k.rsplit("/", 1)[-1].startswith("user_vectors.") for k in versions["1998-03-31_r2"]["keys"])
    assert publish.read_manifest(store, "movielens", "1998-03-31_r2") is None  # ...but no version exists
    assert _latest(cfg, seaweed)["version"] == first["version"]

    # Retention leaves a fresh half-written version alone (a publisher may still be uploading) ...
    assert "1998-03-31_r2" in apply_retention(cfg, **writer(seaweed))["kept"]
    # ... and deletes it once it is older than a day.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, minutes=1)
    outcome = apply_retention(cfg, now=later, **writer(seaweed))
    assert outcome["deleted_half_written"] == ["1998-03-31_r2"]
    assert set(publish.list_versions(store, "movielens")) == {first["version"]}


def test_backfill_publishes_without_moving_latest_back(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files(seed=1)
    newer = publish_version(cfg, "1998-03-31", "r1", files, {}, **writer(seaweed))
    backfill = publish_version(cfg, "1998-03-20", "backfill1", version_files(seed=2)[0], {}, **writer(seaweed))
    assert backfill["latest_moved"] is False
    assert backfill["latest"]["version"] == newer["version"]
    assert _latest(cfg, seaweed)["version"] == newer["version"]
    assert publish.read_manifest(_store(cfg, reader(seaweed)), "movielens", backfill["version"]) is not None
    # A rerun of the newest date moves latest to the rerun.
    rerun = publish_version(cfg, "1998-03-31", "r2", version_files(seed=3)[0], {}, **writer(seaweed))
    assert rerun["latest_moved"] is True
    assert _latest(cfg, seaweed)["version"] == "1998-03-31_r2"


def test_retention_keeps_newest_pinned_and_latest(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed, REKI__OBJECT_STORE__KEEP_VERSIONS="2",
                              REKI__OBJECT_STORE__PINNED_VERSIONS="['v=1998-03-01_r']")
    days = ["1998-03-01", "1998-03-02", "1998-03-03", "1998-03-04", "1998-03-05"]
    for i, day in enumerate(days):
        publish_version(cfg, day, "r", version_files(seed=i)[0], {}, apply_retention_after=False, **writer(seaweed))
    outcome = apply_retention(cfg, **writer(seaweed))
    assert outcome["deleted"] == ["1998-03-02_r", "1998-03-03_r"]
    remaining = publish.list_versions(_store(cfg, writer(seaweed)), "movielens")
    assert sorted(remaining) == ["1998-03-01_r", "1998-03-04_r", "1998-03-05_r"]
    assert all(v["complete"] for v in remaining.values())

    # A backfill outside the newest two survives its own publish (retention protects it) ...
    result = publish_version(cfg, "1998-02-15", "bf", version_files(seed=9)[0], {}, **writer(seaweed))
    assert "1998-02-15_bf" in result["retention"]["kept"]
    # ... and goes at the next run's retention.
    nxt = publish_version(cfg, "1998-03-06", "r", version_files(seed=10)[0], {}, **writer(seaweed))
    assert nxt["retention"]["deleted"] == ["1998-02-15_bf", "1998-03-04_r"]
    assert _latest(cfg, seaweed)["version"] == "1998-03-06_r"


def test_racing_publishers_end_with_one_consistent_latest(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    days = [f"1998-03-{d:02d}" for d in range(1, 9)]
    payloads = {day: version_files(seed=i, n_users=5, n_items=5)[0] for i, day in enumerate(days)}
    results, errors = {}, []
    start = threading.Barrier(len(days))

    def publisher(day):
        try:
            start.wait()
            results[day] = publish_version(cfg, day, "race", payloads[day], {}, apply_retention_after=False,
                                           **writer(seaweed))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(day,)) for day in reversed(days)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads), "a publisher hung"
    assert not errors, errors
    assert sorted(results) == days
    pointer = _latest(cfg, seaweed)
    assert pointer["version"] == "1998-03-08_race"
    # The pointer names a manifest that exists and matches the checksum it records.
    body, _ = _store(cfg, reader(seaweed)).get(pointer["manifest_key"])
    assert hashlib.sha256(body).hexdigest() == pointer["manifest_sha256"]
    assert json.loads(body)["version"] == pointer["version"]
    # Every racer's result agrees that latest is at least as new as its own version.
    assert all(r["latest"]["dt"] >= r["manifest"]["dt"] for r in results.values())


def test_racing_attempts_of_one_version_leave_every_manifest_file_intact(tmp_path, seaweed):
    """Four attempts of the same version at once, each with its own run report (timings differ between
    attempts): whichever manifest wins, every file it lists reads back with its checksum."""
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files(seed=3)
    attempts = [dict(files, **{"run_report.md": f"attempt {i}".encode()}) for i in range(4)]
    outcomes = []
    start = threading.Barrier(len(attempts))

    def attempt(payload):
        start.wait()
        try:
            outcomes.append(publish_version(cfg, "1998-03-09", "same", payload, {}, apply_retention_after=False,
                                            **writer(seaweed))["manifest"])
        except Exception as exc:  # a loser of the manifest race is refused; what matters is what it left
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt, args=(payload,)) for payload in attempts]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads) and len(outcomes) == len(attempts)
    store = _store(cfg, reader(seaweed))
    manifest = publish.read_manifest(store, "movielens", "1998-03-09_same")
    assert manifest is not None and any(isinstance(o, dict) for o in outcomes), outcomes
    for name, entry in manifest["files"].items():
        body, _ = store.get(entry["key"])
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], f"{name} changed under the published manifest"


@pytest.mark.parametrize("wrong, code, words", [
    ("key", "InvalidAccessKeyId", "access key id is unknown"),
    ("secret", "SignatureDoesNotMatch", "secret key does not match"),
])
def test_wrong_credentials_give_a_clear_error(tmp_path, seaweed, wrong, code, words):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    creds = {"access_key": "nosuchkey" if wrong == "key" else seaweed.writer_key,
             "secret_key": "wrong-secret" if wrong == "secret" else seaweed.writer_secret}
    with pytest.raises(ObjectStoreError) as info:
        publish_version(cfg, "1998-03-30", "r", version_files()[0], {}, **creds)
    message = str(info.value)
    assert info.value.code == code
    assert code in message and words in message
    assert creds["access_key"] in message and seaweed.endpoint_url in message
    assert creds["secret_key"] not in message


def test_missing_credentials_name_both_sources(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    with pytest.raises(ObjectStoreError, match="aws_default.*AWS_ACCESS_KEY_ID"):
        publish_version(cfg, "1998-03-30", "r", version_files()[0], {})


def test_credentials_from_environment(tmp_path, seaweed, monkeypatch):
    cfg = fresh_bucket_config(tmp_path, seaweed, REKI__OBJECT_STORE__ENDPOINT_URL="http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.writer_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.writer_secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint_url)  # the environment's endpoint wins over the config
    result = publish_version(cfg, "1998-03-30", "env", version_files()[0], {})
    assert result["latest_moved"] is True


def test_read_only_identity_reads_but_cannot_publish(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    published = publish_version(cfg, "1998-03-30", "r", version_files()[0], {}, **writer(seaweed))
    store = _store(cfg, reader(seaweed))
    manifest = publish.read_manifest(store, "movielens", published["version"])
    assert manifest["version"] == published["version"]
    with pytest.raises(ObjectStoreError, match="AccessDenied.*not allowed this operation") as info:
        publish_version(cfg, "1998-03-31", "r", version_files(seed=5)[0], {}, **reader(seaweed))
    assert seaweed.reader_key in str(info.value)
    with pytest.raises(ObjectStoreError, match="AccessDenied"):
        store.delete_many([published["manifest"]["files"]["adaptor.pt"]["key"]])
    assert _latest(cfg, seaweed)["version"] == published["version"]


def test_publish_from_lake_gathers_vectors_registry_files_and_gates(tmp_path, seaweed):
    import numpy as np
    import pandas as pd

    from reki_core.runlog import record_step
    from reki_core.storage.lake import Lake

    cfg = fresh_bucket_config(tmp_path, seaweed)
    lake = Lake(cfg.lake_uri)
    day = "1998-03-31"
    rng = np.random.default_rng(0)
    augmented = pd.DataFrame({
        "entity_kind": ["user"] * 4 + ["item"] * 6,
        "entity_id": [f"{k}{i}" for k, i in zip(["u"] * 4 + ["i"] * 6, list(range(4)) + list(range(6)))],
        "vector": [rng.normal(size=32).astype(np.float32) for _ in range(10)],
        "model_version": "1998-03-31-dcnv2-abc",
        "as_of": np.arange(10, dtype=np.int64),
    })
    lake.write_partition(augmented, "vectors/augmented", day)
    lake.write_partition(pd.DataFrame({"user_id": ["u0"], "item_id": ["i0"], "rating": [4], "ts": [1]}),
                         "raw/interactions", "1998-03-30")
    registry = Path(lake.root) / "models/registry/1998-03-31-dcnv2-abc"
    registry.mkdir(parents=True)
    (registry / "adaptor.pt").write_bytes(b"adaptor-state")
    (registry / "backbone.pt").write_bytes(b"backbone-state")
    (registry / "model_card.json").write_text(json.dumps({"test": {"with_knowledge": {"auc": 0.74}},
                                                          "auc_gain_vs_no_knowledge": 0.02}))
    record_step(lake, day, "land", {"success": True, "gates": [gate("raw_interactions")]})
    record_step(lake, day, "train_model", {"success": True, "gate": {"passed": True, "checks": []}})
    record_step(lake, day, "quality_vectors", {"success": True, "vectors_gate": gate("augmented_vectors")})

    result = publish.publish_from_lake(cfg, day, "manual__1", extra_files={"run_report_1998-03-31.md": b"# report"},
                                       **writer(seaweed))
    manifest = result["manifest"]
    assert set(manifest["files"]) == {"user_vectors.parquet", "item_vectors.parquet", "adaptor.pt", "backbone.pt",
                                      "model_card.json", "quality_summary.json", "run_report_1998-03-31.md"}
    assert manifest["row_counts"] == {"user": 4, "item": 6}
    assert manifest["model_version"] == "1998-03-31-dcnv2-abc"
    assert manifest["metrics"]["test"]["with_knowledge"]["auc"] == 0.74
    assert sorted((g["step"], g["gate"]) for g in manifest["gates"]) == [("land", "raw_interactions"),
                                                                        ("quality_vectors", "augmented_vectors")]
    assert manifest["source_partitions"] == {"raw/interactions": "1998-03-30", "vectors/augmented": day}
    # The snapshot each input table was read at: time travel to it finds the same rows after later commits.
    snapshots = manifest["source_snapshots"]
    assert set(snapshots) == {"raw/interactions", "vectors/augmented"}
    augmented_at = lake.load_table("vectors/augmented").scan(snapshot_id=snapshots["vectors/augmented"]["snapshot_id"])
    assert len(augmented_at.to_arrow()) == len(augmented)
    lake.write_partition(augmented.iloc[:1], "vectors/augmented", day)  # a later re-run of D
    assert len(lake.load_table("vectors/augmented").scan(
        snapshot_id=snapshots["vectors/augmented"]["snapshot_id"]).to_arrow()) == len(augmented)
    assert manifest["run_report_files"] == ["run_report_1998-03-31.md"]

    from reki_core.serving.vector_store import VectorStore

    store = VectorStore.from_config(cfg, **reader(seaweed))
    np.testing.assert_allclose(store.lookup_items(["i5"])[0], augmented["vector"][9])

    with pytest.raises(PublishError, match="no augmented vectors for 1998-04-01"):
        publish.publish_from_lake(cfg, "1998-04-01", "r", **writer(seaweed))
