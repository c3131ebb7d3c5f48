"""The lookup client against a real SeaweedFS: verified loads, O(1) lookups, fallbacks, gap-free refresh."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from published_vectors import fresh_bucket_config, reader, vectors_parquet, version_files, writer
from reki_core.serving.vector_store import ChecksumMismatch, VectorStore, VectorStoreError
from reki_core.storage.object_store import make_s3_client
from reki_core.storage.publish import publish_version

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_loads_latest_with_a_read_only_identity_and_looks_up_batches(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, users, items = version_files(seed=3)
    published = publish_version(cfg, "1998-03-30", "r1", files, {}, **writer(seaweed))

    store = VectorStore.from_config(cfg, **reader(seaweed))
    assert store.version == published["version"]
    assert (store.user_dim, store.item_dim) == (32, 32)
    user_vecs, item_vecs = store.lookup(["u3", "u0", "nobody"], ["i7", "i29"])
    assert user_vecs.dtype == np.float32 and user_vecs.shape == (3, 32) and item_vecs.shape == (2, 32)
    np.testing.assert_array_equal(user_vecs[0], users["u3"])
    np.testing.assert_array_equal(user_vecs[1], users["u0"])
    np.testing.assert_array_equal(user_vecs[2], np.zeros(32, np.float32))  # unknown, no group vectors: zeros
    np.testing.assert_array_equal(item_vecs[1], items["i29"])
    assert (store.counts.found, store.counts.zero_fallback, store.counts.group_fallback) == (4, 1, 0)
    assert store.counts.by_kind["user"]["zero_fallback"] == 1


def test_unknown_ids_fall_back_to_their_group_vector(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    comedy = np.full(8, 0.5, np.float32)
    items_bytes, items = vectors_parquet("item", ["i1", "i2"], dim=8, seed=1, groups={"g_comedy": comedy})
    users_bytes, users = vectors_parquet("user", ["u1"], dim=8, seed=2)
    files = {"user_vectors.parquet": users_bytes, "item_vectors.parquet": items_bytes, "adaptor.pt": b"w"}
    published = publish_version(cfg, "1998-03-30", "r1", files, {}, **writer(seaweed))
    assert published["manifest"]["has_group_vectors"] is True
    assert published["manifest"]["row_counts"]["item"] == 3

    store = VectorStore.from_config(cfg, **reader(seaweed))
    got = store.lookup_items(["i2", "new_item", "other_new", "g_comedy"], groups=["g_x", "g_comedy", None, None])
    np.testing.assert_array_equal(got[0], items["i2"])
    np.testing.assert_array_equal(got[1], comedy)
    np.testing.assert_array_equal(got[2], np.zeros(8, np.float32))
    np.testing.assert_array_equal(got[3], np.zeros(8, np.float32))  # a group id is not an entity id
    assert store.counts.by_kind["item"] == {"found": 1, "group_fallback": 1, "zero_fallback": 2}


def test_corrupted_object_is_detected_by_checksum(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files, _, _ = version_files(seed=3)
    published = publish_version(cfg, "1998-03-30", "r1", files, {}, **writer(seaweed))
    key = published["manifest"]["files"]["item_vectors.parquet"]["key"]
    other, _ = vectors_parquet("item", [f"i{i}" for i in range(30)], seed=99)  # same shape, other values
    make_s3_client(seaweed.endpoint_url, seaweed.writer_key, seaweed.writer_secret).put_object(
        Bucket=cfg.object_store.bucket, Key=key, Body=other)
    with pytest.raises(ChecksumMismatch, match=r"item_vectors\.[0-9a-f]{16}\.parquet.*does not match the manifest"):
        VectorStore.from_config(cfg, **reader(seaweed))


def test_pinned_version_and_refresh_swap_without_a_gap(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    files1, users1, _ = version_files(seed=1)
    files2, users2, _ = version_files(seed=2)
    v1 = publish_version(cfg, "1998-03-30", "r1", files1, {}, **writer(seaweed))["version"]

    store = VectorStore.from_config(cfg, **reader(seaweed))
    pinned = VectorStore.from_config(cfg, version=f"v={v1}", **reader(seaweed))
    assert store.refresh() is False  # latest unchanged
    v2 = publish_version(cfg, "1998-03-31", "r1", files2, {}, **writer(seaweed))["version"]

    seen, stop = set(), threading.Event()

    def reader_loop():
        while not stop.is_set():
            vec = store.lookup_users(["u5"])[0]
            if np.array_equal(vec, users1["u5"]):
                seen.add("v1")
            elif np.array_equal(vec, users2["u5"]):
                seen.add("v2")
            else:
                seen.add("other")

    thread = threading.Thread(target=reader_loop)
    thread.start()
    try:
        assert store.refresh() is True
    finally:
        stop.set()
        thread.join()
    assert store.version == v2
    assert seen and seen <= {"v1", "v2"}  # never a half-loaded or zero answer during the swap
    np.testing.assert_array_equal(store.lookup_users(["u5"])[0], users2["u5"])
    assert pinned.refresh() is False and pinned.version == v1
    np.testing.assert_array_equal(pinned.lookup_users(["u5"])[0], users1["u5"])


def test_nothing_published_and_wrong_credentials_are_clear(tmp_path, seaweed):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    with pytest.raises(VectorStoreError, match="_LATEST.json does not exist: nothing published yet"):
        VectorStore.from_config(cfg, **reader(seaweed))
    from reki_core.storage.s3_access import ObjectStoreError

    with pytest.raises(ObjectStoreError, match="SignatureDoesNotMatch.*secret key does not match"):
        VectorStore.from_config(cfg, access_key=seaweed.reader_key, secret_key="not-the-secret")
