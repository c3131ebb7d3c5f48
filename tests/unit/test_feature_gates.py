"""The feature gates fail on what they guard, and name the rows that broke a rule (the rules the Spark job
`feature_checks` evaluates: tests/spark/test_feature_checks.py)."""

from __future__ import annotations

import pytest

from reki_core.quality.features import run_feature_gates
from reki_core.quality.gx import GateError
from tests.unit.test_gx_data_docs import DAY, record_feature_checks, seed_features


def test_the_gate_runs_its_suites_on_the_recorded_checks_with_their_whole_counts(cfg, lake):
    """What the feature_checks job recorded (tests/spark/test_feature_checks.py runs the job) is what the gate expects:
    offending rows and keys, each failure reported with the job's count over the whole partition."""
    from reki_core.runlog import record_step

    seed_features(lake)
    checks = record_feature_checks(lake)
    assert run_feature_gates(cfg, DAY, lake)["success"]
    checks["items"].update(failed={"popularity_not_negative": 41}, examples=[
        {"item_id": "i1", "popularity": -3, "metadata_hash": "h1"}])
    checks["user_history"].update(failed={"window_len_not_by_rule": 7}, examples=[
        {"user_id": "u2", "window_len": 1, "window_len_not_by_rule": "u2"}])
    checks["ctr_samples"].update(failed={"knowledge_not_before_sample": 1200, "sample_key_unique": 2}, examples=[
        {"user_id": "u1", "item_id": "i1", "ts": 5, "split": "train", "knowledge_before_sample": False, "hist_len": 0},
        {"user_id": "u2", "item_id": "i1", "ts": 9, "split": "train", "knowledge_before_sample": True, "hist_len": 1},
        {"user_id": "u2", "item_id": "i1", "ts": 9, "split": "train", "knowledge_before_sample": True, "hist_len": 1}])
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
    [window] = [line for line in message.splitlines() if "column 'window_len_not_by_rule'" in line]
    assert "7 unexpected" in window and "u2" in window
    [knowledge] = [line for line in message.splitlines() if "column 'knowledge_before_sample'" in line]
    assert "1200 unexpected" in knowledge and "features/ctr_samples (4 rows)" in message
    assert "expect_compound_columns_to_be_unique" in message and "2 unexpected" in message


def test_the_days_rows_rewritten_after_the_job_are_refused(cfg, lake):
    """The keyed datasets are checked on the day's rows: a day rewritten after the job is not the one it checked."""
    seed_features(lake)
    record_feature_checks(lake)
    assert run_feature_gates(cfg, DAY, lake)["success"]
    samples = lake.read_day_rows("features/ctr_samples", DAY)
    lake.write_partition(samples.assign(split=["train", "train", "train", "test"]), "features/ctr_samples", DAY)
    with pytest.raises(GateError, match=r"(?s)partition_is_the_one_the_feature_checks_job_checked.*ctr_samples"):
        run_feature_gates(cfg, DAY, lake)


def test_a_record_of_an_older_job_version_asks_for_the_job_again(cfg, lake):
    """A record written before the day's rows were checked in Spark (no `day_fingerprint`) is no record: a clear
    error that names the record and the task to run, not a KeyError."""
    from reki_core.runlog import record_step

    seed_features(lake)
    checks = record_feature_checks(lake)
    del checks["day_fingerprint"]
    record_step(lake, DAY, "feature_checks", {"success": True, "checks": checks})
    with pytest.raises(GateError, match=r"(?s)feature_checks_job_recorded_its_checks.*run the feature_checks task"):
        run_feature_gates(cfg, DAY, lake)
