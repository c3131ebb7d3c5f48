"""The per-user datasets written as changes (`KEYED_DATASETS`): a day stores only the users that changed, and a
reader of a day gets the state as of that day, back to the newest full day."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from reki_core.storage.lake import CHANGES_DAY, FULL_DAY, Lake

HISTORY = "features/user_history"
D1, D2, D3, D4 = (dt.date(2024, 1, d) for d in (1, 2, 3, 4))


def _rows(*pairs) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [u for u, _ in pairs], "n": [n for _, n in pairs]})


def _state(lake: Lake, day) -> dict[str, int]:
    frame = lake.read_partition(HISTORY, day)
    return dict(zip(frame["user_id"], frame["n"]))


def test_a_day_of_changes_replaces_only_its_users(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_rows(("a", 1), ("b", 1), ("c", 1)), HISTORY, D1)
    lake.write_partition(_rows(("b", 2)), HISTORY, D2, changes_only=True)
    lake.write_partition(_rows(("c", 3), ("d", 3)), HISTORY, D3, changes_only=True)
    assert _state(lake, D1) == {"a": 1, "b": 1, "c": 1}
    assert _state(lake, D2) == {"a": 1, "b": 2, "c": 1}
    assert _state(lake, D3) == {"a": 1, "b": 2, "c": 3, "d": 3}
    assert lake.day_kinds(HISTORY) == {D1: FULL_DAY, D2: CHANGES_DAY, D3: CHANGES_DAY}
    assert list(lake.read_day_rows(HISTORY, D2)["user_id"]) == ["b"]  # what D2 stored
    # Only the columns asked for, in that order, the key resolved all the same.
    assert list(lake.read_partition(HISTORY, D3, ["n"]).columns) == ["n"]


def test_a_full_day_hides_the_days_before_it_and_a_rerun_replaces_exactly_its_day(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_rows(("a", 1), ("gone", 1)), HISTORY, D1)
    lake.write_partition(_rows(("a", 2)), HISTORY, D2, changes_only=True)
    lake.write_partition(_rows(("a", 3), ("b", 3)), HISTORY, D3)  # a rebuild: every user
    lake.write_partition(_rows(("b", 4)), HISTORY, D4, changes_only=True)
    assert lake.state_days(HISTORY, D4) == [D3, D4]
    assert _state(lake, D4) == {"a": 3, "b": 4}  # "gone" was not in the rebuild
    lake.write_partition(_rows(), HISTORY, D4, changes_only=True)  # a re-run of D4 that changes nobody
    assert _state(lake, D4) == {"a": 3, "b": 3} and len(lake.read_day_rows(HISTORY, D4)) == 0


def test_changes_are_only_for_keyed_datasets_and_their_days_are_not_ranges(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(ValueError, match="only a keyed dataset"):
        lake.write_partition(_rows(("a", 1)), "features/items", D1, changes_only=True)
    lake.write_partition(_rows(("a", 1)), HISTORY, D1)
    with pytest.raises(ValueError, match="written as changes: read_partition"):
        lake.read_range(HISTORY, upto=D1)


def test_a_copy_keeps_each_days_changes_and_kind(tmp_path):
    source, copy = Lake(str(tmp_path / "a")), Lake(str(tmp_path / "b"))
    source.write_partition(_rows(("a", 1), ("b", 1)), HISTORY, D1)
    source.write_partition(_rows(("b", 2)), HISTORY, D2, changes_only=True)
    source.copy_tables_to(copy)
    assert copy.day_kinds(HISTORY) == source.day_kinds(HISTORY)
    assert _state(copy, D2) == _state(source, D2) == {"a": 1, "b": 2}
    assert len(copy.read_day_rows(HISTORY, D2)) == 1


def test_a_day_flag_holds_only_on_the_day_its_row_was_written(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    flagged = pd.DataFrame({"user_id": ["a", "b"], "needs_refresh": [True, True]})
    lake.write_partition(flagged, HISTORY, D1)
    lake.write_partition(flagged.iloc[1:], HISTORY, D2, changes_only=True)  # b refreshed again on D2
    lake.write_partition(flagged.iloc[0:0], HISTORY, D3, changes_only=True)  # nobody changed on D3
    flags = {d: dict(zip(*lake.read_partition(HISTORY, d)[["user_id", "needs_refresh"]].T.values)) for d in (D1, D2, D3)}
    assert flags == {D1: {"a": True, "b": True}, D2: {"a": False, "b": True}, D3: {"a": False, "b": False}}


def test_totals_recorded_with_a_day_go_when_the_day_is_written_again_or_deleted(tmp_path):
    """A day's state totals (`TOTALS_PROPERTY`, recorded by the Spark job that wrote the day) describe those rows only:
    another write of the day, or its deletion, removes them, so the next daily run aggregates instead of carrying."""
    from reki_core.storage.lake import TOTALS_PROPERTY

    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(_rows(("a", 1), ("b", 1)), HISTORY, D1)
    lake.write_partition(_rows(("b", 2)), HISTORY, D2, changes_only=True)
    assert lake.state_totals(HISTORY, D2) is None
    for day, users in ((D1, 2), (D2, 2)):
        with lake.load_table(HISTORY).transaction() as tx:
            tx.set_properties({f"{TOTALS_PROPERTY}{day.isoformat()}": f'{{"users": {users}}}'})
    assert lake.state_totals(HISTORY, D2) == {"users": 2}
    lake.write_partition(_rows(("b", 3), ("c", 3)), HISTORY, D2, changes_only=True)
    assert lake.state_totals(HISTORY, D2) is None and lake.state_totals(HISTORY, D1) == {"users": 2}
    lake.delete_partition(HISTORY, D1)
    assert lake.state_totals(HISTORY, D1) is None and D1 not in lake.day_kinds(HISTORY)
