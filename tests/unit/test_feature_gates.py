"""The feature gates fail on what they guard, and name the rows that broke a rule."""

from __future__ import annotations

import pandas as pd
import pytest

from reki_core.quality.features import clusters_gate, run_feature_gates, user_history_gate
from reki_core.quality.gx import GateError
from tests.conftest import make_config
from tests.unit.test_gx_data_docs import DAY, seed_features


def entries(n: int) -> list[dict]:
    return [{"ts": 100 + i, "item_id": f"i{i}"} for i in range(n)]


def history(rows) -> pd.DataFrame:
    """rows: (user_id, n_interactions, window_n, window length)."""
    return pd.DataFrame([{"user_id": u, "history": entries(n), "n_interactions": n, "window": entries(w),
                          "window_n": wn, "as_of": 100 + w - 1} for u, n, wn, w in rows])


def test_a_window_cut_against_the_rule_is_named(cfg):
    ok = user_history_gate(history([("u1", 10, 10, 5), ("u2", 3, 2, 1)]), cfg)  # earliest: (n + 1) // 2
    assert ok.success, ok.summary()
    bad = user_history_gate(history([("u1", 10, 10, 5), ("u2", 10, 10, 10)]), cfg)  # u2 shows its whole history
    [failure] = bad.failed
    assert failure.column == "window_len_not_by_rule" and failure.unexpected_count == 1
    assert "u2" in failure.describe()


def test_the_recent_rule_is_checked_in_recent_mode(tmp_path):
    cfg = make_config(tmp_path, REKI__SCENARIO_OVERRIDES__KNOWLEDGE_WINDOW="recent")
    size = cfg.scenario.recent_window_size
    assert user_history_gate(history([("u1", size + 5, size + 5, size)]), cfg).success
    assert not user_history_gate(history([("u1", size + 5, size + 5, (size + 6) // 2)]), cfg).success


def test_oversized_groups_and_unassigned_members_are_named(cfg):
    items, users = pd.Series(["i1", "i2"]), pd.Series(["u1", "u2"])
    rows = [("item", "g1", "i1"), ("item", "g1", "i2"), ("user_pos", "p1", "u1"), ("user_pos", "p1", "u2"),
            ("user_neg", "n1", "u1")]  # u2 has no negative group
    clusters = pd.DataFrame(rows, columns=["clustering", "group_id", "entity_id"])
    strict = make_config(cfg.state_dir.parent / "strict", REKI__SCENARIO_OVERRIDES__MAX_GROUP_SIZE_USERS="1")
    result = clusters_gate(clusters, items, users, strict)
    described = " ".join(o.describe() for o in result.failed)
    assert "user_neg:u2" in described and "user_pos:p1 (2)" in described


def test_collective_mode_without_groups_fails_the_gate(tmp_path):
    cfg = make_config(tmp_path, REKI__SCENARIO_OVERRIDES__EXTRACTION_MODE="collective")
    from reki_core.storage.lake import Lake

    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    with pytest.raises(GateError) as err:
        run_feature_gates(cfg, DAY, lake)
    assert "features/clusters" in str(err.value) and "partition_written" in str(err.value)


def test_a_day_of_changes_is_gated_on_its_rows_and_on_the_recorded_state_totals(cfg):
    """A keyed dataset's daily gate reads the rows written on the day (the others were gated when written) and takes
    the whole state's rules (samples, label rate) from the totals the job recorded with the day."""
    import datetime as dt
    import json

    from reki_core.storage.lake import TOTALS_PROPERTY, Lake
    from tests.unit.test_gx_data_docs import TS

    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    day = DAY + dt.timedelta(days=1)
    lake.write_partition(lake.read_partition("features/items", DAY), "features/items", day)
    entries_of_u2 = [{"ts": TS - 20, "item_id": "i1"}, {"ts": TS - 10, "item_id": "i2"}]

    def changes(window_len: int, totals: dict) -> None:
        """u2's rows written again on `day` (2 interactions, a window of `window_len`), with the state's totals."""
        lake.write_partition(pd.DataFrame({"user_id": ["u2"], "history": [entries_of_u2], "n_interactions": [2],
                                           "window": [entries_of_u2[:window_len]], "window_n": [2],
                                           "as_of": [entries_of_u2[window_len - 1]["ts"]]}),
                             "features/user_history", day, changes_only=True)
        lake.write_partition(pd.DataFrame({"user_id": ["u2"] * 2, "item_id": ["i1", "i2"], "ts": [TS + 2, TS + 3],
                                           "label": [1, 0], "split": ["valid", "valid"], "knowledge_as_of": [TS - 1] * 2,
                                           "hist_item_ids": [[], ["i1"]]}), "features/ctr_samples", day, changes_only=True)
        with lake.load_table("features/ctr_samples").transaction() as tx:
            tx.set_properties({f"{TOTALS_PROPERTY}{day.isoformat()}": json.dumps(totals)})

    def gated() -> dict:
        return {g["dataset"]: g for g in run_feature_gates(cfg, day, lake)["gates"]}

    half = {"samples_per_split": {"train": 2, "valid": 2, "test": 0}, "positives_per_split": {"train": 1, "valid": 1, "test": 0}}
    changes(window_len=1, totals=half)  # earliest: (2 + 1) // 2 = 1
    gates = gated()
    assert gates["features/user_history"]["rows"] == 1 and gates["features/ctr_samples"]["rows"] == 2
    # The state's rules read the totals, not the rows: all positive, and the rate is out of bounds.
    changes(window_len=2, totals={**half, "positives_per_split": half["samples_per_split"]})
    with pytest.raises(GateError) as err:
        gated()
    message = str(err.value)
    assert "window_len_not_by_rule" in message and "u2" in message
    assert "column 'label_rate'" in message and "u1" not in message


def test_a_state_written_without_totals_is_counted_from_its_rows(cfg):
    from reki_core.quality.features import sample_totals
    from reki_core.storage.lake import Lake

    lake = Lake(cfg.lake_uri)
    seed_features(lake)  # written by pyiceberg, which records no totals
    assert lake.state_totals("features/ctr_samples", DAY) is None
    totals = sample_totals(lake, DAY)
    assert totals == {"samples_per_split": {"train": 2, "valid": 1, "test": 1},
                      "positives_per_split": {"train": 1, "valid": 1}}
    assert run_feature_gates(cfg, DAY, lake)["success"]
