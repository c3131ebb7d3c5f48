"""CTR samples: point-in-time join without leakage (both window modes); clusters: bounds and determinism."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.testing import assertDataFrameEqual

from reki_core.datasets import synthetic
from spark_jobs import clusters, ctr_samples, items as items_job, user_history


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(1_500, n_users=25, n_items=60, days=6, seed=7, start=dt.date(2024, 2, 1))


@pytest.fixture(scope="module")
def feature_frames(spark, data):
    inter = spark.createDataFrame(data.interactions)
    raw_items = spark.createDataFrame(data.items.assign(year=data.items["year"].astype("int32")))
    items = items_job.transform(raw_items, inter, None).localCheckpoint()
    return inter, items


@pytest.mark.parametrize("mode", ["earliest", "recent"])
def test_samples_join_only_earlier_knowledge_and_never_their_own_interaction(spark, data, feature_frames, mode):
    inter, items = feature_frames
    params = user_history.WindowParams(mode, recent_window_size=8, max_window=30, refresh_min_new_interactions=3)
    history, versions = user_history.transform(None, None, inter, items, None, params, positive_threshold=3)
    sample_params = ctr_samples.SampleParams(max_hist_len=4, positive_rating_threshold=3, split_fractions=(0.6, 0.2, 0.2))
    samples = ctr_samples.transform(history, versions, items, sample_params).toPandas()
    versions_pd = versions.toPandas()
    rows = history.collect()
    history_pd = {r["user_id"]: r["history"] for r in rows}
    assert len(samples) > 500
    # Each user's row counts the samples (and positives) built from it: ctr_samples' daily totals rely on it.
    made = samples.groupby("user_id").agg(samples=("label", "size"), positives=("label", "sum"))
    counted = {r["user_id"]: (r["samples"], r["positive_samples"]) for r in rows}
    assert {u: counted[u] for u in made.index} == {u: (int(c.samples), int(c.positives)) for u, c in made.iterrows()}
    assert all(counted[u] == (0, 0) for u in set(counted) - set(made.index))

    for user, s in samples.groupby("user_id"):
        v = versions_pd[versions_pd["user_id"] == user]
        events = history_pd[user]
        for row in s.itertuples():
            eligible = v[v["as_of"] < row.ts]
            newest = eligible[eligible["as_of"] == eligible["as_of"].max()]
            assert row.knowledge_as_of < row.ts
            assert row.knowledge_as_of == eligible["as_of"].max()
            assert row.knowledge_window_hash in set(newest["window_hash"])
            # Rebuild the joined window from the history: it must not contain this interaction.
            n = int(row.knowledge_window_n)
            window = events[: min((n + 1) // 2, 30)] if mode == "earliest" else events[max(n - 8, 0): n]
            assert (row.item_id, row.ts) not in {(e["item_id"], e["ts"]) for e in window}
            assert all(e["ts"] < row.ts for e in window)
        # Interactions with no earlier knowledge give no sample; every other one does.
        first_as_of = v["as_of"].min()
        assert len(s) == sum(1 for e in events if e["ts"] > first_as_of)

    # History features: the previous items of the user in time order, at most max_hist_len.
    one = samples.iloc[len(samples) // 2]
    events = history_pd[one["user_id"]]
    pos = [(e["item_id"], e["ts"]) for e in events].index((one["item_id"], one["ts"]))
    assert list(one["hist_item_ids"]) == [e["item_id"] for e in events[max(0, pos - 4): pos]]
    assert list(one["hist_ratings"]) == [e["rating"] for e in events[max(0, pos - 4): pos]]
    assert samples.groupby("user_id")["split"].nunique().max() == 1  # a user stays in one split
    assert set(samples["split"]) == {"train", "valid", "test"}
    assert (samples["label"] == (samples["rating"] > 3).astype("int8")).all()


def test_items_features_titles_popularity_and_dirty_flags(spark):
    raw = spark.createDataFrame(
        [
            ("1", "Usual Suspects, The (1995)", 1995, ["Crime", "Thriller"]),
            ("2", "City of Lost Children, The (Cité des enfants perdus, La) (1995)", None, ["Adventure"]),
            ("3", "Fabuleux destin d'Amélie Poulain, Le  (2001)", 2001, []),
            ("4", None, None, None),
        ],
        "item_id string, title string, year int, genres array<string>",
    )
    inter = spark.createDataFrame([("u", "1", 5, 1), ("v", "1", 3, 2), ("u", "3", 4, 3)], "user_id string, item_id string, rating int, ts bigint")
    first = items_job.transform(raw, inter, None)
    expected_titles = [
        ("1", "The Usual Suspects", 1995, "Crime", 2, True),
        ("2", "The City of Lost Children (Cité des enfants perdus, La)", 1995, "Adventure", 0, True),
        ("3", "Fabuleux destin d'Amélie Poulain, Le", 2001, "unknown", 1, True),
        ("4", None, None, "unknown", 0, True),
    ]
    schema = "item_id string, title string, year int, first_genre string, popularity bigint, needs_refresh boolean"
    assertDataFrameEqual(first.select("item_id", "title", "year", "first_genre", "popularity", "needs_refresh"),
                         spark.createDataFrame(expected_titles, schema))
    # Next day: item 2 changes genre, item 5 is new, one more interaction on item 3.
    raw2 = raw.where("item_id != '2'").unionByName(
        spark.createDataFrame([("2", "City of Lost Children, The (Cité des enfants perdus, La) (1995)", None, ["Fantasy"]),
                               ("5", "New One (2024)", None, ["Drama"])], raw.schema))
    inter2 = spark.createDataFrame([("w", "3", 2, 10)], inter.schema)
    second = items_job.transform(raw2, inter2, first.localCheckpoint())
    got = {r["item_id"]: (r["popularity"], r["needs_refresh"]) for r in second.collect()}
    assert got == {"1": (2, False), "2": (0, True), "3": (2, False), "4": (0, False), "5": (0, True)}
    # A rating of an item the snapshot does not describe: flagged for the run log's count, never a feature row.
    inter3 = inter2.unionByName(spark.createDataFrame([("w", "9", 4, 11)], inter.schema))
    rows = items_job.item_rows(raw2, inter3, first.localCheckpoint())
    assert {r.item_id: r.described for r in rows.collect() if r.item_id in ("3", "9")} == {"3": True, "9": False}
    assert sorted(r.item_id for r in items_job.transform(raw2, inter3, first.localCheckpoint()).collect()) == ["1", "2", "3", "4", "5"]


def test_an_item_described_late_or_again_keeps_the_popularity_of_a_full_build(spark):
    """Item 9 is rated on day 1 before the snapshot describes it; item 2 leaves the snapshot on day 2 and
    comes back on day 3. Chained daily, both end day 3 with the popularity a full build of day 3 gives."""
    schema = "item_id string, title string, year int, genres array<string>"
    inter_schema = "user_id string, item_id string, rating int, ts bigint"
    both = [("2", "Two (1990)", None, ["Drama"]), ("9", "Nine (1999)", None, ["Comedy"])]
    snapshots = [spark.createDataFrame(rows, schema) for rows in (both[:1], [], both)]
    days = [spark.createDataFrame(rows, inter_schema) for rows in (
        [("u", "9", 4, 1), ("v", "9", 2, 2), ("u", "2", 5, 3)], [("w", "9", 5, 4)], [("x", "2", 3, 5)])]
    previous = undescribed = None
    for snapshot, inter in zip(snapshots, days):
        rows = items_job.item_rows(snapshot, inter, previous, undescribed).localCheckpoint()
        previous = rows.where("described").drop("described")
        undescribed = rows.where("not described").select("item_id", "popularity")
    assert {r.item_id: r.popularity for r in undescribed.collect()} == {}
    all_days = days[0].unionByName(days[1]).unionByName(days[2])
    full = items_job.transform(snapshots[2], all_days, None)
    assertDataFrameEqual(previous.select("item_id", "popularity"), full.select("item_id", "popularity"))
    assert {r.item_id: r.popularity for r in full.collect()} == {"2": 2, "9": 3}


def test_user_profiles_count_only_the_knowledge_window(spark):
    """Ratings after the window (what later CTR samples are about) do not move a user between groups."""
    items = spark.createDataFrame([("1", ["Drama"]), ("2", ["Comedy"])], "item_id string, genres array<string>")
    rows = [("u", [("1", 10, 5)], [("1", 10, 5), ("2", 20, 5), ("2", 30, 1)])]
    history = spark.createDataFrame(
        rows, "user_id string, window array<struct<item_id:string,ts:bigint,rating:int>>, "
              "history array<struct<item_id:string,ts:bigint,rating:int>>")
    [counts] = clusters.user_genre_counts(history, items, threshold=3).collect()
    assert dict(counts["liked"]) == {"Drama": 1} and dict(counts["disliked"]) == {"Drama": 0}


def test_clusters_bounded_every_entity_once_and_deterministic(spark, data, feature_frames):
    inter, items = feature_frames
    params = user_history.WindowParams("earliest", 8, 30, 3)
    history, _ = user_history.transform(None, None, inter, items, None, params, positive_threshold=3)
    history = history.select("user_id", "window").localCheckpoint()
    first = clusters.transform(items, history, max_items=7, max_users=6, threshold=3).localCheckpoint()
    out = first.toPandas()
    sizes = out.groupby(["clustering", "group_id"]).size()
    assert sizes.loc["item"].max() <= 7 and sizes.loc["user_pos"].max() <= 6 and sizes.loc["user_neg"].max() <= 6
    for clustering, expected in (("item", set(data.items["item_id"])), ("user_pos", set(data.interactions["user_id"])),
                                 ("user_neg", set(data.interactions["user_id"]))):
        members = out[out["clustering"] == clustering]["entity_id"]
        assert members.is_unique and set(members) == expected
    assert (out.groupby("group_id")["group_size"].first() == out.groupby("group_id").size()).all()
    again = clusters.name_groups(clusters.bounded_groups(clusters.item_points(items), 7), "item")
    assertDataFrameEqual(again, first.where("clustering = 'item'"))
