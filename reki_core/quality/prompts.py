"""The prompts gate (after `reki_core.prompts.build_prompts`): keys, text, hashes, token budget, coverage.

Rules:
- `prompt_id` unique, one prompt per (entity_kind, entity_id), known kinds;
- non-empty text, users carry their `history_text`, `prompt_hash` is the sha256 of version + text;
- every text within the LLM's budget (`max_model_len - max_tokens`), counted again here with the engine's
  tokenizer rather than read from the builder's `est_tokens`: the gate does not lean on the code it checks;
- every dirty entity (user with `needs_refresh`, new or changed item) has a prompt, and in
  collective mode every group in use has one (`missing_dirty_entity`, `missing_group` list them).
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from reki_core.config import Config
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import GateResult, run_suite
from reki_core.storage.lake import Lake, as_date, lake_of

GATE = "prompts"


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


def check_prompts(prompts: pd.DataFrame, expected: dict[str, set[str]], budget: int, count_tokens,
                  dataset: str = "prompts") -> GateResult:
    """Run the gate on a prompts frame; `expected` maps entity kind -> ids that must have a prompt;
    `count_tokens(text)`: the engine's count of a prompt (`reki_core.prompts.make_token_counter`)."""
    from reki_core.prompts import prompt_hash

    checked = prompts.copy()
    checked["tokens"] = [count_tokens(t) if isinstance(t, str) else 0 for t in checked["text"]]
    checked["prompt_hash_matches_text"] = [
        prompt_hash(v, t) == h if isinstance(t, str) else False
        for v, t, h in zip(checked["template_version"], checked["text"], checked["prompt_hash"])
    ]
    table = run_suite(GATE, dataset, checked, prompts_expectations(budget))
    coverage = run_suite(GATE, f"{dataset}-coverage", coverage_frame(prompts, expected), coverage_expectations())
    return GateResult(gate=GATE, dataset=dataset, rows=len(prompts), outcomes=table.outcomes + coverage.outcomes,
                      validations=table.validations + coverage.validations)


def gate_prompts(cfg: Config, dt: str | dt.date, lake: Lake | None = None) -> GateResult:
    """The gate on `prompts/dt=D/` against the day's features; raises `GateError` listing the failures."""
    from reki_core.prompts import DATASET, expected_prompt_keys, load_inputs, make_token_counter, token_budget

    lake = lake or lake_of(cfg)
    day = as_date(dt)
    prompts = lake.read_partition(DATASET, day)
    has_groups = prompts["entity_kind"].str.endswith("_group").any()
    inputs, mode = load_inputs(cfg, lake, day, mode="collective" if has_groups else None)
    result = check_prompts(prompts, expected_prompt_keys(cfg, inputs, mode), token_budget(cfg),
                           make_token_counter(cfg), dataset=f"{DATASET}/dt={day.isoformat()}")
    keep_validations(lake, day, "prompts_gate", [result])
    return result.raise_if_failed()
