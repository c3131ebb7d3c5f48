"""The gate before publishing: the augmented vectors of a date are complete, unique and finite.

Every user of `features/user_history` and every item of `features/items` must have exactly one vector of
the adaptor's tower dimension with only finite values, all from one model version. The only entities
allowed to go without are those absent from `knowledge/assigned/dt=D`: their LLM call failed with no
earlier knowledge to fall back on, or they had no prompt (an item without a title). They serve the
consumer's fallback, and at most `llm.max_failure_rate` of all may. A vector missing for an entity that
has knowledge is a bug between encoding and publishing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from reki_core.config import Config
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import offenders, run_suite
from reki_core.runlog import record_step
from reki_core.storage.lake import Lake, as_date, lake_of

AUGMENTED = "vectors/augmented"
ASSIGNED = "knowledge/assigned"


def vector_facts(lake: Lake, day: dt.date, batch_rows: int) -> pd.DataFrame:
    """entity_kind, entity_id, dim, finite, model_version of the day's augmented vectors, read `batch_rows` at a time:
    the vectors themselves are never all in memory, only these few facts per entity."""
    parts = []
    columns = ["entity_kind", "entity_id", "vector", "model_version"]
    for batch in lake.read_batches(AUGMENTED, day, columns, batch_rows):
        vectors = batch.column("vector")
        offsets = vectors.offsets.to_numpy()
        bad = ~np.isfinite(vectors.values.to_numpy(zero_copy_only=False).astype(np.float64))
        bad_before = np.concatenate([[0], np.cumsum(bad)])  # non-finite values before each offset
        parts.append(pd.DataFrame({
            "entity_kind": batch.column("entity_kind").to_pandas().astype(str),
            "entity_id": batch.column("entity_id").to_pandas().astype(str),
            "dim": np.diff(offsets),
            "finite": (bad_before[offsets[1:]] - bad_before[offsets[:-1]]) == 0,
            "model_version": batch.column("model_version").to_pandas(),
        }))
        del vectors, bad, bad_before, batch
    empty = pd.DataFrame({"entity_kind": pd.Series(dtype=str), "entity_id": pd.Series(dtype=str),
                          "dim": pd.Series(dtype="int64"), "finite": pd.Series(dtype=bool),
                          "model_version": pd.Series(dtype=str)})
    return pd.concat(parts, ignore_index=True) if parts else empty


def vectors_frame(facts: pd.DataFrame, user_ids: pd.Series, item_ids: pd.Series, assigned: pd.DataFrame) -> pd.DataFrame:
    """One row per expected or present entity, with the facts the suite expects (`facts`: `vector_facts`; `assigned`:
    the day's knowledge/assigned rows, entity_kind and entity_id)."""
    present = facts.assign(key=facts["entity_kind"].astype(str) + ":" + facts["entity_id"].astype(str))[
        ["key", "dim", "finite", "model_version"]]
    expected = pd.DataFrame({"key": ["user:" + str(u) for u in user_ids] + ["item:" + str(i) for i in item_ids]})
    merged = expected.merge(present, on="key", how="outer", indicator=True)
    merged["has_vector"] = merged["_merge"] != "left_only"
    merged["expected"] = merged["_merge"] != "right_only"
    with_knowledge = set(assigned["entity_kind"].astype(str) + ":" + assigned["entity_id"].astype(str))
    merged["lost_vector"] = offenders(merged["key"], merged["has_vector"] | ~merged["key"].isin(with_knowledge))
    return merged.drop(columns="_merge")


def gate_vectors(cfg: Config, day: str | dt.date, lake: Lake | None = None) -> dict[str, Any]:
    """Run the vectors suite on `vectors/augmented/dt=D`; records the summary, raises GateError on failure."""
    import great_expectations.expectations as gxe

    day = as_date(day)
    lake = lake or lake_of(cfg)
    frame = vectors_frame(vector_facts(lake, day, cfg.lake.batch_rows),
                          lake.read_partition("features/user_history", day, columns=["user_id"])["user_id"],
                          lake.read_partition("features/items", day, columns=["item_id"])["item_id"],
                          lake.read_partition(ASSIGNED, day, columns=["entity_kind", "entity_id"]))
    result = run_suite("vectors", f"{AUGMENTED}/dt={day}", frame, [
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        # Entities whose LLM call failed (tolerated up to llm.max_failure_rate) get the consumer's fallback;
        # any other entity without a vector was lost on the way.
        gxe.ExpectColumnValuesToBeInSet(column="has_vector", value_set=[True], mostly=1 - cfg.llm.max_failure_rate),
        gxe.ExpectColumnValuesToBeNull(column="lost_vector"),
        gxe.ExpectColumnValuesToBeInSet(column="expected", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="dim", value_set=[cfg.model.expert_output_dim]),
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="model_version", min_value=1, max_value=1),
    ])
    summary = result.summary()
    record_step(lake, day, "vectors_gate", {"gates": [summary], "success": result.success, "rows": len(frame),
                                            "data_docs": keep_validations(lake, day, "vectors_gate", [result])})
    result.raise_if_failed()
    return summary
