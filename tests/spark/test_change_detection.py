"""What a daily run recomputes: the changed profiles, items and genres found from the small tables, and the
touched buckets (the one Spark scan of the day's interactions plus yesterday's refresh flags)."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd

from reki_core.storage.lake import Lake
from spark_jobs.buckets import MANIFEST
from spark_jobs.ctr_samples import UNKNOWN_GENRE, regenred_items
from spark_jobs.user_history import DATASET, changed_items, profile_changes, touched_buckets

PREV, DAY = dt.date(2024, 3, 1), dt.date(2024, 3, 2)


def _users(rows):
    return pd.DataFrame(rows, columns=["user_id", "age", "gender", "occupation", "zip_code"])


def _items(rows):
    return pd.DataFrame(rows, columns=["item_id", "first_genre", "needs_refresh"])


def test_profile_changes_catch_edited_added_and_dropped_users(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_users([("1", 20, "F", "writer", "0"), ("2", 30, "M", "artist", "0"),
                                 ("3", 40, "F", "doctor", "0")]), "raw/users", PREV)
    # 1 unchanged except its zip code (not shown in prompts), 2 changed occupation, 3 dropped, 4 added.
    lake.write_partition(_users([("1", 20, "F", "writer", "99"), ("2", 30, "M", "engineer", "0"),
                                 ("4", 50, "M", "lawyer", "0")]), "raw/users", DAY)
    assert profile_changes(lake, DAY, PREV) == ["2", "3", "4"]


def test_profile_changes_when_a_snapshot_is_missing_or_both_are(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert profile_changes(lake, DAY, PREV) == []
    lake.write_partition(_users([("7", 20, "F", "writer", "0"), ("8", None, None, None, None)]), "raw/users", DAY)
    assert profile_changes(lake, DAY, PREV) == ["7", "8"]  # the snapshot appeared: every profile in it is new


def test_changed_items_are_flagged_or_vanished(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_items([("a", "Drama", False), ("b", "Comedy", False), ("gone", "War", False)]), "features/items", PREV)
    lake.write_partition(_items([("a", "Drama", False), ("b", "Comedy", True), ("new", "War", True)]), "features/items", DAY)
    assert changed_items(lake, DAY, PREV) == ["b", "gone", "new"]


def test_regenred_items_compare_the_shown_genre_unknown_where_missing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_items([("a", "Drama", False), ("b", "Comedy", False), ("gone", "War", False),
                                 ("was_unknown", UNKNOWN_GENRE, False)]), "features/items", PREV)
    # b re-genred; a kept its genre though flagged (a title change); `was_unknown` vanished but showed unknown anyway.
    lake.write_partition(_items([("a", "Drama", True), ("b", "Horror", True), ("new", "War", True),
                                 ("new_unknown", UNKNOWN_GENRE, True)]), "features/items", DAY)
    assert regenred_items(lake, DAY, PREV) == ["b", "gone", "new"]


def test_touched_buckets_join_new_interactions_flags_profiles_and_shown_items(spark, tmp_path):
    from pyspark.sql import functions as F

    from spark_jobs.buckets import bucket_expr

    lake = Lake(str(tmp_path / "lake"))
    n = 64
    ids = [str(i) for i in range(200)]
    bucket = {r[0]: r[1] for r in spark.createDataFrame([(u,) for u in ids], "user_id string")
              .select("user_id", bucket_expr(F.col("user_id"), n)).collect()}
    rated, reprofiled, shows_changed = "1", "2", "3"
    assert len({bucket[rated], bucket[reprofiled], bucket[shows_changed]}) == 3  # each reason shows on its own
    # Previous day: one bucket still flagged for refresh, and user 3's window shows item "x".
    flagged = next(b for b in range(n) if b not in {bucket[rated], bucket[reprofiled], bucket[shows_changed]})
    folder = lake.local_path(f"{DATASET}/dt={PREV.isoformat()}")
    folder.mkdir(parents=True)
    windows = pd.DataFrame({"user_id": [shows_changed, "4"],
                            "window": [[{"item_id": "x"}], [{"item_id": "y"}]]})
    windows.to_parquet(folder / "part-0.parquet")
    schema = spark.read.parquet(str(folder)).schema.json()
    # And one bucket from a writer that did not count flags: taken as flagged.
    uncounted = next(b for b in range(n) if b not in {bucket[rated], bucket[reprofiled], bucket[shows_changed], flagged})
    counts = {str(b): {"files": ["part-0.parquet"] if b == bucket[shows_changed] else [], "rows": 0,
                       "counts": {"dirty_users": 1 if b == flagged else 0}} for b in range(n)}
    counts[str(uncounted)] = {"files": [], "rows": 3, "counts": {}}
    (folder / MANIFEST).write_text(json.dumps({"n_buckets": n, "sort_by": ["user_id"], "schema": schema, "buckets": counts}))
    lake.write_partition(_users([(reprofiled, 20, "F", "writer", "0")]), "raw/users", PREV)
    lake.write_partition(_users([(reprofiled, 21, "F", "writer", "0")]), "raw/users", DAY)
    lake.write_partition(_items([("x", "Drama", False), ("y", "War", False)]), "features/items", PREV)
    lake.write_partition(_items([("x", "Drama", True), ("y", "War", False)]), "features/items", DAY)
    interactions = spark.createDataFrame([(rated, "y", 5, 1), (rated, "x", 4, 2)], "user_id string, item_id string, rating int, ts bigint")

    got = touched_buckets(spark, lake, DAY, PREV, interactions, n)
    assert got == {bucket[rated], bucket[reprofiled], bucket[shows_changed], flagged, uncounted}
