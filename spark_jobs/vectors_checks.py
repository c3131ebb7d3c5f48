"""The vectors gate's rules over `vectors/augmented/dt=D` (written by the Python task `augment`).

Reads day D of `vectors/augmented`, the `features/user_history` state's user ids, `features/items`' item ids and
`knowledge/assigned`'s keys; joins the vectors with the entities that must have one (`user:<id>`, `item:<id>`) and
flags each row: a key twice, an entity without a vector (tolerated up to `llm.max_failure_rate`) and one whose
knowledge was assigned (lost on the way), a vector for no expected entity, the wrong dimension, a non-finite value.
Records in its run record (`_runs/dt=D/vectors_checks.json`, `checks`) the counts per rule, a few offending rows, the
number of model versions, and a fingerprint of the vectors' ids and facts;
`reki_core.quality.vectors.gate_vectors` runs its suite on those.
"""

from __future__ import annotations

import sys

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from reki_core.quality.vectors import ASSIGNED, AUGMENTED, COLUMNS, FINGERPRINTED, RULES, STEP
from spark_jobs.checks import fingerprint, rule_checks
from spark_jobs.common import cache, releases_cache

USER_HISTORY, ITEMS = "features/user_history", "features/items"


def vector_facts(vectors: DataFrame) -> DataFrame:
    """entity_kind, entity_id, model_version, dim, finite of each vector (a null value is not finite; a null vector
    has dimension 0 and nothing non-finite)."""
    finite = F.forall("vector", lambda x: x.isNotNull() & ~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))))
    return vectors.select(F.col("entity_kind").cast("string").alias("entity_kind"),
                          F.col("entity_id").cast("string").alias("entity_id"),
                          F.col("model_version").cast("string").alias("model_version"),
                          F.coalesce(F.size("vector"), F.lit(0)).cast("long").alias("dim"),
                          F.coalesce(finite, F.lit(True)).alias("finite"))


def key(kind: Column, entity_id: str) -> Column:
    """`<entity_kind>:<entity_id>`."""
    return F.concat(kind, F.lit(":"), F.col(entity_id).cast("string"))


def entity_flags(facts: DataFrame, user_ids: DataFrame, item_ids: DataFrame, assigned: DataFrame, dim: int) -> DataFrame:
    """One row per expected or present entity (`COLUMNS`), with one `_<rule>` flag per rule."""
    present = facts.select(key(F.col("entity_kind"), "entity_id").alias("key"), "dim", "finite", "model_version",
                           F.lit(True).alias("_present"))
    expected = user_ids.select(key(F.lit("user"), "user_id").alias("key")).unionByName(
        item_ids.select(key(F.lit("item"), "item_id").alias("key"))).withColumn("_expected", F.lit(True))
    knowledge = assigned.select(key(F.col("entity_kind").cast("string"), "entity_id").alias("key")).distinct().withColumn(
        "_assigned", F.lit(True))
    merged = expected.join(present, "key", "full_outer").join(knowledge, "key", "left").select(
        "key", F.col("_present").isNotNull().alias("has_vector"), F.col("_expected").isNotNull().alias("expected"),
        F.col("_assigned").isNotNull().alias("_assigned"), "dim", "finite", "model_version")
    lost = ~F.col("has_vector") & F.col("_assigned")
    merged = merged.withColumn("lost_vector", F.when(lost, F.col("key")))
    flags = {
        "key_unique": F.col("key").isNotNull() & (F.count(F.lit(1)).over(Window.partitionBy("key")) > 1),
        "has_vector": ~F.col("has_vector"),
        "lost_vector": lost,
        "expected": ~F.col("expected"),
        "dim": F.coalesce(F.col("dim") != F.lit(dim), F.lit(False)),
        "finite": F.coalesce(~F.col("finite"), F.lit(False)),
    }
    assert set(flags) == set(RULES), "every rule of the gate has its flag"
    return merged.select(*COLUMNS, *[flag.alias(f"_{rule}") for rule, flag in flags.items()])


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from spark_jobs.common import read_partition

    facts = cache(vector_facts(read_partition(spark, lake, AUGMENTED, day)))
    users = read_partition(spark, lake, USER_HISTORY, day).select("user_id")
    items = read_partition(spark, lake, ITEMS, day).select("item_id")
    assigned = read_partition(spark, lake, ASSIGNED, day).select("entity_kind", "entity_id")
    flagged = cache(entity_flags(facts, users, items, assigned, cfg.model.expert_output_dim))
    found = rule_checks(flagged, RULES, COLUMNS, ["key"])
    versions = flagged.where(F.col("model_version").isNotNull()).agg(
        F.countDistinct("model_version").alias("n")).first()["n"]
    checks = {"rows": flagged.count(), **found, "model_versions": int(versions),
              "fingerprint": fingerprint(facts, FINGERPRINTED)}
    return {"vectors": checks["fingerprint"]["rows"], "entities": checks["rows"], "checks": checks}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
