"""What a daily run recomputes: the changed profiles, items and genres found from the small tables, and the
touched users (the day's interactions, profiles and shown items; yesterday's refresh flags fall back by themselves)."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from reki_core.storage.lake import Lake
from spark_jobs.ctr_samples import UNKNOWN_GENRE, regenred_items
from spark_jobs.user_history import DATASET, changed_items, profile_changes, touched_users

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


def test_touched_users_join_new_interactions_flags_profiles_and_shown_items(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    rated, reprofiled, shows_changed, flagged = "1", "2", "3", "5"
    # The state as of the previous day: a full day (users 3, 4, 6: 3's window shows item "x"; 6 flagged then),
    # then the previous day's changes (user 5, flagged for refresh, and 4 again, not flagged).
    state = pd.DataFrame({"user_id": [shows_changed, "4", "6"], "needs_refresh": [False, False, True],
                          "window": [[{"item_id": "x"}], [{"item_id": "y"}], [{"item_id": "y"}]]})
    lake.write_partition(state, DATASET, PREV - dt.timedelta(days=1))
    changes = pd.DataFrame({"user_id": [flagged, "4"], "needs_refresh": [True, False],
                            "window": [[{"item_id": "y"}], [{"item_id": "y"}]]})
    lake.write_partition(changes, DATASET, PREV, changes_only=True)
    lake.write_partition(_users([(reprofiled, 20, "F", "writer", "0")]), "raw/users", PREV)
    lake.write_partition(_users([(reprofiled, 21, "F", "writer", "0")]), "raw/users", DAY)
    lake.write_partition(_items([("x", "Drama", False), ("y", "War", False)]), "features/items", PREV)
    lake.write_partition(_items([("x", "Drama", True), ("y", "War", False)]), "features/items", DAY)
    interactions = spark.createDataFrame([(rated, "y", 5, 1), (rated, "x", 4, 2)], "user_id string, item_id string, rating int, ts bigint")

    got = sorted(r.user_id for r in touched_users(spark, lake, DAY, PREV, interactions).collect())
    # 5 was flagged yesterday and 6 the day before: neither is rewritten for its flag, which reads false today.
    assert got == sorted([rated, reprofiled, shows_changed])
    state = lake.read_partition(DATASET, PREV).set_index("user_id")["needs_refresh"]
    assert state.to_dict() == {shows_changed: False, "4": False, flagged: True, "6": False}


def test_frames_the_driver_makes_are_small_to_the_planner(spark):
    """A day without interactions, and the ids the driver found, become frames made in the JVM whose size the planner
    knows: the join that narrows the state to them broadcasts them (or, with no rows, goes), where a classic `createDataFrame` of a Python list
    (size unknown) makes it shuffle the whole state."""
    from pyspark.sql import types as T

    from spark_jobs.common import INTERACTIONS_SCHEMA, empty_frame, values_frame

    state = spark.range(50_000).selectExpr("cast(id as string) as user_id", "id as n")
    empty = empty_frame(spark, INTERACTIONS_SCHEMA)
    found = values_frame(spark, "user_id", ["7", "3", "7"])
    unsized = spark.createDataFrame([("7",)], T.StructType([T.StructField("user_id", T.StringType())]))

    def join_of(keys) -> str:
        return state.join(keys.select("user_id"), "user_id", "left_semi")._jdf.queryExecution().executedPlan().toString()

    assert "BroadcastHashJoin" in join_of(found)
    assert "SortMergeJoin" not in join_of(empty)  # the planner drops a join with no rows altogether
    assert "SortMergeJoin" in join_of(unsized)  # the case the helpers avoid: the check can tell them apart
    assert [(f.name, f.dataType) for f in empty.schema] == [(f.name, f.dataType) for f in INTERACTIONS_SCHEMA]
    assert empty.count() == 0
    assert sorted(r.user_id for r in found.collect()) == ["3", "7", "7"]
    assert sorted(r.user_id for r in state.join(found, "user_id", "left_semi").collect()) == ["3", "7"]
