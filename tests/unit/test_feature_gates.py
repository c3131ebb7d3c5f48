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
