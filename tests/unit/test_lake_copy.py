"""A benchmark's copy of a lake through the tables' API: every day of every table not skipped, with its rows, into
the copy's own catalog (what bench/model_quality.py does with the configured lake, whose tables are on the store)."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from reki_core.storage.lake import Lake

D1, D2 = dt.date(1998, 3, 30), dt.date(1998, 3, 31)


def test_copy_tables_to_copies_each_day_and_leaves_skipped_datasets_out(tmp_path):
    source = Lake(str(tmp_path / "source"))
    for day, n in ((D1, 2), (D2, 3)):
        source.write_partition(pd.DataFrame({"user_id": [f"u{i}" for i in range(n)], "rating": range(n)}),
                               "raw/interactions", day)
    source.write_partition(pd.DataFrame({"prompt": ["p"]}), "prompts", D2)
    source.write_partition(pd.DataFrame({"text": ["k"]}), "knowledge/assigned", D2)
    source.write_partition(pd.DataFrame(columns=["user_id"]), "features/empty_day", D1)  # an empty day still exists
    assert source.table_datasets() == ["features/empty_day", "knowledge/assigned", "prompts", "raw/interactions"]

    dest = Lake(str(tmp_path / "dest"))
    copied = source.copy_tables_to(dest, skip=frozenset({"knowledge", "prompts"}))

    assert copied == ["features/empty_day", "raw/interactions"]
    assert dest.table_datasets() == copied
    assert dest.partitions("raw/interactions") == [D1, D2]
    pd.testing.assert_frame_equal(dest.read_partition("raw/interactions", D2),
                                  source.read_partition("raw/interactions", D2))
    assert dest.partitions("features/empty_day") == [D1] and dest.read_partition("features/empty_day", D1).empty
    assert not dest.has_partition("prompts", D2)


def test_a_store_lake_never_shows_its_catalog_login(monkeypatch, tmp_path):
    from reki_core.storage.lake import TableStore
    from reki_core.storage.s3_access import S3Access

    store = TableStore("lake", "postgresql+psycopg2://reki_lake:s3cret-login@db:5432/reki_lake",
                       {"spark.sql.catalog.lake.uri": "jdbc:postgresql://db:5432/reki_lake"}, "s3a://reki-lake/warehouse",
                       S3Access("http://store:8333", "reki-lake", "writer-key", "writer-secret"))
    shown = repr(Lake(str(tmp_path / "lake"), store))
    assert "s3cret-login" not in repr(store) and "writer-secret" not in repr(store) and "s3cret-login" not in shown
    assert "s3a://reki-lake/warehouse" in repr(store)
