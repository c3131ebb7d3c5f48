"""Answers gate (Great Expectations) on the LLM knowledge of one date.

Rows: every prompt of `dt` that goes to the LLM in this scenario's mode, with its answer from the
knowledge store (this model and sampling version) and its failure record, if any.

Structural checks always fail the run: every prompt answered or recorded as failed, no empty answers,
answer length within bounds, share of answers cut at `max_tokens` at most `llm_max_truncated_share`.
Semantic checks fail or only warn per `quality.llm_semantic_action`: refusal/boilerplate share, share of
answers mentioning at least k of the scenario's factors, duplicate-answer share.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pandas as pd

from reki_core.config import Config
from reki_core.quality.data_docs import keep_validations
from reki_core.quality.gx import GateResult, run_suite, warn_only
from reki_core.runlog import record_step
from reki_core.storage.lake import lake_of

GATE = "llm_answers"

_REFUSAL = re.compile(
    r"\b(as an ai|language model|i'?m sorry|i am sorry|i can(?:not|'t)|i'?m unable|i am unable|"
    r"unable to (?:provide|determine|help)|cannot (?:provide|determine)|not enough information|"
    r"i don'?t have (?:access|enough|information))\b",
    re.IGNORECASE,
)


def factor_keywords(factors: list[str]) -> list[list[str]]:
    """Each factor as its alternatives ("director/actors" -> ["director", "actors"]), lower-case."""
    return [[alt.strip().lower() for alt in f.split("/") if alt.strip()] for f in factors]


def count_factors_mentioned(text: str, factors: list[list[str]]) -> int:
    lowered = text.lower()
    return sum(any(alt in lowered for alt in alternatives) for alternatives in factors)


def answers_frame(cfg: Config, day: str | dt.date) -> pd.DataFrame:
    """One row per prompt of `dt` sent to the LLM, with its answer, failure and the derived check columns."""
    from reki_core.llm.runner import FAILURES, extraction_prompts
    from reki_core.llm.store import read_answers, sampling_version

    lake = lake_of(cfg)
    prompts, _ = extraction_prompts(cfg, day, lake)
    answers = read_answers(lake, cfg.llm.engine.model_id, sampling_version(cfg), prompts["prompt_hash"])
    failed = set()
    if lake.has_partition(FAILURES, day):
        failures = lake.read_partition(FAILURES, day)
        failed = set(failures.loc[failures["action"] != "truncated", "prompt_hash"])
    df = prompts[["prompt_hash", "entity_kind", "entity_id"]].merge(
        answers[["prompt_hash", "text", "finish_reason"]], on="prompt_hash", how="left")
    df["answered"] = df["text"].notna()
    df["failed"] = df["prompt_hash"].isin(failed) & ~df["answered"]
    df["accounted"] = df["answered"] | df["failed"]
    answered = df["answered"]
    df["answer_text"] = df["text"].where(answered, None)
    df["cut_at_max_tokens"] = (df["finish_reason"] == "length").astype(float).where(answered)

    user_factors = factor_keywords(cfg.scenario.factors.user)
    item_factors = factor_keywords(cfg.scenario.factors.item)
    k = cfg.quality.llm_min_factors_mentioned
    mentions = [
        count_factors_mentioned(t, item_factors if kind in ("item", "item_group") else user_factors) if ok else None
        for t, kind, ok in zip(df["text"].fillna(""), df["entity_kind"], answered)
    ]
    df["factors_mentioned"] = pd.array(mentions, dtype="Int64")
    df["mentions_k_factors"] = (df["factors_mentioned"] >= k).astype(float).where(answered)
    df["is_refusal"] = df["text"].fillna("").map(lambda t: bool(_REFUSAL.search(t))).astype(float).where(answered)
    normalized = df["text"].fillna("").str.lower().str.split().str.join(" ")
    duplicate = normalized.where(answered).duplicated(keep="first") & answered
    df["is_duplicate"] = duplicate.astype(float).where(answered)
    return df.drop(columns=["text"])


def answers_expectations(cfg: Config) -> list:
    import great_expectations.expectations as gxe

    q = cfg.quality
    structural = [
        gxe.ExpectColumnValuesToBeInSet(column="accounted", value_set=[True]),
        gxe.ExpectColumnValuesToNotMatchRegex(column="answer_text", regex=r"^\s*$"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="answer_text", min_value=q.llm_min_answer_chars,
                                                max_value=q.llm_max_answer_chars),
        gxe.ExpectColumnMeanToBeBetween(column="cut_at_max_tokens", min_value=0.0, max_value=q.llm_max_truncated_share),
    ]
    semantic = [
        gxe.ExpectColumnMeanToBeBetween(column="is_refusal", min_value=0.0, max_value=q.llm_max_refusal_share),
        gxe.ExpectColumnMeanToBeBetween(column="mentions_k_factors", min_value=q.llm_min_factor_mention_share,
                                        max_value=1.0),
        gxe.ExpectColumnMeanToBeBetween(column="is_duplicate", min_value=0.0, max_value=q.llm_max_duplicate_share),
    ]
    if q.llm_semantic_action == "warn":
        semantic = [warn_only(e) for e in semantic]
    return structural + semantic


def validate_answers(cfg: Config, day: str | dt.date, raise_on_failure: bool = True) -> GateResult:
    """Run the answers gate for `dt`, record it as step `llm_answers_gate`, raise `GateError` on failure."""
    lake = lake_of(cfg)
    df = answers_frame(cfg, day)
    dataset = lake.uri_of(lake.dataset_path("knowledge/store")) + f" (prompts of dt={pd.Timestamp(day).date()})"
    if df.empty:
        result = GateResult(gate=GATE, dataset=dataset, rows=0, outcomes=[])
    else:
        result = run_suite(GATE, "knowledge", df, answers_expectations(cfg))
        result.dataset = dataset
    summary: dict[str, Any] = result.summary()
    summary["semantic_action"] = cfg.quality.llm_semantic_action
    summary["is_smoke_model"] = cfg.llm.is_smoke_model
    summary["data_docs"] = keep_validations(lake, day, "llm_answers_gate", [result])
    record_step(lake, day, "llm_answers_gate", summary)
    if raise_on_failure:
        result.raise_if_failed()
    return result
