"""Knowledge windows (earliest / recent), the refresh rule, and full build == chain of daily runs."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.testing import assertDataFrameEqual

from spark_jobs.user_history import WindowParams, transform

D1 = 1_704_067_200  # 2024-01-01 00:00 UTC
DAY = 86_400
# user a: 3 on day 1 (two at the same second: item-id tie-break, "i10" < "i9"), 2 on day 2, 1 on day 3.
# user b: a single interaction, fewer than any window; item "ghost" has no metadata.
EVENTS = [
    ("a", "i9", 4, D1 + 10), ("a", "i10", 5, D1 + 10), ("a", "i3", 2, D1 + 50),
    ("a", "i4", 3, D1 + DAY + 5), ("a", "i5", 1, D1 + DAY + 6),
    ("a", "i6", 5, D1 + 2 * DAY + 7),
    ("b", "ghost", 4, D1 + DAY + 100),
]
ITEMS = [("i3", "Three", 1990), ("i4", "Four", 1991), ("i5", "Amélie", 2001), ("i6", "Six", None),
         ("i9", "Nine", 1999), ("i10", "Ten", 2000)]


@pytest.fixture(scope="module")
def frames(spark):
    inter = spark.createDataFrame(EVENTS, "user_id string, item_id string, rating int, ts bigint")
    items = spark.createDataFrame(ITEMS, "item_id string, title string, year int")
    users = spark.createDataFrame([("a", 31, "F", "writer", "0")], "user_id string, age int, gender string, occupation string, zip_code string")
    return inter, items, users


def _day(inter, n):
    lo, hi = D1 + (n - 1) * DAY, D1 + n * DAY
    return inter.where((inter.ts >= lo) & (inter.ts < hi))


def _params(mode):
    return WindowParams(mode=mode, recent_window_size=2, max_window=30, refresh_min_new_interactions=2)


@pytest.mark.parametrize(
    "mode, versions, window_items",
    [
        # earliest: day 1 n=3 -> first 2; day 2 n=5 -> first 3 (2 new, size changed); day 3 n=6 -> still 3: no version
        ("earliest", [("a", 3, 2, dt.date(2024, 1, 1)), ("a", 5, 3, dt.date(2024, 1, 2)), ("b", 1, 1, dt.date(2024, 1, 2))],
         {"a": ["i10", "i9", "i3"], "b": ["ghost"]}),
        # recent (2): day 1 -> last 2; day 2 -> last 2 of 5; day 3 only 1 new < 2: the window stays
        ("recent", [("a", 3, 2, dt.date(2024, 1, 1)), ("a", 5, 2, dt.date(2024, 1, 2)), ("b", 1, 1, dt.date(2024, 1, 2))],
         {"a": ["i4", "i5"], "b": ["ghost"]}),
    ],
)
def test_windows_versions_and_refresh_rule(spark, frames, mode, versions, window_items):
    inter, items, users = frames
    history, kv = transform(None, None, inter, items, users, _params(mode), positive_threshold=3)
    assertDataFrameEqual(
        kv.select("user_id", "window_n", "window_size", "version_dt"),
        spark.createDataFrame(versions, "user_id string, window_n int, window_size int, version_dt date"),
    )
    rows = {r["user_id"]: r for r in history.collect()}
    assert [e["item_id"] for e in rows["a"]["history"]] == ["i10", "i9", "i3", "i4", "i5", "i6"]
    for user, expected in window_items.items():
        assert [e["item_id"] for e in rows[user]["window"]] == expected
        assert rows[user]["as_of"] == rows[user]["window"][-1]["ts"]
    assert rows["b"]["window"][0]["title"] is None  # no metadata: kept, with a null title
    assert rows["b"]["age"] is None and rows["a"]["occupation"] == "writer"
    if mode == "recent":
        assert [e["title"] for e in rows["a"]["window"]] == ["Four", "Amélie"]


@pytest.mark.parametrize("mode", ["earliest", "recent"])
def test_full_build_equals_chain_of_daily_runs(spark, frames, mode):
    inter, items, users = frames
    params = _params(mode)
    full_history, full_versions = transform(None, None, inter, items, users, params, positive_threshold=3)
    history, versions = transform(None, None, _day(inter, 1), items, users, params, positive_threshold=3)
    # Day 2 takes each user's earliest version from all the versions, day 3 from the previous rows (as the job does
    # when they have their counts): a wrong knowledge_since on either day shows in day 3's rows.
    for n, carried in ((2, False), (3, True)):
        history, versions = history.localCheckpoint(), versions.localCheckpoint()
        prev_since = history.select("user_id", "knowledge_since") if carried else None
        history, versions = transform(history, versions, _day(inter, n), items, users, params, positive_threshold=3,
                                      prev_since=prev_since)
    assertDataFrameEqual(versions, full_versions)
    assertDataFrameEqual(history.drop("needs_refresh"), full_history.drop("needs_refresh"))
    # Day 3 changed no window: nobody needs a refresh, while the full build refreshes everyone.
    assert history.where("needs_refresh").count() == 0
    assert full_history.where("needs_refresh").count() == 2
    # Same input, same window hash: an unchanged window keeps its prompt.
    assert {r["user_id"]: r["window_hash"] for r in history.collect()} == {
        r["user_id"]: r["window_hash"] for r in full_history.collect()
    }
