"""Factorization prompts: `prompts/dt=D`, the day's LLM prompts (user, item and, in collective mode, group prompts).

Reads `features/user_history` (the state as of D: user_id, window, as_of, needs_refresh), `features/items`, the
newest `raw/users` snapshot up to D (profiles), `features/clusters` (collective mode), the previous `features/items`
(dirty items, when the day's items carry no `needs_refresh`) and the previous `prompts` partition (carried user
prompts). Writes `prompts/dt=D` (docs/data_contracts.md); its run-log step is `prompts`.

The wording is `reki_core.prompts`' (sanitising untrusted text, render_*, prompt_hash, token fitting), called in the
Python workers (mapInPandas) with the engine's tokenizer loaded once per worker (`worker_token_counter`). Windows,
titles, profiles, carried prompts and group members are joined in Spark, one row per entity going to a worker; the
knowledge store's answered hashes are a semi join (`has_knowledge`). Nothing of the day's size is collected to the
driver: it collects counts, the mode's inputs and a few offending rows.

The prompts gate's per-row rules (unique keys, text, history_text, hash format and match, as_of, the token budget
recounted with the engine's tokenizer) and its coverage (every dirty user and item and every group in use has a
prompt) are computed here over the written rows and recorded in the step's `checks`: counts per rule, a few offending
rows, and a fingerprint of the written rows; `reki_core.quality.prompts.gate_prompts` runs its expectations on those.
"""

from __future__ import annotations

import sys

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from reki_core.quality.prompts import FINGERPRINTED, STEP  # STEP: the run-log step the summary and the gate read
from spark_jobs.checks import fingerprint, rule_checks
from spark_jobs.common import cache, empty_frame, releases_cache

DATASET = "prompts"
USER_HISTORY, ITEMS, USERS, CLUSTERS = "features/user_history", "features/items", "raw/users", "features/clusters"
PROFILE_COLUMNS = ("gender", "age", "occupation")
EXAMPLES = 20  # missing keys recorded per coverage check

ROW_SCHEMA = T.StructType([
    T.StructField("prompt_id", T.StringType()), T.StructField("entity_kind", T.StringType()),
    T.StructField("entity_id", T.StringType()), T.StructField("text", T.StringType()),
    T.StructField("history_text", T.StringType()), T.StructField("prompt_hash", T.StringType()),
    T.StructField("template_version", T.StringType()), T.StructField("as_of", T.LongType()),
    T.StructField("est_tokens", T.LongType()), T.StructField("is_dirty", T.BooleanType()),
    T.StructField("n_titles", T.IntegerType()), T.StructField("ask_llm", T.BooleanType()),
])
FACTS_SCHEMA = T.StructType([
    T.StructField("item_id", T.StringType()), T.StructField("display", T.StringType()),
    T.StructField("popularity", T.LongType()), T.StructField("is_dirty", T.BooleanType()),
])
RULES_SCHEMA = T.StructType([T.StructField("tokens", T.LongType()),
                             T.StructField("prompt_hash_matches_text", T.BooleanType())])


class _Rows:
    """A mapInPandas function: one prompt row (or none) per input row, from `make(cfg, count_tokens, row)`; built on
    the driver, pickled with the config, and run in the Python workers."""

    def __init__(self, cfg, make, columns):
        self.cfg, self.make, self.columns = cfg, make, columns

    def __call__(self, frames):
        import pandas as pd

        from reki_core.prompts import worker_token_counter

        count_tokens = worker_token_counter(self.cfg)
        for frame in frames:
            rows = [out for r in frame.to_dict("records") if (out := self.make(self.cfg, count_tokens, r)) is not None]
            if rows:
                yield pd.DataFrame(rows, columns=self.columns)


def _user_row(cfg, count_tokens, r):
    from reki_core.prompts import user_prompt_row

    carried = None
    if r["has_prev"] in (True,):  # a numpy or Python true; None or NaN where the user has no earlier prompt
        carried = {"text": r["prev_text"], "history_text": r["prev_history_text"], "as_of": r["prev_as_of"],
                   "n_titles": r["prev_n_titles"]}
    return user_prompt_row(cfg, count_tokens, r["user_id"], r["entries"], r["as_of"], r["needs_refresh"],
                           tuple(r[c] for c in PROFILE_COLUMNS), carried, r["individual"])


def _item_row(cfg, count_tokens, r):
    from reki_core.prompts import item_prompt_row

    return item_prompt_row(cfg, count_tokens, r["item_id"], r["title"], r["year"], r["is_dirty"], r["individual"])


def _item_facts(cfg, count_tokens, r):
    from reki_core.prompts import item_display

    return {"item_id": r["item_id"], "display": item_display(cfg, r["title"], r["year"]),
            "popularity": int(r["popularity"]), "is_dirty": bool(r["is_dirty"])}


def _group_row(cfg, count_tokens, r):
    from reki_core.prompts import group_prompt_row

    titles = [t["display"] for t in sorted(r["titles"], key=lambda t: t["rank"])]
    return group_prompt_row(cfg, count_tokens, r["entity_kind"], r["group_id"], titles, r["as_of"])


class _Rules:
    """A mapInPandas function: the rows with the gate's own rule columns (`rule_columns`: the engine's token count, the
    hash recomputed), in the Python workers."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, frames):
        from reki_core.prompts import worker_token_counter
        from reki_core.quality.prompts import rule_columns

        count_tokens = worker_token_counter(self.cfg)
        for frame in frames:
            yield rule_columns(frame, count_tokens)


def _rows(df: DataFrame, cfg, make, schema: T.StructType) -> DataFrame:
    return df.mapInPandas(_Rows(cfg, make, [f.name for f in schema.fields]), schema)


# ---------------------------------------------------------------- inputs


def _column(df: DataFrame, name: str, cast: str | None = None) -> Column:
    col = F.col(name) if name in df.columns else F.lit(None)
    return (col.cast(cast) if cast else col).alias(name)


def check_columns(df: DataFrame, dataset: str, day) -> None:
    from reki_core.prompts import REQUIRED_COLUMNS, PromptError

    missing = [c for c in REQUIRED_COLUMNS[dataset] if c not in df.columns]
    if missing:
        raise PromptError(f"{dataset}/dt={day.isoformat()}: missing column(s) {missing} (see docs/data_contracts.md)")


def dirty_items(items: DataFrame, previous: DataFrame | None) -> DataFrame:
    """item_id, title, year, popularity, is_dirty: new items and items whose metadata changed since the previous
    partition (the day's own `needs_refresh` where it has one; every item when nothing can be compared)."""
    base = items.select(F.col("item_id").cast("string").alias("item_id"), _column(items, "title"),
                        _column(items, "year"), F.coalesce(F.col("popularity"), F.lit(0)).cast("long").alias("popularity"),
                        _column(items, "metadata_hash", "string"), _column(items, "needs_refresh", "boolean"))
    if "needs_refresh" in items.columns:
        dirty = F.coalesce(F.col("needs_refresh"), F.lit(False))
    elif previous is None or "metadata_hash" not in items.columns or "metadata_hash" not in previous.columns:
        dirty = F.lit(True)
    else:
        before = previous.select(F.col("item_id").cast("string").alias("item_id"),
                                 F.coalesce(F.col("metadata_hash").cast("string"), F.lit("")).alias("_before"))
        base = base.join(before, "item_id", "left")
        # A null hash compares as "" (as the pandas step's fillna("") did); an item not there before is new.
        dirty = F.col("_before").isNull() | (F.col("_before") != F.coalesce(F.col("metadata_hash"), F.lit("")))
    return base.select("item_id", "title", "year", "popularity", dirty.alias("is_dirty"))


def window_entries(history: DataFrame) -> DataFrame:
    """user_id, item_id, ts, rating: one row per entry of each user's knowledge window."""
    entries = history.select("user_id", F.explode("window").alias("e"))
    return entries.select("user_id", F.col("e.item_id").cast("string").alias("item_id"),
                          F.col("e.ts").alias("ts"), F.col("e.rating").alias("rating"))


def profiles(users: DataFrame | None) -> DataFrame | None:
    """user_id, gender, age, occupation: one row per user (the last one read where a snapshot repeats a user)."""
    if users is None:
        return None
    from spark_jobs.knowledge import last_per_key

    rows = users.select(F.col("user_id").cast("string").alias("user_id"), *[_column(users, c) for c in PROFILE_COLUMNS])
    return last_per_key(rows, ["user_id"])


def carried_prompts(previous: DataFrame | None, version: str) -> DataFrame | None:
    """user_id, prev_*: the users' prompts of the previous partition made with today's template version."""
    if previous is None:
        return None
    rows = previous.where((F.col("entity_kind") == F.lit("user")) & (F.col("template_version") == F.lit(version)))
    return rows.select(F.col("entity_id").cast("string").alias("user_id"), F.col("text").alias("prev_text"),
                       F.col("history_text").alias("prev_history_text"), F.col("as_of").alias("prev_as_of"),
                       _column(rows, "n_titles").alias("prev_n_titles"), F.lit(True).alias("has_prev"))


# ---------------------------------------------------------------- the transforms


def user_prompts(cfg, history: DataFrame, titles: DataFrame, users: DataFrame | None, previous: DataFrame | None,
                 individual: bool) -> DataFrame:
    """The users' prompt rows: carried, or rendered from their windows with each entry's title and year."""
    entries = window_entries(history).join(titles, "item_id", "left").groupBy("user_id").agg(
        F.collect_list(F.struct("item_id", "ts", "rating", "title", "year")).alias("entries"))
    frame = history.select("user_id", "as_of", "needs_refresh").join(entries, "user_id", "left")
    people = profiles(users)
    if people is not None:
        frame = frame.join(people, "user_id", "left")
    else:
        frame = frame.select("*", *[F.lit(None).cast("string").alias(c) for c in PROFILE_COLUMNS])
    carried = carried_prompts(previous, cfg.scenario.template_version)
    if carried is not None:
        frame = frame.join(carried, "user_id", "left")
    else:
        frame = frame.select("*", *[F.lit(None).cast(t).alias(c) for c, t in (
            ("prev_text", "string"), ("prev_history_text", "string"), ("prev_as_of", "bigint"),
            ("prev_n_titles", "int"), ("has_prev", "boolean"))])
    return _rows(frame.withColumn("individual", F.lit(individual)), cfg, _user_row, ROW_SCHEMA)


def group_members(cfg, clusters: DataFrame, facts: DataFrame, entries: DataFrame) -> DataFrame:
    """entity_kind, group_id, as_of, titles (array of rank, display): each group's representative titles.

    Item groups: members by popularity. User groups: the items the members liked (rating above the threshold) or
    disliked in their knowledge windows, most frequent first; as_of is the newest of those interactions, so the
    point-in-time join never gives a group text to an earlier sample. Groups without evidence are left out."""
    from reki_core.prompts import GROUP_KIND_OF_CLUSTERING

    scenario = cfg.scenario
    kind_of = F.create_map(*[F.lit(x) for pair in GROUP_KIND_OF_CLUSTERING.items() for x in pair])
    members = clusters.select(F.col("clustering").cast("string").alias("clustering"),
                              F.col("entity_id").cast("string").alias("entity_id"),
                              F.col("group_id").cast("string").alias("group_id"))
    members = members.where(F.col("clustering").isNotNull() & F.col("group_id").isNotNull()).withColumn(
        "entity_kind", kind_of[F.col("clustering")])
    shown = facts.where(F.col("display").isNotNull()).select("item_id", "display", "popularity")

    items = members.where(F.col("clustering") == F.lit("item")).join(
        shown, members["entity_id"] == shown["item_id"], "inner").select(
        "entity_kind", "group_id", "item_id", "display", "popularity",
        F.lit(0).cast("long").alias("n"), F.lit(0).cast("long").alias("ts"))

    users = members.where(F.col("clustering").isin("user_pos", "user_neg"))
    liked = F.col("rating") > F.lit(scenario.positive_rating_threshold)
    evidence = users.join(entries.withColumnRenamed("user_id", "entity_id"), "entity_id", "inner").where(
        liked == (F.col("clustering") == F.lit("user_pos"))).join(shown, "item_id", "inner")
    votes = evidence.groupBy("entity_kind", "group_id", "item_id", "display", "popularity").agg(
        F.count(F.lit(1)).cast("long").alias("n"), F.max("ts").cast("long").alias("ts"))

    ranked = items.unionByName(votes)
    order = Window.partitionBy("entity_kind", "group_id").orderBy(
        F.col("n").desc(), F.col("popularity").desc(), F.col("item_id"))
    ranked = ranked.withColumn("rank", F.row_number().over(order))
    return ranked.groupBy("entity_kind", "group_id").agg(
        F.max("ts").alias("as_of"),
        F.collect_list(F.when(F.col("rank") <= F.lit(scenario.group_representatives),
                              F.struct("rank", "display"))).alias("titles"))


def with_knowledge(rows: DataFrame, known: DataFrame) -> DataFrame:
    """The rows with `has_knowledge`: whether the store holds an answer to the prompt's hash (a semi join)."""
    from reki_core.prompts import COLUMNS

    hashes = known.select("prompt_hash").distinct().withColumn("has_knowledge", F.lit(True))
    out = rows.join(hashes, "prompt_hash", "left").withColumn(
        "has_knowledge", F.coalesce(F.col("has_knowledge"), F.lit(False)))
    return out.select(*COLUMNS)


def read_known(spark, lake, model_id: str, sampling_version: str) -> DataFrame:
    """prompt_hash of every answer the knowledge store holds for the model and sampling version (its own file list
    read by Spark, three columns only)."""
    from reki_core.llm.store import store_files
    from spark_jobs.knowledge import spark_path

    schema = T.StructType([T.StructField(c, T.StringType()) for c in ("prompt_hash", "model_id", "sampling_version")])
    files = store_files(lake, model_id, sampling_version)
    if not files:
        return empty_frame(spark, schema).select("prompt_hash")
    store = spark.read.schema(schema).parquet(*[spark_path(lake, p) for p in files])
    return store.where((F.col("model_id") == F.lit(model_id)) & (F.col("sampling_version") == F.lit(sampling_version))
                       & F.col("prompt_hash").isNotNull()).select("prompt_hash")


def expected_keys(history: DataFrame, facts: DataFrame, groups: DataFrame | None) -> DataFrame:
    """entity_kind, entity_id that must have a prompt today: users whose window advanced (and is not empty), dirty
    items with a title, and (collective) every group with evidence."""
    users = history.where(F.coalesce(F.col("needs_refresh").cast("boolean"), F.lit(False))
                          & (F.coalesce(F.size("window"), F.lit(0)) > 0)).select(
        F.lit("user").alias("entity_kind"), F.col("user_id").alias("entity_id"))
    items = facts.where(F.col("is_dirty") & F.col("display").isNotNull()).select(
        F.lit("item").alias("entity_kind"), F.col("item_id").alias("entity_id"))
    keys = users.unionByName(items)
    if groups is not None:
        keys = keys.unionByName(groups.select("entity_kind", F.col("group_id").alias("entity_id")))
    return keys


def transform(cfg, mode: str, history: DataFrame, items: DataFrame, users: DataFrame | None,
              previous_items: DataFrame | None, previous_prompts: DataFrame | None, clusters: DataFrame | None,
              known: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(the day's prompt rows, columns `COLUMNS`; the keys that must have a prompt)."""
    individual = mode == "individual"
    history = history.select(F.col("user_id").cast("string").alias("user_id"), "window", "as_of", "needs_refresh")
    items = dirty_items(items, previous_items)
    facts = cache(_rows(items, cfg, _item_facts, FACTS_SCHEMA))
    titles = items.select("item_id", "title", "year")
    rows = user_prompts(cfg, history, titles, users, previous_prompts, individual)
    rows = rows.unionByName(_rows(items.withColumn("individual", F.lit(individual)), cfg, _item_row, ROW_SCHEMA))
    groups = None
    if mode == "collective":
        # Cached: the prompt rows and the coverage check's expected keys both read the groups.
        groups = cache(group_members(cfg, clusters, facts, window_entries(history)))
        rows = rows.unionByName(_rows(groups, cfg, _group_row, ROW_SCHEMA))
    return with_knowledge(rows, known), expected_keys(history, facts, groups)


# ---------------------------------------------------------------- the gate's rules


def rule_flags(rows: DataFrame, cfg) -> DataFrame:
    """The rows with one boolean column per gate rule (true: the row breaks it), `tokens` recounted with the engine's
    tokenizer and `prompt_hash_matches_text` recomputed, as the prompts gate's expectations read them."""
    from reki_core.prompts import KINDS, token_budget
    from reki_core.quality.prompts import RULES

    schema = T.StructType([*rows.schema.fields, *RULES_SCHEMA.fields])
    checked = rows.mapInPandas(_Rules(cfg), schema)
    budget = token_budget(cfg)
    by_id, by_key = Window.partitionBy("prompt_id"), Window.partitionBy("entity_kind", "entity_id")
    flags = {
        "prompt_id_unique": F.count(F.lit(1)).over(by_id) > 1,
        "entity_key_unique": F.count(F.lit(1)).over(by_key) > 1,
        "entity_kind_known": ~F.coalesce(F.col("entity_kind").isin(*KINDS), F.lit(False)),
        "text_not_null": F.col("text").isNull(),
        "text_not_empty": F.coalesce(F.length("text") < 1, F.lit(False)),
        "user_history_text": (F.col("entity_kind") == F.lit("user")) & F.col("history_text").isNull(),
        "prompt_hash_format": F.coalesce(~F.col("prompt_hash").rlike("^[0-9a-f]{64}$"), F.lit(False)),
        "prompt_hash_matches_text": ~F.col("prompt_hash_matches_text"),
        "as_of_not_null": F.col("as_of").isNull(),
        "tokens_within_budget": (F.col("tokens") < 1) | (F.col("tokens") > F.lit(budget)),
    }
    assert set(flags) == set(RULES), "every rule of the gate has its flag"
    return checked.select("*", *[F.coalesce(flag, F.lit(False)).alias(f"_{name}") for name, flag in flags.items()])


def checks(rows: DataFrame, expected: DataFrame, cfg) -> dict:
    """The gate's rule counts, a few offending rows (text cut to 200 characters) and the missing keys."""
    from reki_core.prompts import COLUMNS, token_budget
    from reki_core.quality.prompts import COVERAGE, RULES

    # Text cut to 200 characters: the examples go into the run record.
    cut = [F.substring(c, 1, 200).alias(c) if c in ("text", "history_text") else F.col(c) for c in COLUMNS]
    found = rule_checks(rule_flags(rows, cfg), RULES, [*cut, "tokens", "prompt_hash_matches_text"], ["prompt_id"])
    missing = expected.distinct().join(rows.select("entity_kind", "entity_id"), ["entity_kind", "entity_id"], "left_anti")
    is_entity = F.col("entity_kind").isin("user", "item")
    which = (is_entity, ~is_entity)  # per coverage check: missing users and items, missing groups
    # Both checks' counts in one action (each is a pass over the day's keys); examples only for a check that failed.
    check_of = F.when(which[0], F.lit(0)).when(which[1], F.lit(1))
    counted = {r["check"]: int(r["n"]) for r in missing.groupBy(check_of.alias("check")).agg(
        F.count(F.lit(1)).alias("n")).collect() if r["check"] is not None}
    absent = {}
    for i, name in enumerate(COVERAGE):
        n = counted.get(i, 0)
        absent[name] = {"count": n, "examples": [f"{r['entity_kind']}:{r['entity_id']}" for r in missing.where(
            which[i]).orderBy("entity_kind", "entity_id").limit(EXAMPLES).collect()] if n else []}
    return {"budget": token_budget(cfg), "columns": list(COLUMNS), **found, "missing": absent,
            "fingerprint": fingerprint(rows, FINGERPRINTED)}


# ---------------------------------------------------------------- the job


def counts(rows: DataFrame, mode: str) -> dict:
    """Counts by kind: prompts, already known, dirty, to ask the LLM."""
    per_kind = rows.groupBy("entity_kind").agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.col("has_knowledge").cast("long")).alias("known"),
        F.sum(F.col("is_dirty").cast("long")).alias("dirty"),
        F.sum((F.col("ask_llm") & ~F.col("has_knowledge")).cast("long")).alias("to_ask"),
        F.max("est_tokens").alias("tokens")).orderBy("entity_kind").collect()
    return {
        "mode": mode,
        "rows": sum(int(r["n"]) for r in per_kind),
        "by_kind": {r["entity_kind"]: int(r["n"]) for r in per_kind},
        "with_knowledge": {r["entity_kind"]: int(r["known"]) for r in per_kind},
        "dirty": {r["entity_kind"]: int(r["dirty"]) for r in per_kind},
        "to_ask": sum(int(r["to_ask"]) for r in per_kind),
        "max_est_tokens": max((int(r["tokens"]) for r in per_kind), default=0),
    }


def resolve_day_mode(cfg, history: DataFrame, items: DataFrame) -> str:
    from reki_core.prompts import resolve_mode

    if cfg.scenario.extraction_mode != "auto":
        return cfg.scenario.extraction_mode
    return resolve_mode(cfg, history.count(), items.count())


@releases_cache
def run(spark, cfg, lake, day) -> dict:
    from reki_core.llm.store import sampling_version
    from reki_core.prompts import PromptError
    from spark_jobs.common import previous_day, read_partition, write_partition

    history = read_partition(spark, lake, USER_HISTORY, day)
    check_columns(history, USER_HISTORY, day)
    items = read_partition(spark, lake, ITEMS, day)
    check_columns(items, ITEMS, day)
    users_day = lake.latest_partition(USERS, upto=day)
    users = read_partition(spark, lake, USERS, users_day) if users_day else None
    before = previous_day(lake, ITEMS, day)
    previous_items = read_partition(spark, lake, ITEMS, before) if before else None
    before = previous_day(lake, DATASET, day)
    previous_prompts = read_partition(spark, lake, DATASET, before) if before else None
    mode = resolve_day_mode(cfg, history, items)
    clusters = None
    if mode == "collective":
        if not lake.has_partition(CLUSTERS, day):
            raise PromptError(f"collective extraction needs {lake.describe(CLUSTERS, day)}, "
                              "which is missing (run the clustering job first)")
        clusters = read_partition(spark, lake, CLUSTERS, day)
        check_columns(clusters, CLUSTERS, day)
        unknown_clusterings(clusters)
    known = read_known(spark, lake, cfg.llm.engine.model_id, sampling_version(cfg))
    rows, expected = transform(cfg, mode, history, items, users, previous_items, previous_prompts, clusters, known)
    # Materialised once, out of the tables' lineage: `rows` reads the previous prompts, so a cached plan of it would be
    # recomputed (the prompt texts built again in the Python workers) after the write to the same table.
    rows = rows.localCheckpoint()
    path = write_partition(rows.orderBy("entity_kind", "entity_id"), lake, DATASET, day)
    written = cache(read_partition(spark, lake, DATASET, day))
    return {**counts(rows, mode), "path": path, "checks": checks(written, expected, cfg)}


def unknown_clusterings(clusters: DataFrame) -> None:
    from reki_core.prompts import GROUP_KIND_OF_CLUSTERING, PromptError

    unknown = clusters.select(F.col("clustering").cast("string").alias("c")).where(
        ~F.coalesce(F.col("c").isin(*GROUP_KIND_OF_CLUSTERING), F.lit(False))).agg(F.min("c").alias("c")).first()["c"]
    if unknown is not None:
        raise PromptError(f"features/clusters: unknown clustering {unknown!r} (expected {list(GROUP_KIND_OF_CLUSTERING)})")


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_job

    return run_as_job(run, STEP, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
