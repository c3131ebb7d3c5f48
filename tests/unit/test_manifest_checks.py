"""The lookup client's check of a manifest it was pointed at (a pinned version has no checksum in `latest`)."""

from __future__ import annotations

import json

import pytest

from reki_core.serving.vector_store import VectorStoreError, _checked_manifest

URI = "s3://b/movielens/vectors/v=1998-03-31_r/manifest.json"
GOOD = {"version": "1998-03-31_r", "scenario": "movielens", "row_counts": {"user": 1, "item": 1},
        "files": {"user_vectors.parquet": {}, "item_vectors.parquet": {}}}


def test_the_manifest_asked_for_passes():
    assert _checked_manifest(URI, json.dumps(GOOD).encode(), "movielens", "1998-03-31_r") == GOOD


@pytest.mark.parametrize("body, words", [
    (b'{"version": "1998-03-31_r", "sce', "not valid JSON"),
    (b"[1, 2]", "not a manifest"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "row_counts"}).encode(), "field 'row_counts' is missing"),
    (json.dumps(dict(GOOD, version="1998-03-30_r")).encode(), "describes version '1998-03-30_r'"),
    (json.dumps(dict(GOOD, scenario="books")).encode(), "of scenario 'books'"),
    (json.dumps(dict(GOOD, files={"user_vectors.parquet": {}})).encode(), "does not list ['item_vectors.parquet']"),
], ids=["truncated", "not-an-object", "missing-field", "other-version", "other-scenario", "missing-file"])
def test_a_wrong_manifest_is_refused_by_name(body, words):
    with pytest.raises(VectorStoreError) as err:
        _checked_manifest(URI, body, "movielens", "1998-03-31_r")
    assert str(err.value).startswith(URI + ": ") and words in str(err.value)
