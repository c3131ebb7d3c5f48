"""The feature gates fail on what they guard, and name the rows that broke a rule (the rules the Spark job
`feature_checks` evaluates: tests/spark/test_feature_checks.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from reki_core.quality.features import run_feature_gates, user_history_gate
from reki_core.quality.gx import GateError
from tests.conftest import make_config
from tests.unit.test_gx_data_docs import DAY, record_feature_checks, seed_features


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


def test_the_gate_runs_its_suites_on_the_recorded_checks_with_their_whole_counts(cfg, lake):
    """What the feature_checks job recorded (tests/spark/test_feature_checks.py runs the job) is what the gate expects:
    offending rows and keys, each failure reported with the job's count over the whole partition."""
    from reki_core.runlog import record_step

    seed_features(lake)
    checks = record_feature_checks(lake)
    assert run_feature_gates(cfg, DAY, lake)["success"]
    checks["items"].update(failed={"popularity_not_negative": 41}, examples=[
        {"item_id": "i1", "popularity": -3, "metadata_hash": "h1"}])
    checks["clusters"] = {"rows": 9, "clusterings": ["item", "user_neg", "user_pos"],
                          "groups": {"failed": {}, "examples": []},
                          "members": {"failed": {"not_assigned_exactly_once": 12},
                                      "examples": [{"not_assigned_exactly_once": "user_neg:u2"}]}}
    record_step(lake, DAY, "feature_checks", {"success": True, "checks": checks})
    with pytest.raises(GateError) as err:
        run_feature_gates(cfg, DAY, lake)
    message = str(err.value)
    assert "features/items (2 rows)" in message and "column 'popularity'" in message and "41 unexpected" in message
    assert "features/clusters (9 rows)" in message and "12 unexpected" in message and "user_neg:u2" in message
