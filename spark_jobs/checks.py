"""A gate's rules evaluated in Spark and recorded for the gate (`reki_core/quality/recorded.py` reads them).

A job flags each row with one boolean column per rule (`_<rule>`: true where the row breaks it); `rule_checks`
counts each rule over every row and collects at most a few offending rows per broken rule, and `fingerprint` sums
a digest of the checked rows, so the gate can tell the partition it validates is the one checked. The driver
collects counts and those few rows only.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from spark_jobs.common import cache

EXAMPLES_PER_RULE = 5  # offending rows recorded per broken rule


def fingerprint(rows: DataFrame, columns: Iterable[str]) -> dict:
    """rows and a sum over the rows' digests of `columns` (`reki_core.quality.recorded.row_digest`: non-null values as
    text, joined by a newline)."""
    text = [F.col(c).cast("string") for c in columns]
    digest = F.conv(F.substring(F.sha2(F.concat_ws("\n", *text), 256), 1, 8), 16, 10)
    stats = rows.agg(F.count(F.lit(1)).alias("rows"), F.sum(digest.cast("long")).alias("digest")).first()
    return {"rows": int(stats["rows"]), "digest": int(stats["digest"] or 0)}


def rule_checks(flagged: DataFrame, rules: Iterable[str], columns: list[str | Column], order: list[str],
                limit: int = EXAMPLES_PER_RULE) -> dict:
    """`failed`: the count of rows breaking each broken rule of `rules` (`flagged` has a boolean `_<rule>` per rule);
    `examples`: `columns` of at most `limit` of those rows per rule (first in `order`), each row once (a row twice in
    the sample would break a uniqueness rule there only)."""
    rules = list(rules)
    flagged = cache(flagged.withColumn("_row", F.monotonically_increasing_id()))
    counts = flagged.agg(*[F.sum(F.col(f"_{r}").cast("long")).alias(r) for r in rules]).first()
    failed = {r: int(counts[r] or 0) for r in rules if counts[r]}
    examples: dict[int, dict] = {}
    for rule in failed:
        for row in flagged.where(F.col(f"_{rule}")).select("_row", *columns).orderBy(*order, "_row").limit(limit).collect():
            examples[row["_row"]] = {k: v for k, v in row.asDict().items() if k != "_row"}
    return {"failed": failed, "examples": list(examples.values())}
