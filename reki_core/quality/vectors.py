"""The gate before publishing: the augmented vectors of a date are complete, unique and finite.

Every user of `features/user_history` and every item of `features/items` must have exactly one vector of
the adaptor's tower dimension with only finite values, all from one model version. The only entities
allowed to go without are those absent from `knowledge/assigned/dt=D`: their LLM call failed with no
earlier knowledge to fall back on, or they had no prompt (an item without a title). They serve the
consumer's fallback, and at most `llm.max_failure_rate` of all may. A vector missing for an entity that
has knowledge is a bug between encoding and publishing.

The Spark job `spark_jobs/vectors_checks.py` (task `vectors_checks`, after `augment`) evaluates the rules over every
vector and entity and records per rule the count and a few offending rows, the model versions, and a fingerprint of
the vectors it checked (`_runs/dt=D/vectors_checks.json`, `checks`). `gate_vectors` streams the vectors' ids and
facts (`lake.batch_rows` at a time, nothing kept) to check the partition is the one the job checked, runs its suite
on the recorded rows and reports each failure with the job's whole count (`reki_core.quality.recorded`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from reki_core.config import Config
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import run_suite
from reki_core.quality.recorded import (no_checks, partition_fingerprint, recorded_checks, same_partition,
                                       with_recorded_counts)
from reki_core.runlog import record_step
from reki_core.storage.lake import Lake, as_date, lake_of

AUGMENTED = "vectors/augmented"
ASSIGNED = "knowledge/assigned"


STEP = "vectors_checks"  # the Spark job's run-log step, where it records the checks
# The suite's frame: one row per expected or present entity.
COLUMNS = ["key", "has_vector", "expected", "lost_vector", "dim", "finite", "model_version"]
# Each rule: the expectation (type, column) that states it; the Spark job computes one flag per rule.
RULES = {
    "key_unique": ("expect_column_values_to_be_unique", "key"),
    "has_vector": ("expect_column_values_to_be_in_set", "has_vector"),
    "lost_vector": ("expect_column_values_to_be_null", "lost_vector"),
    "expected": ("expect_column_values_to_be_in_set", "expected"),
    "dim": ("expect_column_values_to_be_in_set", "dim"),
    "finite": ("expect_column_values_to_be_in_set", "finite"),
}
VERSIONS = "expect_column_unique_value_count_to_be_between"  # model_version's: judged on the job's count
FINGERPRINTED = ["entity_kind", "entity_id", "model_version", "dim", "finite"]  # dim, finite: of each vector


def vector_rows(batch) -> list[tuple]:
    """entity_kind, entity_id, model_version, dim and finite of each vector of a record batch (of `entity_kind`,
    `entity_id`, `vector`, `model_version`): the facts the job fingerprinted, computed on the batch's flat values."""
    vectors = batch.column("vector")
    offsets = vectors.offsets.to_numpy()
    bad = ~np.isfinite(vectors.values.to_numpy(zero_copy_only=False).astype(np.float64))
    bad_before = np.concatenate([[0], np.cumsum(bad)])  # non-finite values before each offset
    finite = (bad_before[offsets[1:]] - bad_before[offsets[:-1]]) == 0
    return list(zip(batch.column("entity_kind").to_pylist(), batch.column("entity_id").to_pylist(),
                    batch.column("model_version").to_pylist(), np.diff(offsets).tolist(), finite.tolist()))


def vectors_expectations(cfg: Config) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        # Entities whose LLM call failed (tolerated up to llm.max_failure_rate) get the consumer's fallback;
        # any other entity without a vector was lost on the way.
        gxe.ExpectColumnValuesToBeInSet(column="has_vector", value_set=[True], mostly=1 - cfg.llm.max_failure_rate),
        gxe.ExpectColumnValuesToBeNull(column="lost_vector"),
        gxe.ExpectColumnValuesToBeInSet(column="expected", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="dim", value_set=[cfg.model.expert_output_dim]),
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="model_version", min_value=1, max_value=1),
    ]


def gate_vectors(cfg: Config, day: str | dt.date, lake: Lake | None = None) -> dict[str, Any]:
    """Run the vectors suite on `vectors/augmented/dt=D` from the checks the job `vectors_checks` recorded; records the
    summary, raises GateError on failure."""
    day = as_date(day)
    lake = lake or lake_of(cfg)
    dataset = f"{AUGMENTED}/dt={day}"
    checks = recorded_checks(lake, day, STEP)
    if checks is None:
        no_checks("vectors", dataset, day, STEP, "vectors_checks")
    found = partition_fingerprint(lake, AUGMENTED, day, ["entity_kind", "entity_id", "vector", "model_version"],
                                  cfg.lake.batch_rows, rows_of=vector_rows)
    frame = pd.DataFrame(checks["examples"], columns=COLUMNS, dtype=object)
    frame["dim"] = pd.to_numeric(frame["dim"])
    result = run_suite("vectors", dataset, frame, vectors_expectations(cfg))
    result = with_recorded_counts(result, RULES, checks["failed"], totals={"has_vector": checks["rows"]})
    for outcome in result.outcomes:
        if outcome.expectation == VERSIONS:  # the recorded rows show a few versions, if any: the job counted all
            versions = int(checks["model_versions"])
            outcome.observed_value = versions
            outcome.success = outcome.kwargs["min_value"] <= versions <= outcome.kwargs["max_value"]
    result.outcomes.insert(0, same_partition(dataset, found, checks["fingerprint"], STEP, "vectors_checks"))
    result.rows = int(checks["rows"])
    summary = result.summary()
    record_step(lake, day, "vectors_gate", {"gates": [summary], "success": result.success, "rows": result.rows,
                                            "data_docs": keep_validations(lake, day, "vectors_gate", [result])})
    result.raise_if_failed()
    return summary
