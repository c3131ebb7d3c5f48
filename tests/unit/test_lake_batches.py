"""Streaming a day of a table (`Lake.read_batches`, `Lake.write_batches`): bounded record batches in, bounded batches
out, and the same rows as the whole-day reads and writes."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pytest

from reki_core.storage.lake import FULL_DAY, Lake

D1, D2, D3 = (dt.date(2024, 1, d) for d in (1, 2, 3))
HISTORY = "features/user_history"  # keyed by user_id, with the day flag needs_refresh
SCHEMA = pa.schema([("user_id", pa.string()), ("n", pa.int64()), ("split", pa.string())])


def _batch(users, n, split="train") -> pa.RecordBatch:
    return pa.record_batch([pa.array(users, pa.string()), pa.array([n] * len(users), pa.int64()),
                            pa.array([split] * len(users), pa.string())], schema=SCHEMA)


def _rows(batches) -> pd.DataFrame:
    return pa.Table.from_batches(list(batches)).to_pandas()


def test_a_day_written_in_batches_reads_back_in_batches_of_at_most_batch_rows(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    written = [_batch([f"u{i}" for i in range(s, s + 9)], s) for s in range(0, 45, 9)]  # 5 batches, 5 data files
    lake.write_batches(iter(written), SCHEMA, "raw/interactions", D1)
    assert lake.day_kinds("raw/interactions") == {D1: FULL_DAY}
    whole = lake.read_partition("raw/interactions", D1, ["user_id", "n"])
    assert len(whole) == 45

    sizes = [b.num_rows for b in lake.read_batches("raw/interactions", D1, ["n", "user_id"], 7)]
    assert sizes == [7] * 6 + [3]  # files of 9 rows regrouped: never more than 7, only the last fewer
    streamed = _rows(lake.read_batches("raw/interactions", D1, ["user_id", "n"], 7))
    pd.testing.assert_frame_equal(streamed, whole)  # same rows, same order
    assert list(streamed["user_id"]) == [f"u{i}" for i in range(45)]  # the order written
    assert list(_rows(lake.read_batches("raw/interactions", D1, ["n"], 100)).columns) == ["n"]


def test_a_rewrite_replaces_the_day_and_no_batch_writes_an_empty_day(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_batches([_batch(["a", "b"], 1), _batch(["c"], 1)], SCHEMA, "raw/interactions", D1)
    lake.write_batches([_batch(["d"], 2)], SCHEMA, "raw/interactions", D2)
    lake.write_batches([_batch(["e"], 3)], SCHEMA, "raw/interactions", D1)  # a re-run of D1
    assert list(lake.read_partition("raw/interactions", D1)["user_id"]) == ["e"]
    assert list(lake.read_partition("raw/interactions", D2)["user_id"]) == ["d"]
    lake.write_batches(iter([]), SCHEMA, "raw/interactions", D3)
    assert lake.has_partition("raw/interactions", D3) and lake.read_partition("raw/interactions", D3).empty
    assert list(lake.read_batches("raw/interactions", D3, ["user_id"], 10)) == []


def test_a_failing_batch_leaves_the_day_as_it_was(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_batches([_batch(["a"], 1)], SCHEMA, "raw/interactions", D1)

    def batches():
        yield _batch(["b"], 2)
        raise RuntimeError("the adaptor failed")

    with pytest.raises(RuntimeError, match="the adaptor failed"):
        lake.write_batches(batches(), SCHEMA, "raw/interactions", D1)
    assert list(lake.read_partition("raw/interactions", D1)["user_id"]) == ["a"]  # one commit, or none


def test_a_keyed_state_streams_as_read_partition_gives_it_with_where_and_day_flags(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    first = pd.DataFrame({"user_id": ["a", "a", "b", "c"], "n": [1, 1, 1, 1],
                          "split": ["train", "test", "train", "train"], "needs_refresh": True})
    lake.write_partition(first, HISTORY, D1)
    # On D2 only a and d changed: a's D1 rows (its test row too) are no longer the state.
    lake.write_partition(pd.DataFrame({"user_id": ["a", "d"], "n": [2, 2], "split": ["train", "test"],
                                       "needs_refresh": True}), HISTORY, D2, changes_only=True)
    columns = ["user_id", "n", "split", "needs_refresh"]
    whole = lake.read_partition(HISTORY, D2, columns)
    streamed = _rows(lake.read_batches(HISTORY, D2, columns, 1))
    key = ["user_id", "split"]
    pd.testing.assert_frame_equal(streamed.sort_values(key, ignore_index=True), whole.sort_values(key, ignore_index=True))
    assert dict(zip(streamed["user_id"], streamed["needs_refresh"])) == {"a": True, "b": False, "c": False, "d": True}

    tests = _rows(lake.read_batches(HISTORY, D2, ["user_id", "n"], 2, where={"split": "test"}))
    assert tests.to_dict("list") == {"user_id": ["d"], "n": [2]}  # a's test row of D1 is stale, though D2 kept none
    assert sorted(_rows(lake.read_batches(HISTORY, D1, ["user_id"], 2, where={"split": "train"}))["user_id"]) == \
        ["a", "b", "c"]


def test_a_missing_day_is_named(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_batches([_batch(["a"], 1)], SCHEMA, "raw/interactions", D1)
    with pytest.raises(FileNotFoundError, match="lake partition missing: raw/interactions/dt=2024-01-02"):
        next(lake.read_batches("raw/interactions", D2, ["user_id"], 10))
