"""Knowledge vectors: `features/knowledge_vectors/dt=D`, one vector per assigned user and item.

`knowledge/assigned/dt=D` joined by text hash with the embedding cache `embeddings/cache` (the encoder's rows), after
the job `encoding_misses` and the Python task `encode` (`reki_core.encoding.encode_misses`) put every text of the day
in it. Columns: entity_kind, entity_id, vector (list<float32>), prompt_hashes (an empty list for none), as_of (null
where upstream has none), text_hash, encoder_id. An assigned text without a vector in the cache fails the job, named.

Reads `knowledge/assigned/dt=D`, the cache. Writes `features/knowledge_vectors/dt=D`; its run-log step is
`knowledge_vectors`.
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from reki_core.encoding import KNOWLEDGE_VECTORS as DATASET
from spark_jobs.common import cache, releases_cache

STEP = "knowledge_vectors"


def transform(assigned: DataFrame, cached: DataFrame, encoder_id: str) -> DataFrame:
    """The dataset's columns for each assigned row, `vector` null where `cached` (the encoder's cache rows) has
    none."""
    from spark_jobs.encoding_misses import with_text_hash

    rows = with_text_hash(assigned)
    vectors = cached.where(F.col("encoder_id") == F.lit(encoder_id)).join(
        rows.select("text_hash").distinct(), "text_hash", "left_semi")
    # One vector per hash: an encoder gives a text one vector, so a repeated append (a race) holds the same one.
    vectors = vectors.groupBy("text_hash").agg(F.first("vector").alias("vector"))
    hashes = F.col("prompt_hashes").cast("array<string>")
    return rows.join(vectors, "text_hash", "left").select(
        F.col("entity_kind").cast("string").alias("entity_kind"), F.col("entity_id").cast("string").alias("entity_id"),
        F.col("vector").cast("array<float>").alias("vector"),
        F.coalesce(hashes, F.array().cast("array<string>")).alias("prompt_hashes"),
        F.col("as_of").cast("bigint").alias("as_of"), "text_hash", F.lit(encoder_id).alias("encoder_id"))


@releases_cache
def run(spark, cfg, lake, day, encoder_id: str | None = None) -> dict:
    """`encoder_id`: the encoder's (default: the configured one's, `encoder_id_of(cfg)`)."""
    from reki_core.encoding import ASSIGNED, EMBEDDING_CACHE, EncodingError, encoder_id_of
    from spark_jobs.common import empty_frame, read_partition, table_of, write_partition

    encoder_id = encoder_id or encoder_id_of(cfg)
    assigned = read_partition(spark, lake, ASSIGNED, day)
    if lake.load_table(EMBEDDING_CACHE) is None:
        from pyspark.sql import types as T

        cached = empty_frame(spark, T.StructType([T.StructField("text_hash", T.StringType()),
                                                  T.StructField("encoder_id", T.StringType()),
                                                  T.StructField("vector", T.ArrayType(T.FloatType()))]))
    else:
        cached = spark.table(table_of(spark, lake, EMBEDDING_CACHE))
    out = cache(transform(assigned, cached, encoder_id))
    stats = out.agg(F.count(F.lit(1)).alias("rows"),
                    F.count(F.when(F.col("entity_kind") == F.lit("user"), 1)).alias("users"),
                    F.count(F.when(F.col("entity_kind") == F.lit("item"), 1)).alias("items"),
                    F.count(F.when(F.col("vector").isNull(), 1)).alias("without_vector")).first()
    if stats["without_vector"]:
        examples = [r.asDict() for r in out.where(F.col("vector").isNull()).select("entity_kind", "entity_id")
                    .orderBy("entity_kind", "entity_id").limit(5).collect()]
        raise EncodingError(
            f"{lake.describe(ASSIGNED, day)}: {stats['without_vector']} rows have no vector of encoder {encoder_id!r} "
            f"in {lake.describe(EMBEDDING_CACHE)}, e.g. {examples}: run the jobs of the day in order "
            "(encoding_misses, encode, knowledge_vectors)")
    write_partition(out.orderBy("entity_kind", "entity_id"), lake, DATASET, day)
    return {"rows": int(stats["rows"]), "users": int(stats["users"]), "items": int(stats["items"]),
            "encoder_id": encoder_id}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
