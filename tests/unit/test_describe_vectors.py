"""The publish-side check of a vectors file: each bad shape is refused naming the file, column and rule."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reki_core.storage.publish import PublishError, describe_vectors


def vectors_file(ids, kinds=None, vectors=None) -> bytes:
    n = len(ids)
    table = pa.table({"entity_kind": pa.array(kinds or ["user"] * n, pa.string()),
                      "entity_id": pa.array(ids, pa.string()),
                      "vector": pa.array(vectors or [[0.5, 1.0]] * n, pa.list_(pa.float32()))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_a_good_file_is_described():
    described = describe_vectors("user_vectors.parquet", vectors_file(["1", "2"]))
    assert described["rows"] == 2 and described["dim"] == 2


@pytest.mark.parametrize("data, words", [
    (vectors_file(["1", None, "2"]), "column 'entity_id' has 1 null rows"),
    (vectors_file(["1", "1"]), "duplicate (entity_kind, entity_id) rows"),
    (vectors_file(["1", "2"], kinds=["user", None]), "column 'entity_kind' has 1 null rows"),
    (vectors_file(["1"], vectors=[[float("nan"), 1.0]]), "column 'vector' has NaN or infinite values"),
    (vectors_file(["1", "2"], vectors=[[1.0, 2.0], [1.0]]), "column 'vector' must have one non-zero length"),
    (b"PAR1 not parquet", "not a readable Parquet file"),
], ids=["null-id", "duplicate", "null-kind", "nan", "ragged", "unreadable"])
def test_bad_vectors_files_are_refused_by_name(data, words):
    with pytest.raises(PublishError) as err:
        describe_vectors("user_vectors.parquet", data)
    assert str(err.value).startswith("user_vectors.parquet: ") and words in str(err.value)


def test_a_file_is_checked_batch_by_batch_across_its_batches(tmp_path):
    path = tmp_path / "user_vectors.parquet"
    path.write_bytes(vectors_file(["1", "2", "3"]))
    assert describe_vectors("user_vectors.parquet", path, batch_rows=1) == \
        describe_vectors("user_vectors.parquet", path.read_bytes())
    with pytest.raises(PublishError, match="duplicate"):  # the two rows of "1" are two batches apart
        describe_vectors("user_vectors.parquet", vectors_file(["1", "2", "1"]), batch_rows=1)
    with pytest.raises(PublishError, match=r"one non-zero length, has 1\.\.2"):
        describe_vectors("user_vectors.parquet", vectors_file(["1", "2"], vectors=[[1.0, 2.0], [1.0]]), batch_rows=1)
