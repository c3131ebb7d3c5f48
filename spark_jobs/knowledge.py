"""Knowledge assignment: `knowledge/assigned/dt=D`, one row per user and item with the text to encode.

Individual mode: a user's text is their history part and their prompt's answer, an item's its prompt's answer.
Collective mode: every item of `features/clusters` gets its item group's answer; every user in a user clustering
gets their history part, `Liked: <positive group's answer>` and (where they have one) `Disliked: <negative group's
answer>`, `prompt_hashes` in that order. Text parts are stripped (Python's whitespace), empty ones dropped, joined
with a newline. An entity whose answer is missing today keeps its row of the latest earlier assignment; without one
it is left out and counted.

The answers come from the knowledge store's parquet shards (reki_core/llm/store.py): the files its own listing
gives for the configured model and sampling version, read by Spark, kept to that model, sampling version and the
day's prompt hashes (a semi join), one answer per hash (a hash repeated by a re-published shard: the last file's,
in the store's sorted file order). Nothing of the day's size is collected to the driver.

Reads `prompts/dt=D`, the knowledge store, `features/clusters/dt=D` (collective), the previous day's
`knowledge/assigned`. Writes `knowledge/assigned/dt=D`; its run-log step is `llm_assign`.
"""

from __future__ import annotations

import functools
import operator
import sys

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.common import cache, empty_frame, releases_cache

DATASET = "knowledge/assigned"
STEP = "llm_assign"  # the run-log step (jobs_named): the report and the integration suites name it
PROMPTS = "prompts"
CLUSTERS = "features/clusters"
INDIVIDUAL_KINDS = ("user", "item")
GROUP_KINDS = ("item_group", "user_pos_group", "user_neg_group")
PROMPT_COLUMNS = ("prompt_hash", "entity_kind", "entity_id", "text")
ANSWER_COLUMNS = ("prompt_hash", "model_id", "sampling_version", "text")  # what a store shard must have
ASSIGNED_COLUMNS = ("entity_kind", "entity_id", "encode_text", "prompt_hashes", "as_of")

ANSWERS_SCHEMA = T.StructType([T.StructField(c, T.StringType()) for c in ANSWER_COLUMNS])
ASSIGNED_SCHEMA = T.StructType([
    T.StructField("entity_kind", T.StringType()), T.StructField("entity_id", T.StringType()),
    T.StructField("encode_text", T.StringType()), T.StructField("prompt_hashes", T.ArrayType(T.StringType())),
    T.StructField("as_of", T.LongType()),
])

# Python's str.strip() whitespace, as a Java regex class (Java's \s lacks \x1c-\x1f, \x85, \xa0 and the
# Unicode spaces): the same parts are stripped, and the same ones found empty, as `"\n".join(p.strip() ...)`.
_PY_SPACE = "[" + "".join(f"\\x{{{c:x}}}" for c in range(sys.maxunicode + 1) if chr(c).isspace()) + "]"
_EDGE_SPACE = f"^{_PY_SPACE}+|{_PY_SPACE}+\\z"


def strip_text(part: Column) -> Column:
    """`part` without leading and trailing whitespace (Python's str.strip()); null when nothing is left."""
    stripped = F.regexp_replace(part.cast("string"), _EDGE_SPACE, "")
    return F.when(stripped != F.lit(""), stripped)


def join_text(*parts: Column) -> Column:
    """The parts stripped, empty or null ones dropped, joined with a newline ("" when none is left)."""
    return F.concat_ws("\n", *[strip_text(p) for p in parts])


def _truthy(h: Column) -> Column:
    return h.isNotNull() & (h != F.lit(""))


def last_per_key(df: DataFrame, keys: list[str]) -> DataFrame:
    """One row per `keys`: the last one read (the pandas step's drop_duplicates(keep="last"); the gates keep a
    prompt per entity and a group per entity and clustering, so duplicates are not expected)."""
    from pyspark.sql import Window

    order = Window.partitionBy(*keys).orderBy(F.col("_pos").desc())
    ranked = df.withColumn("_pos", F.monotonically_increasing_id()).withColumn("_rank", F.row_number().over(order))
    return ranked.where(F.col("_rank") == 1).drop("_pos", "_rank")


# ---------------------------------------------------------------- the knowledge store's answers


def spark_path(lake, path: str) -> str:
    """A path of the lake's filesystem as Spark reads it: s3a:// on the object store, file:// in a folder."""
    protocol = lake.fs.protocol if isinstance(lake.fs.protocol, str) else lake.fs.protocol[0]
    if protocol in ("s3", "s3a"):
        return f"s3a://{path}"
    if protocol in ("file", "local"):
        return f"file://{path}"
    raise ValueError(f"knowledge store on {protocol}://: Spark reads it from s3a:// or a local folder only")


def read_store(spark, lake, model_id: str, sampling_version: str) -> DataFrame:
    """prompt_hash, model_id, sampling_version, text, _file, _row of every shard the store lists for the model
    (`store_files`). Columns a shard lacks besides these (older shards) are not read; a shard without one of these
    is refused, named, as `read_answers` refuses it: a stored answer never has one of them null."""
    from reki_core.llm.store import store_files

    files = store_files(lake, model_id, sampling_version)
    if not files:
        return empty_frame(spark, T.StructType([*ANSWERS_SCHEMA.fields, T.StructField("_file", T.StringType()),
                                                T.StructField("_row", T.LongType())]))
    raw = spark.read.schema(ANSWERS_SCHEMA).parquet(*[spark_path(lake, p) for p in files]).select(
        *ANSWER_COLUMNS, F.col("_metadata.file_path").alias("_file"), F.col("_metadata.row_index").alias("_row"))
    nulls = [F.when(F.col(c).isNull(), F.lit(c)) for c in ANSWER_COLUMNS]
    bad = raw.where(functools.reduce(operator.or_, [F.col(c).isNull() for c in ANSWER_COLUMNS])).select(
        "_file", F.concat_ws(", ", *nulls).alias("columns")).limit(1).collect()
    if bad:
        raise ValueError(f"knowledge store shard {bad[0]['_file']}: missing columns [{bad[0]['columns']}] "
                         f"(null in its rows: written without them)")
    return raw


def day_answers(store: DataFrame, prompts: DataFrame, model_id: str, sampling_version: str) -> DataFrame:
    """prompt_hash, text: the answer of each of the day's prompt hashes the store holds for the model (the last one
    of a repeated hash, in file order)."""
    hashes = prompts.select("prompt_hash").where(F.col("prompt_hash").isNotNull()).distinct()
    rows = store.where((F.col("model_id") == F.lit(model_id)) & (F.col("sampling_version") == F.lit(sampling_version)))
    rows = rows.join(hashes, "prompt_hash", "left_semi")
    return rows.groupBy("prompt_hash").agg(F.max_by("text", F.struct("_file", "_row")).alias("text"))


# ---------------------------------------------------------------- mode


def extraction_mode(cfg, prompts: DataFrame, where: str) -> str:
    """The day's mode, as `reki_core.llm.runner.extraction_prompts` resolves it: from the prompt stage's `ask_llm`
    flags (collective when group prompts exist), else the scenario's (`auto`: collective above
    `auto_collective_above` users + items); a mode whose prompt kinds the day lacks is refused."""
    missing = sorted(set(PROMPT_COLUMNS) - set(prompts.columns))
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    kind = F.col("entity_kind")
    stats = prompts.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count(F.when(kind.isin(*GROUP_KINDS), 1)).alias("groups"),
        F.count(F.when(kind.isin(*INDIVIDUAL_KINDS), 1)).alias("individual"),
        F.count_distinct(F.when(kind.isin(*INDIVIDUAL_KINDS), F.struct(kind, F.col("entity_id").cast("string"))))
        .alias("entities"),
    ).first()
    if "ask_llm" in prompts.columns:
        return "collective" if stats["groups"] > 0 else "individual"
    mode = cfg.scenario.extraction_mode
    if mode == "auto":
        mode = "collective" if stats["entities"] > cfg.scenario.auto_collective_above else "individual"
    chosen = stats["individual"] if mode == "individual" else stats["groups"]
    if chosen == 0 and stats["rows"] > 0:
        kinds = INDIVIDUAL_KINDS if mode == "individual" else GROUP_KINDS
        found = sorted(r["entity_kind"] for r in prompts.select("entity_kind").distinct().collect())
        raise ValueError(f"{where}: extraction mode '{mode}' needs prompts of kind {list(kinds)}, found only {found}")
    return mode


# ---------------------------------------------------------------- the transforms


def _prompt_frame(prompts: DataFrame) -> DataFrame:
    """entity_kind, entity_id, prompt_hash, history_text, as_of (bigint; null where not a number)."""
    history = F.col("history_text").cast("string") if "history_text" in prompts.columns else F.lit(None).cast("string")
    as_of = F.col("as_of").try_cast("bigint") if "as_of" in prompts.columns else F.lit(None).cast("bigint")
    return prompts.select(F.col("entity_kind").cast("string").alias("entity_kind"),
                          F.col("entity_id").cast("string").alias("entity_id"),
                          F.col("prompt_hash").cast("string").alias("prompt_hash"),
                          history.alias("history_text"), as_of.alias("as_of"))


def _with_answers(frame: DataFrame, answers: DataFrame, hash_col: str, prefix: str) -> DataFrame:
    found = answers.select(F.col("prompt_hash").alias(hash_col), F.col("text").alias(f"{prefix}text"),
                           F.lit(True).alias(f"{prefix}answered"))
    return frame.join(found, hash_col, "left").withColumn(
        f"{prefix}answered", F.coalesce(F.col(f"{prefix}answered"), F.lit(False)))


def individual(prompts: DataFrame, answers: DataFrame) -> DataFrame:
    """Candidates (entity_kind, entity_id, encode_text, prompt_hashes, as_of, answered) of individual mode."""
    own = last_per_key(_prompt_frame(prompts).where(F.col("entity_kind").isin(*INDIVIDUAL_KINDS)),
                       ["entity_kind", "entity_id"])
    own = _with_answers(own, answers, "prompt_hash", "")
    history = F.when(F.col("entity_kind") == F.lit("user"), F.col("history_text"))
    return own.select("entity_kind", "entity_id", join_text(history, F.col("text")).alias("encode_text"),
                      F.array(F.col("prompt_hash")).alias("prompt_hashes"), "as_of", "answered")


def collective(prompts: DataFrame, answers: DataFrame, clusters: DataFrame) -> DataFrame:
    """Candidates of collective mode: every item and user of the day's clusterings, with their groups' answers."""
    frame = _prompt_frame(prompts)
    groups = last_per_key(frame.where(F.col("entity_kind").isin(*GROUP_KINDS)), ["entity_kind", "entity_id"])
    groups = _with_answers(groups, answers, "prompt_hash", "")
    members = last_per_key(clusters.select(F.col("clustering").cast("string").alias("clustering"),
                                           F.col("entity_id").cast("string").alias("entity_id"),
                                           F.col("group_id").cast("string").alias("group_id")),
                           ["clustering", "entity_id"])

    def group_of(clustering: str, kind: str, prefix: str) -> DataFrame:
        """entity_id, <prefix>present, <prefix>h, <prefix>as_of, <prefix>text, <prefix>answered."""
        mine = groups.where(F.col("entity_kind") == F.lit(kind)).select(
            F.col("entity_id").alias("group_id"), F.col("prompt_hash").alias(f"{prefix}h"),
            F.col("as_of").alias(f"{prefix}as_of"), F.col("text").alias(f"{prefix}text"),
            F.col("answered").alias(f"{prefix}answered"))
        return members.where(F.col("clustering") == F.lit(clustering)).join(mine, "group_id", "left").select(
            "entity_id", F.lit(True).alias(f"{prefix}present"), f"{prefix}h", f"{prefix}as_of", f"{prefix}text",
            F.coalesce(F.col(f"{prefix}answered"), F.lit(False)).alias(f"{prefix}answered"))

    items = group_of("item", "item_group", "g_").select(
        F.lit("item").alias("entity_kind"), "entity_id", join_text(F.col("g_text")).alias("encode_text"),
        F.when(_truthy(F.col("g_h")), F.array(F.col("g_h"))).otherwise(F.array().cast("array<string>"))
        .alias("prompt_hashes"),
        F.col("g_as_of").alias("as_of"), (_truthy(F.col("g_h")) & F.col("g_answered")).alias("answered"))

    user_ids = members.where(F.col("clustering").isin("user_pos", "user_neg")).select("entity_id").distinct()
    own = last_per_key(frame.where(F.col("entity_kind").isin(*INDIVIDUAL_KINDS)), ["entity_kind", "entity_id"])
    own = own.where(F.col("entity_kind") == F.lit("user")).select("entity_id", "history_text", "as_of")
    users = (user_ids.join(own, "entity_id", "left")
             .join(group_of("user_pos", "user_pos_group", "p_"), "entity_id", "left")
             .join(group_of("user_neg", "user_neg_group", "n_"), "entity_id", "left"))

    def part(prefix: str, label: str) -> Column:
        # f"{label}: {answer_of.get(h, '')}": a stored answer's text is never null (the store refuses such shards).
        answer = F.when(F.col(f"{prefix}answered"), F.col(f"{prefix}text")).otherwise(F.lit(""))
        return F.when(F.col(f"{prefix}present"), F.concat(F.lit(f"{label}: "), answer))

    def settled(prefix: str) -> Column:  # a group the user is not in asks nothing; one they are in needs its answer
        present = F.coalesce(F.col(f"{prefix}present"), F.lit(False))
        return ~present | (_truthy(F.col(f"{prefix}h")) & F.col(f"{prefix}answered"))

    hashes = F.filter(F.array(F.when(F.col("p_present"), F.col("p_h")), F.when(F.col("n_present"), F.col("n_h"))),
                      lambda h: h.isNotNull())
    users = users.select(
        F.lit("user").alias("entity_kind"), "entity_id",
        join_text(F.col("history_text"), part("p_", "Liked"), part("n_", "Disliked")).alias("encode_text"),
        hashes.alias("prompt_hashes"),
        F.coalesce(F.col("as_of"), F.col("p_as_of"), F.col("n_as_of")).alias("as_of"),
        (settled("p_") & settled("n_")).alias("answered"))
    return items.unionByName(users)


def transform(mode: str, prompts: DataFrame, answers: DataFrame, clusters: DataFrame | None) -> DataFrame:
    """entity_kind, entity_id, encode_text, prompt_hashes, as_of, answered: one row per entity of the day's mode."""
    out = individual(prompts, answers) if mode == "individual" else collective(prompts, answers, clusters)
    return out.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in ASSIGNED_SCHEMA.fields],
                      F.col("answered").cast("boolean"))


def carried_over(previous: DataFrame, missing: DataFrame) -> DataFrame:
    """The rows of an earlier assignment of the entities in `missing` (entity_kind, entity_id), as they were."""
    rows = previous.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in ASSIGNED_SCHEMA.fields])
    return rows.join(missing.select("entity_kind", "entity_id"), ["entity_kind", "entity_id"], "left_semi")


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from reki_core.llm.store import sampling_version
    from spark_jobs.common import previous_day, read_partition, write_partition

    prompts = read_partition(spark, lake, PROMPTS, day)
    mode = extraction_mode(cfg, prompts, lake.describe(PROMPTS, day))
    model_id, sv = cfg.llm.engine.model_id, sampling_version(cfg)
    answers = day_answers(read_store(spark, lake, model_id, sv), prompts, model_id, sv)
    clusters = read_partition(spark, lake, CLUSTERS, day) if mode == "collective" else None
    candidates = cache(transform(mode, prompts, answers, clusters))
    counts = {(r["entity_kind"], r["answered"]): int(r["n"])
              for r in candidates.groupBy("entity_kind", "answered").agg(F.count(F.lit(1)).alias("n")).collect()}
    without_answer = sum(n for (_, answered), n in counts.items() if not answered)
    assigned = candidates.where(F.col("answered")).drop("answered")
    carried: dict[str, int] = {}
    earlier = previous_day(lake, DATASET, day) if without_answer else None
    if earlier is not None:
        kept = cache(carried_over(read_partition(spark, lake, DATASET, earlier), candidates.where(~F.col("answered"))))
        carried = {r["entity_kind"]: int(r["n"]) for r in kept.groupBy("entity_kind").agg(F.count(F.lit(1)).alias("n")).collect()}
        assigned = assigned.unionByName(kept)
    write_partition(assigned.orderBy("entity_kind", "entity_id"), lake, DATASET, day)
    answered_of = lambda kind: counts.get((kind, True), 0) + carried.get(kind, 0)  # noqa: E731
    n_carried = sum(carried.values())
    return {"mode": mode, "users": answered_of("user"), "items": answered_of("item"), "without_answer": without_answer,
            "carried_from_previous": n_carried, "left_out": without_answer - n_carried,
            "is_smoke_model": cfg.llm.is_smoke_model}


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
