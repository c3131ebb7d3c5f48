"""Great Expectations gates on the feature datasets of one date (run after the Spark jobs).

`run_feature_gates(cfg, dt)` runs one suite per dataset, records the summary in `_runs/dt=D/feature_gates.json`
(with the link to the run's GX Data Docs, which hold the full results), and raises `GateError` listing every failing
expectation (with counts) when any gate fails. The item table and the clusters (rebuilt daily) are checked by the
Spark job `spark_jobs/feature_checks.py` (task `feature_checks`): it records per rule the count and a few offending
rows or keys, and the gate runs the expectations on those (`reki_core.quality.recorded`), after checking the
partitions are the ones the job checked. Of the keyed datasets (`user_history`, `ctr_samples`, written as changes),
a rule that holds row by row is checked here on the rows written on D, every row on a full day: the others were
checked on the day they were written and have not changed, so a daily gate reads the day's changes, not the
dataset. A rule on the whole state (samples, label rate) is checked on the totals the job recorded with the day
(`Lake.state_totals`). Checks that GX has no expectation for (history order, group sizes, membership) are computed
as columns (the groups' in Spark) and then expected like any other column.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from reki_core.config import Config
from reki_core.prompts import resolve_mode
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import GateResult, offenders, raise_if_any_failed, run_suite
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
# The columns whose digest tells a partition is the one the job checked.
FINGERPRINTED = {ITEMS: ITEM_COLUMNS, CLUSTERS: ["clustering", "entity_id", "group_id"]}


def _is_time_ordered(entries) -> bool:
    """Entries in (ts, item_id) order: the full-timestamp order with the item-id tie-break."""
    keys = [(e["ts"], e["item_id"]) for e in entries]
    return all(a <= b for a, b in zip(keys, keys[1:]))


def items_gate(items: pd.DataFrame) -> GateResult:
    import great_expectations.expectations as gxe

    return run_suite("features", "features/items", items, [
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="popularity", min_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="metadata_hash"),
    ])


def window_sizes_by_rule(window_n: pd.Series, cfg: Config) -> pd.Series:
    """The knowledge window's length the scenario's rule gives a user who had `window_n` interactions."""
    s = cfg.scenario
    n = window_n.astype("int64")
    if s.knowledge_window == "earliest":
        return np.minimum((n + 1) // 2, s.max_window)
    return np.minimum(n, s.recent_window_size)


def user_history_gate(history: pd.DataFrame, cfg: Config) -> GateResult:
    import great_expectations.expectations as gxe

    s = cfg.scenario
    max_window = s.max_window if s.knowledge_window == "earliest" else s.recent_window_size
    ids = history["user_id"]
    window_len = history["window"].map(len)
    # One column per rule, holding the user_id of each row that breaks it.
    broken = {
        "history_not_in_time_order": offenders(ids, history["history"].map(_is_time_ordered)),
        "history_len_not_n_interactions": offenders(ids, history["history"].map(len) == history["n_interactions"]),
        "window_len_not_by_rule": offenders(ids, window_len == window_sizes_by_rule(history["window_n"], cfg)),
        "as_of_not_last_window_ts": offenders(
            ids, [len(w) > 0 and w[-1]["ts"] == a for w, a in zip(history["window"], history["as_of"])]),
    }
    df = pd.DataFrame({"user_id": ids, "window_len": window_len, **broken})
    return run_suite("features", "features/user_history", df, [
        gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        gxe.ExpectColumnValuesToBeBetween(column="window_len", min_value=1, max_value=max_window),
        *[gxe.ExpectColumnValuesToBeNull(column=rule) for rule in broken],
    ])


def ctr_samples_gate(samples: pd.DataFrame, totals: dict, cfg: Config) -> GateResult:
    """`samples`: the rows written on the day (their rules hold row by row, and a user's samples are written
    together); `totals`: the state's samples and positives per split, as the job recorded them (`state_totals`)."""
    import great_expectations.expectations as gxe

    s = cfg.scenario
    low, high = s.label_rate_bounds
    df = samples[["user_id", "item_id", "ts", "label", "split"]].copy()
    df["knowledge_before_sample"] = (samples["knowledge_as_of"] < samples["ts"]).astype(bool)
    df["hist_len"] = samples["hist_item_ids"].map(len)
    rows = run_suite("features", "features/ctr_samples", df, [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "ts"]),
        gxe.ExpectColumnValuesToBeInSet(column="knowledge_before_sample", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="hist_len", min_value=0, max_value=s.max_hist_len),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "valid", "test"]),
    ])
    n = sum(totals["samples_per_split"].values())
    state = pd.DataFrame({"samples": [n],
                          "label_rate": [sum(totals["positives_per_split"].values()) / n if n else np.nan]})
    whole = run_suite("features", "features/ctr_samples#state", state, [
        # An empty state would fail the label rate with no reason given: this says why.
        gxe.ExpectColumnValuesToBeBetween(column="samples", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="label_rate", min_value=low, max_value=high),
    ])
    return GateResult("features", "features/ctr_samples", len(samples), rows.outcomes + whole.outcomes,
                      validations=rows.validations + whole.validations)


def sample_totals(lake: Lake, day: dt.date) -> dict:
    """The `ctr_samples` state's totals as of `day`: recorded by the job, or (a day written without them, by another
    writer) counted from the state's narrow `split` and `label` columns."""
    recorded = lake.state_totals("features/ctr_samples", day)
    if recorded is not None:
        return recorded
    state = lake.read_partition("features/ctr_samples", day, columns=["split", "label"])
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


def recorded_items_gate(checks: dict) -> GateResult:
    """The items suite on the rows the job recorded, with its whole counts."""
    items = pd.DataFrame(checks["examples"], columns=ITEM_COLUMNS, dtype=object)
    items["popularity"] = pd.to_numeric(items["popularity"])
    result = with_recorded_counts(items_gate(items), ITEM_RULES, checks["failed"])
    result.rows = int(checks["rows"])
    return result


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
    checks = recorded_checks(lake, day, STEP)
    if checks is None:
        no_checks("features", f"features/dt={day.isoformat()}", day, STEP, "feature_checks")
    checked = {}  # the fingerprint outcome of each partition the job checked (or found absent)
    for dataset, recorded in checks["fingerprint"].items():
        found = (partition_fingerprint(lake, dataset, day, FINGERPRINTED[dataset], cfg.lake.batch_rows)
                 if lake.has_partition(dataset, day) else None)
        checked[dataset] = same_partition(f"{dataset}/dt={day.isoformat()}", found, recorded, STEP, "feature_checks")
    items = recorded_items_gate(checks["items"])
    items.outcomes.insert(0, checked[ITEMS])
    results = [
        items,
        user_history_gate(lake.read_day_rows(USER_HISTORY, day), cfg),
        ctr_samples_gate(lake.read_day_rows("features/ctr_samples", day), sample_totals(lake, day), cfg),
    ]
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
