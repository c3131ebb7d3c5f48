"""The prompts gate (after the Spark job `spark_jobs/prompts.py`): keys, text, hashes, token budget, coverage.

Rules:
- `prompt_id` unique, one prompt per (entity_kind, entity_id), known kinds;
- non-empty text, users carry their `history_text`, `prompt_hash` is the sha256 of version + text;
- every text within the LLM's budget (`max_model_len - max_tokens`), counted again with the engine's tokenizer
  rather than read from the builder's `est_tokens`: a carried prompt of another tokenizer cannot slip past;
- every dirty entity (user with `needs_refresh`, new or changed item) has a prompt, and in
  collective mode every group in use has one (`missing_dirty_entity`, `missing_group` list them).

The job evaluates the rules on every written row and the coverage on the day's keys (in Spark, bounded per task) and
records per rule the count and a few offending rows, and a fingerprint of the rows it checked, in its run record
(`_runs/dt=D/prompts.json`, `checks`). `gate_prompts` reads only that record and streams the partition's ids and
hashes (`lake.batch_rows` at a time) to check it is the partition the job checked; it then runs the expectations
on the offending rows and reports each failure with the job's whole count.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from reki_core.config import Config
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import GateResult, run_suite
from reki_core.quality.recorded import (no_checks, partition_fingerprint, recorded_checks, same_partition,
                                       with_recorded_counts)
from reki_core.storage.lake import Lake, as_date, lake_of

GATE = "prompts"
STEP = "prompts"  # the prompts job's run-log step, where it records the checks
FINGERPRINTED = ["prompt_id", "prompt_hash"]  # the columns whose digest tells the partition is the one checked
# Each rule: the expectation (type, column) that states it; the Spark job computes one flag per rule.
RULES = {
    "prompt_id_unique": ("expect_column_values_to_be_unique", "prompt_id"),
    "entity_key_unique": ("expect_compound_columns_to_be_unique", None),
    "entity_kind_known": ("expect_column_values_to_be_in_set", "entity_kind"),
    "text_not_null": ("expect_column_values_to_not_be_null", "text"),
    "text_not_empty": ("expect_column_value_lengths_to_be_between", "text"),
    "user_history_text": ("expect_column_values_to_not_be_null", "history_text"),
    "prompt_hash_format": ("expect_column_values_to_match_regex", "prompt_hash"),
    "prompt_hash_matches_text": ("expect_column_values_to_be_in_set", "prompt_hash_matches_text"),
    "as_of_not_null": ("expect_column_values_to_not_be_null", "as_of"),
    "tokens_within_budget": ("expect_column_values_to_be_between", "tokens"),
}
COVERAGE = ("missing_dirty_entity", "missing_group")


def prompts_expectations(budget: int) -> list:
    import great_expectations.expectations as gxe

    from reki_core.prompts import COLUMNS, KINDS

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=False),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_id"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["entity_kind", "entity_id"]),
        gxe.ExpectColumnValuesToBeInSet(column="entity_kind", value_set=list(KINDS)),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="history_text", row_condition='entity_kind=="user"',
                                          condition_parser="pandas"),
        gxe.ExpectColumnValuesToMatchRegex(column="prompt_hash", regex=r"^[0-9a-f]{64}$"),
        gxe.ExpectColumnValuesToBeInSet(column="prompt_hash_matches_text", value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="as_of"),
        gxe.ExpectColumnValuesToBeBetween(column="tokens", min_value=1, max_value=budget),
    ]


def coverage_expectations() -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeNull(column="missing_dirty_entity"),
        gxe.ExpectColumnValuesToBeNull(column="missing_group"),
    ]


def coverage_frame(prompts: pd.DataFrame, expected: dict[str, set[str]]) -> pd.DataFrame:
    """One row per expected (kind, id); `missing_*` holds `kind:id` where no prompt exists."""
    from reki_core.prompts import ITEM, USER

    present = set(zip(prompts["entity_kind"].astype(str), prompts["entity_id"].astype(str)))
    rows = []
    for kind in sorted(expected):
        for entity_id in sorted(expected[kind]):
            missing = None if (kind, entity_id) in present else f"{kind}:{entity_id}"
            is_entity = kind in (USER, ITEM)
            rows.append({"entity_kind": kind, "entity_id": entity_id,
                         "missing_dirty_entity": missing if is_entity else None,
                         "missing_group": None if is_entity else missing})
    return pd.DataFrame(rows, columns=["entity_kind", "entity_id", "missing_dirty_entity", "missing_group"],
                        dtype=object)


def rule_columns(prompts: pd.DataFrame, count_tokens) -> pd.DataFrame:
    """`prompts` with the columns the expectations read besides the table's: `tokens` (the engine's count of each
    text) and `prompt_hash_matches_text`."""
    from reki_core.prompts import prompt_hash

    checked = prompts.copy()
    checked["tokens"] = [count_tokens(t) if isinstance(t, str) else 0 for t in checked["text"]]
    checked["prompt_hash_matches_text"] = [
        prompt_hash(v, t) == h if isinstance(t, str) else False
        for v, t, h in zip(checked["template_version"], checked["text"], checked["prompt_hash"])
    ]
    return checked


def run_checks(checked: pd.DataFrame, coverage: pd.DataFrame, budget: int, dataset: str) -> GateResult:
    """The expectations on rows with their rule columns (`rule_columns`) and on a coverage frame (`coverage_frame`)."""
    table = run_suite(GATE, dataset, checked, prompts_expectations(budget))
    covered = run_suite(GATE, f"{dataset}-coverage", coverage, coverage_expectations())
    return GateResult(gate=GATE, dataset=dataset, rows=len(checked), outcomes=table.outcomes + covered.outcomes,
                      validations=table.validations + covered.validations)


def check_prompts(prompts: pd.DataFrame, expected: dict[str, set[str]], budget: int, count_tokens,
                  dataset: str = "prompts") -> GateResult:
    """Run the gate on a whole prompts frame; `expected` maps entity kind -> ids that must have a prompt;
    `count_tokens(text)`: the engine's count of a prompt (`reki_core.prompts.make_token_counter`)."""
    return run_checks(rule_columns(prompts, count_tokens), coverage_frame(prompts, expected), budget, dataset)


def recorded_frames(checks: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The offending rows (with their rule columns) and the coverage frame of the missing keys the job recorded."""
    checked = pd.DataFrame(checks["examples"], columns=[*checks["columns"], "tokens", "prompt_hash_matches_text"])
    missing = [key for name in COVERAGE for key in checks["missing"][name]["examples"]]
    expected: dict[str, set[str]] = {}
    for key in missing:
        kind, _, entity_id = key.partition(":")
        expected.setdefault(kind, set()).add(entity_id)
    coverage = coverage_frame(pd.DataFrame({"entity_kind": [], "entity_id": []}), expected)
    return checked, coverage


def gate_prompts(cfg: Config, dt: str | dt.date, lake: Lake | None = None) -> GateResult:
    """The gate on `prompts/dt=D/` from the prompts job's recorded checks; raises `GateError` listing the failures.

    Reads the job's run record and the partition's ids and hashes only (streamed): the rules and the coverage were
    evaluated over the whole partition and the day's features by the job."""
    from reki_core.prompts import DATASET

    lake = lake or lake_of(cfg)
    day = as_date(dt)
    dataset = f"{DATASET}/dt={day.isoformat()}"
    checks = recorded_checks(lake, day, STEP)
    if checks is None:
        return no_checks(GATE, dataset, day, STEP, "prompts")
    found = partition_fingerprint(lake, DATASET, day, FINGERPRINTED, cfg.lake.batch_rows)
    checked, coverage = recorded_frames(checks)
    result = run_checks(checked, coverage, int(checks["budget"]), dataset)
    missing = {name: int(checks["missing"][name]["count"]) for name in COVERAGE}
    coverage_rules = {name: ("expect_column_values_to_be_null", name) for name in COVERAGE}
    result = with_recorded_counts(result, {**RULES, **coverage_rules}, {**checks["failed"], **missing})
    result.outcomes.insert(0, same_partition(dataset, found, checks["fingerprint"], STEP, "prompts"))
    result.rows = int(found["rows"])
    keep_validations(lake, day, "prompts_gate", [result])
    return result.raise_if_failed()
