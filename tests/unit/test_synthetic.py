"""The synthetic generator: raw schema, determinism by seed, Zipf skew, lake layout."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from reki_core.datasets import schema, synthetic


def test_same_seed_same_frames_and_raw_schema():
    a = synthetic.generate(5_000, seed=3, days=5)
    b = synthetic.generate(5_000, seed=3, days=5)
    c = synthetic.generate(5_000, seed=4, days=5)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)
    assert list(a.interactions.columns) == list(schema.INTERACTIONS)
    assert list(a.users.columns) == list(schema.USERS)
    assert list(a.items.columns) == list(schema.ITEMS)
    assert a.interactions["rating"].between(1, 5).all()
    assert not a.interactions.duplicated(["user_id", "item_id", "ts"]).any()
    assert set(a.interactions["item_id"]) <= set(a.items["item_id"])
    assert set(a.interactions["user_id"]) <= set(a.users["user_id"])


def test_popularity_and_activity_are_skewed():
    data = synthetic.generate(50_000, n_users=500, n_items=1_000, seed=1)
    item_counts = data.interactions["item_id"].value_counts()
    user_counts = data.interactions["user_id"].value_counts()
    # Zipf: the top 1% of items take far more than 1% of the interactions.
    assert item_counts.head(10).sum() / item_counts.sum() > 0.15
    assert user_counts.iloc[0] > 10 * user_counts.median()
    assert 0.3 < (data.interactions["rating"] > 3).mean() < 0.7


def test_write_raw_lake_partitions_by_utc_day(lake):
    data = synthetic.generate(2_000, seed=2, days=4, start=dt.date(2024, 3, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    assert days == [dt.date(2024, 3, d) for d in range(1, 5)]
    assert lake.partitions("raw/interactions") == days
    total = sum(len(lake.read_partition("raw/interactions", d)) for d in days)
    assert total == len(data.interactions)
    first_day = lake.read_partition("raw/interactions", days[0])
    assert (pd.to_datetime(first_day["ts"], unit="s", utc=True).dt.date == days[0]).all()
    users_day1 = lake.read_partition("raw/users", days[0])
    users_last = lake.read_partition("raw/users", days[-1])
    assert set(users_day1["user_id"]) == set(first_day["user_id"])
    assert set(users_day1["user_id"]) <= set(users_last["user_id"])


def test_the_books_scenarios_replay_spans_its_source_dates():
    """`source.kind: synthetic` (conf/scenarios/books.yaml) replays a fixed history over the scenario's dates."""
    from reki_core.config import load_config
    from reki_core.datasets.source import _replay_frames

    source = load_config(environ={"REKI__SCENARIO": "books"}).scenario.source
    assert source.kind == "synthetic"
    start, end = source.start_date, source.end_date
    inter, users, items = _replay_frames(source.kind, "unused", start, end)
    days = synthetic.interaction_days(inter)
    assert days.min() == start and days.max() == end
    assert len(inter) > 0.99 * synthetic.REPLAY_INTERACTIONS
    assert set(inter["user_id"]) <= set(users["user_id"]) and set(inter["item_id"]) <= set(items["item_id"])
    again = _replay_frames.__wrapped__("synthetic", "unused", start, end)[0]
    pd.testing.assert_frame_equal(inter, again)
