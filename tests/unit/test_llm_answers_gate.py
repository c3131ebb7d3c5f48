"""The answers gate: each structural check fails the run; semantic checks fail or warn per config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_test_helpers import DAY, ScriptedBackend, individual_prompts, tiny_config, write_prompts

from reki_core.config import load_config
from reki_core.llm import runner
from reki_core.quality.answers import validate_answers
from reki_core.quality.gx import GateError
from reki_core.storage.lake import Lake

GOOD = ["A {i} drama with a strong plot and a dark mood, praised for its soundtrack.",
        "A light comedy {i}: warm tone, great cast and director, a classic period piece."]


def _extract(tmp_path, answer, finish="stop", **env):
    cfg = tiny_config(tmp_path, REKI__LLM__MAX_FAILURE_RATE="1", **env)
    lake = Lake(cfg.lake_uri)
    prompts = write_prompts(lake, DAY, individual_prompts(3, 3))
    for s in runner.plan_shards(cfg, DAY):
        runner.run_shard(cfg, DAY, s["shard_id"], backend=ScriptedBackend(cfg, answer=answer, finish=finish))
    return cfg, lake, prompts


def _good(text):
    return GOOD[len(text) % 2].format(i=text)


def _failed_checks(excinfo):
    return {(o.expectation, o.column) for o in excinfo.value.result.failed}


def test_good_answers_pass_and_are_recorded(tmp_path):
    cfg, lake, _ = _extract(tmp_path, _good)
    result = validate_answers(cfg, DAY)
    assert result.success and not result.warnings and result.rows == 6
    assert lake.read_json(f"_runs/dt={DAY}/llm_answers_gate.json")["success"] is True


def test_unaccounted_prompt_fails(tmp_path):
    cfg, lake, prompts = _extract(tmp_path, _good)
    rows = individual_prompts(3, 3) + individual_prompts(1, 0, version=" new")  # a prompt nobody answered
    write_prompts(lake, DAY, rows)
    with pytest.raises(GateError, match="accounted") as excinfo:
        validate_answers(cfg, DAY)
    assert _failed_checks(excinfo) == {("expect_column_values_to_be_in_set", "accounted")}


def test_prompt_recorded_as_failed_is_accounted_for(tmp_path):
    cfg, _, prompts = _extract(tmp_path, lambda t: None if "u0" in t else _good(t))
    result = validate_answers(cfg, DAY)
    assert result.success and result.rows == 6


def test_answers_cut_at_max_tokens_fail_past_the_share(tmp_path):
    cfg, _, _ = _extract(tmp_path, _good, finish="length", REKI__QUALITY__LLM_MAX_TRUNCATED_SHARE="0.5")
    with pytest.raises(GateError) as excinfo:
        validate_answers(cfg, DAY)
    assert _failed_checks(excinfo) == {("expect_column_mean_to_be_between", "cut_at_max_tokens")}


def test_length_bounds_fail(tmp_path):
    cfg, _, _ = _extract(tmp_path, _good, REKI__QUALITY__LLM_MAX_ANSWER_CHARS="40")
    with pytest.raises(GateError, match="answer_text") as excinfo:
        validate_answers(cfg, DAY)
    assert _failed_checks(excinfo) == {("expect_column_value_lengths_to_be_between", "answer_text")}


def test_empty_answer_in_the_store_fails(tmp_path):
    prompts_text = [individual_prompts(1, 0)[0]["text"]]
    cfg, lake, prompts = _extract(tmp_path, lambda t: None if t == prompts_text[0] else _good(t))
    from reki_core.llm.store import sampling_version, write_store_shard

    # A store shard written by other code with a blank answer (the runner itself never stores one).
    write_store_shard(lake, cfg.llm.engine.model_id, sampling_version(cfg), "blank", [{
        "prompt_hash": prompts.loc[0, "prompt_hash"], "model_id": cfg.llm.engine.model_id,
        "sampling_version": sampling_version(cfg), "text": "   ", "prompt_tokens": 1, "completion_tokens": 0,
        "finish_reason": "stop", "created_dt": DAY, "truncated_prompt": False}])
    with pytest.raises(GateError) as excinfo:
        validate_answers(cfg, DAY)
    assert ("expect_column_values_to_not_match_regex", "answer_text") in _failed_checks(excinfo)


@pytest.mark.parametrize("answer,column", [
    (lambda t: "I'm sorry, as an AI language model I cannot describe " + t, "is_refusal"),
    (lambda t: "Something about " + t, "mentions_k_factors"),
    (lambda t: "The same drama with a dark plot and mood.", "is_duplicate"),
])
def test_semantic_checks_fail_when_configured_to_fail(tmp_path, answer, column):
    cfg, _, _ = _extract(tmp_path, answer, REKI__QUALITY__LLM_SEMANTIC_ACTION="fail")
    with pytest.raises(GateError) as excinfo:
        validate_answers(cfg, DAY)
    assert ("expect_column_mean_to_be_between", column) in _failed_checks(excinfo)


def test_semantic_checks_only_warn_in_the_smoke_profile_and_the_summary_shows_it(tmp_path):
    cfg, lake, _ = _extract(tmp_path, lambda t: "The same text every time.")
    assert cfg.quality.llm_semantic_action == "warn"
    result = validate_answers(cfg, DAY)
    assert result.success
    assert {o.column for o in result.warnings} == {"mentions_k_factors", "is_duplicate"}
    summary = runner.extraction_summary(cfg, DAY)
    assert summary["gate_success"] is True and len(summary["gate_warnings"]) == 2
    assert any("is_duplicate" in w for w in summary["gate_warnings"])


# ---------------------------------------------------------------- calibrated on SmolLM2-135M-Instruct's measured answers

# Answers SmolLM2-135M-Instruct gave through the warm server to group prompts of `make run`'s day (conf/reki.yaml's
# settings), with their finish reasons: the gate's thresholds in conf/reki.yaml were set on them.
MEASURED = json.loads((Path(__file__).parent / "data" / "smollm2_answers.json").read_text())


def _measured_day(tmp_path, answers, finish=None):
    """conf/reki.yaml's real-model gates (not the smoke profile's), over a day whose store holds `answers`."""
    from llm_test_helpers import prompt_row

    from reki_core.llm.store import sampling_version, write_store_shard
    from tests.conftest import make_config

    cfg = make_config(tmp_path, REKI__QUALITY__LLM_SEMANTIC_ACTION="fail", REKI__QUALITY__LLM_MAX_TRUNCATED_SHARE=str(
        load_config(environ={}).quality.llm_max_truncated_share), REKI__QUALITY__LLM_MIN_ANSWER_CHARS=str(
        load_config(environ={}).quality.llm_min_answer_chars))
    lake = Lake(cfg.lake_uri)
    rows = [prompt_row(m["kind"], f"g{i}", m["prompt"]) for i, m in enumerate(MEASURED)]
    prompts = write_prompts(lake, DAY, rows)
    sv = sampling_version(cfg)
    write_store_shard(lake, cfg.llm.engine.model_id, sv, "measured", [
        {"prompt_hash": h, "model_id": cfg.llm.engine.model_id, "sampling_version": sv, "text": text,
         "prompt_tokens": 100, "completion_tokens": 50, "finish_reason": finish or m["finish_reason"],
         "created_dt": DAY, "truncated_prompt": False}
        for h, m, text in zip(prompts["prompt_hash"], MEASURED, answers)])
    return cfg


def test_a_healthy_day_of_measured_smollm2_answers_passes_the_strict_gates(tmp_path):
    cfg = _measured_day(tmp_path, [m["text"] for m in MEASURED])
    result = validate_answers(cfg, DAY)
    assert result.success and not result.warnings and result.rows == len(MEASURED)


@pytest.mark.parametrize("broken,column", [
    ("repeated", "is_duplicate"),  # a server stuck on one answer
    ("empty", "answer_text"),  # a server answering nothing but an end-of-turn token
    ("looping", "cut_at_max_tokens"),  # a server whose model never stops (a wrong chat template)
])
def test_a_broken_server_fails_the_gate_with_a_clear_message(tmp_path, broken, column):
    texts = {"repeated": [MEASURED[0]["text"]] * len(MEASURED), "empty": ["."] * len(MEASURED),
             "looping": [m["text"] for m in MEASURED]}[broken]
    cfg = _measured_day(tmp_path, texts, finish="length" if broken == "looping" else None)
    with pytest.raises(GateError, match=column) as excinfo:
        validate_answers(cfg, DAY)
    assert column in {c for _, c in _failed_checks(excinfo)}
