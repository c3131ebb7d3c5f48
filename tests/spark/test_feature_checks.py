"""The feature gate's rules (items, groups, and the user histories and samples written on the day), evaluated by the
Spark job `feature_checks` and expected by the gate on what it recorded: each rule fails on a bad partition (naming dataset, column, count and offenders) and passes on a
good one; a partition rewritten after the job, or a day the job never checked, is refused."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pytest

from reki_core.quality.features import run_feature_gates
from reki_core.quality.gx import GateError
from reki_core.storage.lake import TOTALS_PROPERTY, Lake
from spark_jobs.common import jobs_named, run_jobs
from tests.conftest import make_config
from tests.unit.test_gx_data_docs import DAY, TS, seed_features

GOOD_ITEMS = pd.DataFrame({"item_id": ["i1", "i2"], "popularity": [3, 1], "metadata_hash": ["h1", "h2"]})
# Every item and user of seed_features once in each clustering.
GOOD_GROUPS = [("item", "g1", "i1"), ("item", "g1", "i2"), ("user_pos", "p1", "u1"), ("user_pos", "p1", "u2"),
               ("user_neg", "n1", "u1"), ("user_neg", "n2", "u2")]


def checked(spark, cfg, lake: Lake, day=DAY) -> dict:
    """The job (as the DAG's feature_checks task runs it), then the gate; the gate's summary."""
    [payload] = run_jobs(spark, jobs_named(["feature_checks"]), cfg, lake, day).values()
    assert payload["checks"]["items"]["rows"] == payload["items"]
    return run_feature_gates(cfg, day, lake)


def failure(spark, cfg, lake: Lake, day=DAY) -> str:
    with pytest.raises(GateError) as err:
        checked(spark, cfg, lake, day)
    return str(err.value)


def write_groups(lake: Lake, rows, day=DAY) -> None:
    lake.write_partition(pd.DataFrame(rows, columns=["clustering", "group_id", "entity_id"]), "features/clusters", day)


@pytest.mark.parametrize("column, bad, count, named", [
    ("item_id", {"item_id": [None, "i2", None]}, 2, None),
    ("item_id", {"item_id": ["i2", "i2", "i2"]}, 3, "i2"),
    ("popularity", {"popularity": [3, -1, -5]}, 2, "-1"),
    ("metadata_hash", {"metadata_hash": ["h1", None, None]}, 2, None),
], ids=["id-null", "id-duplicate", "popularity-negative", "hash-null"])
def test_each_item_rule_fails_on_a_bad_partition_with_the_whole_count(spark, cfg, column, bad, count, named):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    assert checked(spark, cfg, lake)["success"] is True
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3"], "popularity": [3, 1, 0], "metadata_hash": ["h1", "h2", "h3"]})
    lake.write_partition(items.assign(**bad), "features/items", DAY)
    message = failure(spark, cfg, lake)
    assert f"features/items ({len(items)} rows)" in message
    [line] = [line for line in message.splitlines() if f"column '{column}'" in line]
    assert f"{count} unexpected" in line, message
    if named:
        assert repr(named) in line or named in line, message
    assert lake.read_json(f"_runs/dt={DAY}/feature_gates.json")["success"] is False


def test_oversized_groups_unassigned_members_and_unknown_entities_are_named(spark, cfg):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    write_groups(lake, GOOD_GROUPS)
    summary = checked(spark, cfg, lake)
    assert summary["success"] and [g["dataset"] for g in summary["gates"]][-1] == "features/clusters"

    strict = make_config(cfg.state_dir.parent / "strict", REKI__SCENARIO_OVERRIDES__MAX_GROUP_SIZE_USERS="1")
    strict_lake = Lake(strict.lake_uri)
    seed_features(strict_lake)
    rows = [("item", "g1", "i1"), ("item", "g1", "i2"), ("user_pos", "p1", "u1"), ("user_pos", "p1", "u2"),
            ("user_neg", "n1", "u1"), ("user_neg", "n1", "ghost"), ("user_neg", "n2", "u1")]
    write_groups(strict_lake, rows)  # u2 has no negative group, u1 two, ghost is no user; p1 and n1 too big
    message = failure(spark, strict, strict_lake)
    [groups] = [line for line in message.splitlines() if "column 'group_over_size_bound'" in line]
    assert "2 unexpected" in groups and "user_pos:p1 (2)" in groups
    [members] = [line for line in message.splitlines() if "column 'not_assigned_exactly_once'" in line]
    assert "3 unexpected" in members and "user_neg:u2" in members and "user_neg:ghost" in members


def test_a_clustering_missing_fails_the_distinct_set(spark, cfg):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    write_groups(lake, [r for r in GOOD_GROUPS if r[0] != "user_neg"])
    message = failure(spark, cfg, lake)
    assert "expect_column_distinct_values_to_contain_set column 'clustering'" in message
    assert "not_assigned_exactly_once" in message  # the users have no negative group


def test_collective_mode_without_groups_fails_the_gate(spark, tmp_path):
    cfg = make_config(tmp_path, REKI__SCENARIO_OVERRIDES__EXTRACTION_MODE="collective")
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    message = failure(spark, cfg, lake)
    assert "features/clusters" in message and "partition_written" in message


def test_a_partition_rewritten_after_the_job_or_never_checked_is_refused(spark, cfg):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    with pytest.raises(GateError, match=r"(?s)feature_checks_job_recorded_its_checks.*run the feature_checks task"):
        run_feature_gates(cfg, DAY, lake)
    assert checked(spark, cfg, lake)["success"]
    lake.write_partition(GOOD_ITEMS.assign(popularity=[3, 2]), "features/items", DAY)
    with pytest.raises(GateError, match=r"(?s)partition_is_the_one_the_feature_checks_job_checked.*features/items"):
        run_feature_gates(cfg, DAY, lake)
    assert checked(spark, cfg, lake)["success"]
    write_groups(lake, GOOD_GROUPS)  # groups written after the job found none
    with pytest.raises(GateError, match=r"(?s)features/clusters.*re-run the feature_checks task"):
        run_feature_gates(cfg, DAY, lake)


def test_a_day_of_changes_is_gated_on_its_rows_and_on_the_recorded_state_totals(spark, cfg):
    """A keyed dataset's daily gate reads the rows written on the day (the others were gated when written) and takes
    the whole state's rules (samples, label rate) from the totals the job recorded with the day."""
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

    half = {"samples_per_split": {"train": 2, "valid": 2, "test": 0}, "positives_per_split": {"train": 1, "valid": 1, "test": 0}}
    changes(window_len=1, totals=half)  # earliest: (2 + 1) // 2 = 1
    gates = {g["dataset"]: g for g in checked(spark, cfg, lake, day)["gates"]}
    assert gates["features/user_history"]["rows"] == 1 and gates["features/ctr_samples"]["rows"] == 2
    assert gates["features/items"]["rows"] == 2
    # The state's rules read the totals, not the rows: all positive, and the rate is out of bounds.
    changes(window_len=2, totals={**half, "positives_per_split": half["samples_per_split"]})
    message = failure(spark, cfg, lake, day)
    assert "window_len_not_by_rule" in message and "u2" in message
    assert "column 'label_rate'" in message and "u1" not in message


def test_a_state_written_without_totals_is_counted_from_its_rows(spark, cfg):
    from reki_core.quality.features import sample_totals

    lake = Lake(cfg.lake_uri)
    seed_features(lake)  # written by pyiceberg, which records no totals
    assert lake.state_totals("features/ctr_samples", DAY) is None
    assert sample_totals(lake, DAY) == {"samples_per_split": {"train": 2, "valid": 1, "test": 1},
                                        "positives_per_split": {"train": 1, "valid": 1}}
    assert checked(spark, cfg, lake)["success"]


H = [{"ts": TS - 100 + i, "item_id": f"i{i % 2 + 1}"} for i in range(4)]  # a history of 4 interactions


def history_rows(**u2) -> list[dict]:
    """seed_features' users (u1: 3 interactions, its earliest 2 in the window; u2: 1), u2's fields replaced."""
    rows = [{"user_id": "u1", "history": H[:3], "n_interactions": 3, "window": H[:2], "window_n": 3, "as_of": H[1]["ts"]},
            {"user_id": "u2", "history": H[:1], "n_interactions": 1, "window": H[:1], "window_n": 1, "as_of": H[0]["ts"]}]
    rows[1].update(u2)
    return rows


@pytest.mark.parametrize("column, u2, count", [
    ("window_len_not_by_rule", {"history": H, "n_interactions": 4, "window_n": 4, "window": H, "as_of": H[3]["ts"]}, 1),
    ("history_not_in_time_order", {"history": [H[1], H[0]], "n_interactions": 2, "window_n": 2, "window": [H[1]],
                                   "as_of": H[1]["ts"]}, 1),
    ("history_len_not_n_interactions", {"n_interactions": 2}, 1),
    ("as_of_not_last_window_ts", {"as_of": 0}, 1),
    ("window_len", {"window": [], "window_n": 0}, 1),
], ids=["window-against-the-rule", "history-out-of-order", "history-length", "as-of", "empty-window"])
def test_each_user_history_rule_fails_on_the_days_rows_naming_the_user(spark, cfg, column, u2, count):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    lake.write_partition(pd.DataFrame(history_rows()), "features/user_history", DAY)
    assert checked(spark, cfg, lake)["success"] is True
    lake.write_partition(pd.DataFrame(history_rows(**u2)), "features/user_history", DAY)
    message = failure(spark, cfg, lake)
    assert "features/user_history (2 rows)" in message
    [line] = [line for line in message.splitlines() if f"column '{column}'" in line]
    assert f"{count} unexpected" in line and ("u2" in line or column == "window_len"), message


def test_a_user_written_twice_on_a_day_breaks_uniqueness(spark, cfg):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    rows = history_rows()
    lake.write_partition(pd.DataFrame([*rows, rows[1]]), "features/user_history", DAY)
    [line] = [line for line in failure(spark, cfg, lake).splitlines() if "column 'user_id'" in line]
    assert "expect_column_values_to_be_unique" in line and "2 unexpected" in line and "u2" in line


def test_the_recent_window_rule_is_checked_in_recent_mode(spark, tmp_path):
    cfg = make_config(tmp_path, REKI__SCENARIO_OVERRIDES__KNOWLEDGE_WINDOW="recent")
    size = cfg.scenario.recent_window_size
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    history = [{"ts": TS - 1000 + i, "item_id": f"i{i % 2 + 1}"} for i in range(size + 5)]

    def u2_with_window(window: list[dict]) -> pd.DataFrame:
        return pd.DataFrame(history_rows(history=history, n_interactions=len(history), window_n=len(history),
                                         window=window, as_of=window[-1]["ts"])[1:])

    lake.write_partition(u2_with_window(history[-size:]), "features/user_history", DAY)  # the last `size`
    assert checked(spark, cfg, lake)["success"] is True
    lake.write_partition(u2_with_window(history[: (size + 6) // 2]), "features/user_history", DAY)  # earliest's cut
    [line] = [line for line in failure(spark, cfg, lake).splitlines() if "column 'window_len_not_by_rule'" in line]
    assert "1 unexpected" in line and "u2" in line


@pytest.mark.parametrize("change, column, named", [
    ({"item_id": ["i1", "i1", "i1", "i2"], "ts": [TS, TS, TS + 2, TS + 3]}, None, None),
    ({"knowledge_as_of": [TS - 1, TS + 1, TS - 1, TS + 3]}, "knowledge_before_sample", None),
    ({"hist_item_ids": [["i1"] * 11, [], [], []]}, "hist_len", "11"),
    ({"split": ["train", "holdout", "valid", "test"]}, "split", "holdout"),
], ids=["duplicate-key", "knowledge-not-before", "history-too-long", "unknown-split"])
def test_each_sample_rule_fails_on_the_days_rows(spark, cfg, change, column, named):
    lake = Lake(cfg.lake_uri)
    seed_features(lake)
    assert checked(spark, cfg, lake)["success"] is True
    samples = lake.read_day_rows("features/ctr_samples", DAY)
    lake.write_partition(samples.assign(**change), "features/ctr_samples", DAY)
    message = failure(spark, cfg, lake)
    assert "features/ctr_samples (4 rows)" in message
    if column is None:
        [line] = [line for line in message.splitlines() if "expect_compound_columns_to_be_unique" in line]
        assert "2 unexpected" in line, message
        return
    [line] = [line for line in message.splitlines() if f"column '{column}'" in line]
    expected = {"knowledge_before_sample": 2}.get(column, 1)
    assert f"{expected} unexpected" in line, message
    if named:
        assert named in line, message
