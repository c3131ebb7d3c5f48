"""Great Expectations gates on the feature datasets of one date (run after the Spark jobs).

`run_feature_gates(cfg, dt)` runs one suite per dataset, records the summary in `_runs/dt=D/feature_gates.json`
(with the link to the run's GX Data Docs, which hold the full results), and raises `GateError` listing every failing
expectation (with counts) when any gate fails. Every row rule is evaluated by the Spark job
`spark_jobs/feature_checks.py` (task `feature_checks`): it records per rule the count and a few offending rows or
keys, and the gate runs the expectations on those (`reki_core.quality.recorded`), after checking the rows are the
ones the job checked. The item table and the clusters (rebuilt daily) are checked whole. Of the keyed datasets
(`user_history`, `ctr_samples`, written as changes), the rows written on D are checked (every row on a full day):
the others were checked on the day they were written and have not changed. A rule on the whole state (samples,
label rate) is checked on the totals the job recorded with the day (`Lake.state_totals`). Checks that GX has no
expectation for (history order, window rule, group sizes, membership) are computed as columns in Spark and then
expected like any other column. So the gate's memory is the few recorded rows and a batch of fingerprinted columns,
whatever the day's size (a first load's millions of samples included).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from reki_core.config import Config
from reki_core.prompts import resolve_mode
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import GateResult, raise_if_any_failed, run_suite
from reki_core.quality.recorded import (no_checks, partition_fingerprint, recorded_checks, same_partition,
                                       with_recorded_counts)
from reki_core.runlog import record_step
from reki_core.storage.lake import Lake, as_date, lake_of

CLUSTERINGS = ("item", "user_pos", "user_neg")
ITEMS, USER_HISTORY, CLUSTERS = "features/items", "features/user_history", "features/clusters"
STEP = "feature_checks"  # the Spark job that checks items and clusters records its checks in this run-log step
ITEM_COLUMNS = ["item_id", "popularity", "metadata_hash"]
# Each rule: the expectation (type, column) that states it; the Spark job computes one flag per rule.
ITEM_RULES = {
    "item_id_not_null": ("expect_column_values_to_not_be_null", "item_id"),
    "item_id_unique": ("expect_column_values_to_be_unique", "item_id"),
    "popularity_not_negative": ("expect_column_values_to_be_between", "popularity"),
    "metadata_hash_not_null": ("expect_column_values_to_not_be_null", "metadata_hash"),
}
GROUP_RULE, MEMBER_RULE = "group_over_size_bound", "not_assigned_exactly_once"  # columns of offending keys
CLUSTER_RULES = {rule: ("expect_column_values_to_be_null", rule) for rule in (GROUP_RULE, MEMBER_RULE)}
# The keyed datasets' row rules, on the rows written on the day. The rules GX has no expectation for are columns
# holding the user_id of each row that breaks them (a true/false column would only say "False").
CTR_SAMPLES = "features/ctr_samples"
HISTORY_OFFENDER_RULES = ("history_not_in_time_order", "history_len_not_n_interactions", "window_len_not_by_rule",
                          "as_of_not_last_window_ts")
HISTORY_COLUMNS = ["user_id", "window_len", *HISTORY_OFFENDER_RULES]
HISTORY_RULES = {
    "user_id_unique": ("expect_column_values_to_be_unique", "user_id"),
    "window_len_in_bounds": ("expect_column_values_to_be_between", "window_len"),
    **{rule: ("expect_column_values_to_be_null", rule) for rule in HISTORY_OFFENDER_RULES},
}
SAMPLE_COLUMNS = ["user_id", "item_id", "ts", "split", "knowledge_before_sample", "hist_len"]
SAMPLE_RULES = {
    "sample_key_unique": ("expect_compound_columns_to_be_unique", None),
    "knowledge_not_before_sample": ("expect_column_values_to_be_in_set", "knowledge_before_sample"),
    "hist_len_out_of_bounds": ("expect_column_values_to_be_between", "hist_len"),
    "split_unknown": ("expect_column_values_to_be_in_set", "split"),
}
SPLITS = ("train", "valid", "test")
# The columns whose digest tells a partition (a keyed dataset: the day's rows) is the one the job checked.
FINGERPRINTED = {ITEMS: ITEM_COLUMNS, CLUSTERS: ["clustering", "entity_id", "group_id"]}
# What this gate reads of the job's record (one written before the day's rows were checked in Spark lacks some).
RECORDED_KEYS = ("items", "users", "clusters", "user_history", "ctr_samples", "fingerprint", "day_fingerprint")
DAY_FINGERPRINTED = {USER_HISTORY: ["user_id", "n_interactions", "as_of"], CTR_SAMPLES: ["user_id", "item_id", "ts", "split"]}


def max_window_len(cfg: Config) -> int:
    s = cfg.scenario
    return s.max_window if s.knowledge_window == "earliest" else s.recent_window_size


def items_gate(items: pd.DataFrame) -> GateResult:
    import great_expectations.expectations as gxe

    return run_suite("features", "features/items", items, [
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="popularity", min_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="metadata_hash"),
    ])


def user_history_gate(rows: pd.DataFrame, cfg: Config) -> GateResult:
    """`rows`: HISTORY_COLUMNS of user_history rows (the job's recorded offenders)."""
    import great_expectations.expectations as gxe

    return run_suite("features", USER_HISTORY, rows, [
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectColumnValuesToBeBetween(column="window_len", min_value=1, max_value=max_window_len(cfg)),
        *[gxe.ExpectColumnValuesToBeNull(column=rule) for rule in HISTORY_OFFENDER_RULES],
    ])


def ctr_samples_gate(samples: pd.DataFrame, totals: dict, cfg: Config) -> GateResult:
    """`samples`: SAMPLE_COLUMNS of rows written on the day (the job's recorded offenders; the rules hold row by
    row, and a user's samples are written together); `totals`: the state's samples and positives per split, as the
    job recorded them (`state_totals`)."""
    import great_expectations.expectations as gxe

    s = cfg.scenario
    low, high = s.label_rate_bounds
    rows = run_suite("features", CTR_SAMPLES, samples, [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "ts"]),
        gxe.ExpectColumnValuesToBeInSet(column="knowledge_before_sample", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="hist_len", min_value=0, max_value=s.max_hist_len),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
    ])
    n = sum(totals["samples_per_split"].values())
    state = pd.DataFrame({"samples": [n],
                          "label_rate": [sum(totals["positives_per_split"].values()) / n if n else np.nan]})
    whole = run_suite("features", f"{CTR_SAMPLES}#state", state, [
        # An empty state would fail the label rate with no reason given: this says why.
        gxe.ExpectColumnValuesToBeBetween(column="samples", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="label_rate", min_value=low, max_value=high),
    ])
    return GateResult("features", CTR_SAMPLES, len(samples), rows.outcomes + whole.outcomes,
                      validations=rows.validations + whole.validations)


def sample_totals(lake: Lake, day: dt.date) -> dict:
    """The `ctr_samples` state's totals as of `day`: recorded by the job, or (a day written without them, by another
    writer) counted from the state's narrow `split` and `label` columns."""
    recorded = lake.state_totals(CTR_SAMPLES, day)
    if recorded is not None:
        return recorded
    state = lake.read_partition(CTR_SAMPLES, day, columns=["split", "label"])
    positive = state["label"].astype("int64") > 0
    return {"samples_per_split": state["split"].value_counts().to_dict(),
            "positives_per_split": state.loc[positive, "split"].value_counts().to_dict()}


def clusters_gate(groups: pd.DataFrame, members: pd.DataFrame, rows: int) -> GateResult:
    """`groups`: clustering and `group_over_size_bound` (the key of an oversized group, else null) of the groups the
    job recorded, and one row per clustering present; `members`: `not_assigned_exactly_once` (`clustering:entity_id`
    of an entity assigned other than once, or not expected)."""
    import great_expectations.expectations as gxe

    gate_group = run_suite("features", "features/clusters#groups", groups, [
        gxe.ExpectColumnValuesToBeNull(column=GROUP_RULE),
        gxe.ExpectColumnDistinctValuesToContainSet(column="clustering", value_set=list(CLUSTERINGS)),
    ])
    gate_members = run_suite("features", "features/clusters#members", members, [
        gxe.ExpectColumnValuesToBeNull(column=MEMBER_RULE),
    ])
    return GateResult("features", "features/clusters", rows, gate_group.outcomes + gate_members.outcomes,
                      validations=gate_group.validations + gate_members.validations)


def recorded_rows_gate(gate, checks: dict, columns: list[str], rules: dict, numeric: tuple[str, ...]) -> GateResult:
    """`gate` (a suite on a frame of `columns`) on the rows the job recorded, with its whole counts."""
    rows = pd.DataFrame(checks["examples"], columns=columns, dtype=object)
    for column in numeric:
        rows[column] = pd.to_numeric(rows[column])
    result = with_recorded_counts(gate(rows), rules, checks["failed"])
    result.rows = int(checks["rows"])
    return result


def recorded_items_gate(checks: dict) -> GateResult:
    """The items suite on the rows the job recorded, with its whole counts."""
    return recorded_rows_gate(items_gate, checks, ITEM_COLUMNS, ITEM_RULES, ("popularity",))


def recorded_clusters_gate(checks: dict) -> GateResult:
    """The clusters suites on the keys the job recorded, with its whole counts."""
    groups = pd.DataFrame([*checks["groups"]["examples"], *[{"clustering": c} for c in checks["clusterings"]]],
                          columns=["clustering", GROUP_RULE], dtype=object)
    members = pd.DataFrame(checks["members"]["examples"], columns=[MEMBER_RULE], dtype=object)
    failed = {**checks["groups"]["failed"], **checks["members"]["failed"]}
    return with_recorded_counts(clusters_gate(groups, members, int(checks["rows"])), CLUSTER_RULES, failed)


def run_feature_gates(cfg: Config, day: str | dt.date, lake: Lake | None = None) -> dict[str, Any]:
    """Gate every feature dataset of `day` (items and clusters from the checks the job `feature_checks` recorded);
    records the summary, raises GateError on any failure."""
    import great_expectations.expectations as gxe

    day = as_date(day)
    lake = lake or lake_of(cfg)
    checks = recorded_checks(lake, day, STEP, RECORDED_KEYS)
    if checks is None:
        no_checks("features", f"features/dt={day.isoformat()}", day, STEP, "feature_checks")
    checked = {}  # the fingerprint outcome of each partition the job checked (or found absent)
    for dataset, recorded in checks["fingerprint"].items():
        found = (partition_fingerprint(lake, dataset, day, FINGERPRINTED[dataset], cfg.lake.batch_rows)
                 if lake.has_partition(dataset, day) else None)
        checked[dataset] = same_partition(f"{dataset}/dt={day.isoformat()}", found, recorded, STEP, "feature_checks")
    for dataset, recorded in checks["day_fingerprint"].items():  # the keyed datasets: the rows written on D
        found = partition_fingerprint(lake, dataset, day, DAY_FINGERPRINTED[dataset], cfg.lake.batch_rows,
                                      day_rows=True)
        checked[dataset] = same_partition(f"{dataset}/dt={day.isoformat()} (the day's rows)", found, recorded, STEP,
                                          "feature_checks")
    items = recorded_items_gate(checks["items"])
    history = recorded_rows_gate(lambda rows: user_history_gate(rows, cfg), checks["user_history"], HISTORY_COLUMNS,
                                 HISTORY_RULES, ("window_len",))
    totals = sample_totals(lake, day)
    samples = recorded_rows_gate(lambda rows: ctr_samples_gate(rows, totals, cfg), checks["ctr_samples"],
                                 SAMPLE_COLUMNS, SAMPLE_RULES, ("ts", "hist_len"))
    for dataset, result in ((ITEMS, items), (USER_HISTORY, history), (CTR_SAMPLES, samples)):
        result.outcomes.insert(0, checked[dataset])
    results = [items, history, samples]
    clusters = None
    if checks["clusters"] is not None:
        clusters = recorded_clusters_gate(checks["clusters"])
    elif resolve_mode(cfg, int(checks["users"]), int(checks["items"]["rows"])) == "collective":
        # the groups collective extraction needs
        clusters = run_suite("features", CLUSTERS, pd.DataFrame({"partition_written": [False]}), [
            gxe.ExpectColumnValuesToBeInSet(column="partition_written", value_set=[True])])
    elif not checked[CLUSTERS].success:  # groups written after the job found none
        clusters = GateResult("features", CLUSTERS, 0, [])
    if clusters is not None:
        clusters.outcomes.insert(0, checked[CLUSTERS])
        results.append(clusters)
    summary = {"success": all(r.success for r in results), "gates": [r.summary() for r in results],
               "data_docs": keep_validations(lake, day, "feature_gates", results)}
    record_step(lake, day, "feature_gates", summary)
    raise_if_any_failed(results, f"feature gates failed for dt={day.isoformat()}")
    return summary
