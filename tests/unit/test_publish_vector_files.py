"""The vector files `publish_from_lake` publishes, written from the lake batch by batch: the same rows whatever the
batch size, and the same bytes (so the same sha256 and object names) each time for one batch size."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reki_core.storage.lake import Lake
from reki_core.storage.publish import _write_vector_files, describe_vectors

DAY = dt.date(1998, 3, 31)


def test_vector_files_hold_each_kinds_rows_in_order_whatever_the_batch_size(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    rng = np.random.default_rng(0)
    kinds = ["user"] * 5 + ["item"] * 7 + ["user_group"] * 2
    augmented = pa.table({"entity_kind": kinds, "entity_id": [f"e{i}" for i in range(len(kinds))],
                          "vector": pa.array(rng.normal(size=(len(kinds), 4)).tolist(), pa.list_(pa.float32())),
                          "model_version": ["m1"] * len(kinds), "as_of": pa.array([1] * 13 + [None], pa.int64())})
    lake.write_partition(augmented, "vectors/augmented", DAY)

    written = {}
    for rows, folder in ((3, "small"), (10**6, "whole"), (3, "small-again")):
        (tmp_path / folder).mkdir()
        paths, versions = _write_vector_files(lake, DAY, rows, tmp_path / folder)
        assert versions == ["m1"]
        written[folder] = {name: path.read_bytes() for name, path in paths.items()}
        if folder == "small":
            assert pq.ParquetFile(paths["user_vectors.parquet"]).metadata.num_row_groups > 1  # written per batch

    for name, kind in (("user_vectors.parquet", "user"), ("item_vectors.parquet", "item")):
        small, whole = (pq.read_table(pa.BufferReader(written[f][name])) for f in ("small", "whole"))
        assert small.equals(whole)
        assert small.schema.field("vector").type == pa.list_(pa.float32())
        part = augmented.filter(pc.starts_with(augmented.column("entity_kind"), kind))
        assert small.to_pylist() == part.to_pylist()  # the kind's rows (its groups too), in the lake's order
        assert describe_vectors(name, written["small"][name])["rows"] == part.num_rows
    assert written["small"] == written["small-again"]  # same batches, same bytes: a retried publish is a no-op
