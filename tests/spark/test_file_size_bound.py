"""Every table's data files are bounded by `lake.target_file_mb` (Iceberg's write.target-file-size-bytes), whether
Spark or pyiceberg writes them: a Python reader streams a table a file at a time but pyarrow reads a file ahead of its
batches, so the file size is what bounds a reader's memory, not the day's size."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from pyspark.sql import functions as F

from reki_core.storage.lake import TARGET_FILE_SIZE, Lake
from spark_jobs.common import write_partition

DAY = dt.date(1998, 1, 1)
ROWS = 6000  # 1 KiB of hex each, about half of it after compression: several 1 MiB files


def _data_files(lake: Lake, dataset: str) -> list[int]:
    return [task.file.file_size_in_bytes for task in lake.load_table(dataset).scan().plan_files()]


def test_a_spark_write_rolls_its_files_at_the_target_size(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"), target_file_mb=1)
    hex_text = F.concat(*[F.sha2(F.concat(F.col("id").cast("string"), F.lit(f"-{i}")), 256) for i in range(16)])
    rows = spark.range(ROWS).select(F.col("id").cast("string").alias("text_hash"), hex_text.alias("encode_text"))
    write_partition(rows.coalesce(1), lake, "embeddings/misses", DAY)  # one task: only the target can split it
    sizes = _data_files(lake, "embeddings/misses")
    assert lake.load_table("embeddings/misses").properties[TARGET_FILE_SIZE] == str(2**20)
    assert len(sizes) >= 3 and max(sizes) < 1.5 * 2**20, sizes
    assert lake.read_partition("embeddings/misses", DAY)["text_hash"].nunique() == ROWS


def test_a_pyiceberg_write_rolls_its_files_at_the_target_size(tmp_path):
    import secrets

    lake = Lake(str(tmp_path / "lake"), target_file_mb=1)
    texts = [secrets.token_hex(512) for _ in range(ROWS)]
    lake.write_partition(pa.table({"item_id": pa.array([str(i) for i in range(ROWS)]), "title": texts}),
                         "features/items", DAY)
    sizes = _data_files(lake, "features/items")
    assert lake.load_table("features/items").properties[TARGET_FILE_SIZE] == str(2**20)
    assert len(sizes) >= 3 and max(sizes) < 1.5 * 2**20, sizes
    back = lake.read_partition("features/items", DAY)
    assert dict(zip(back["item_id"], back["title"])) == dict(zip(map(str, range(ROWS)), texts))
