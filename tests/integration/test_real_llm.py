"""The real instruct model (SmolLM2-135M-Instruct, `reki setup`) through the warm LLM server the stack starts
(`reki_core.localstack.LLMServer`: llama.cpp's `llama-server` on loopback): a whole small collective day extracted with
the answer gates in `fail` mode, and the server killed mid-shard then restarted (the shard fails clearly and
resumes after its answered batches)."""

from __future__ import annotations

import datetime as dt

import pytest

from reki_core.config import Config
from reki_core.localstack import LLMServer, free_port_block
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from tests.conftest import make_config
from tests.integration.pipeline_driver import run_day

pytestmark = pytest.mark.integration

DT = dt.date(1997, 9, 22)  # three days into ML-100K: about ten group prompts in collective mode

# conf/reki.yaml's real-model settings, over the smoke model the other tests run (tests/conftest.SMOKE_LLM).
REAL_LLM = {
    "REKI__LLM__BACKEND": "openai",
    "REKI__LLM__IS_SMOKE_MODEL": "false",
    "REKI__LLM__ENGINE__MODEL_PATH": ".reki/models/SmolLM2-135M-Instruct",
    "REKI__LLM__ENGINE__MODEL_ID": "SmolLM2-135M-Instruct",
    "REKI__LLM__ENGINE__MAX_MODEL_LEN": "2048",
    "REKI__LLM__ENGINE__BATCH_SIZE": "32",
    "REKI__LLM__SAMPLING__MAX_TOKENS": "160",
    "REKI__QUALITY__LLM_SEMANTIC_ACTION": "fail",
    "REKI__QUALITY__LLM_MAX_TRUNCATED_SHARE": "0.9",
    "REKI__QUALITY__LLM_MIN_ANSWER_CHARS": "40",
    "REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}",
    "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
}


def real_config(root, server: LLMServer, **env: str) -> Config:
    return make_config(root, **{**REAL_LLM, "REKI__LLM__ENGINE__BASE_URLS": f"[{server.url}]", **env})


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    """The stack's LLM server class on a free port, its PID file and log under a test state folder."""
    root = tmp_path_factory.mktemp("llm-server")
    server = LLMServer(make_config(root, **REAL_LLM), port=free_port_block(1))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def real_day(tmp_path_factory, llm_server, spark, ml100k_dir):
    root = tmp_path_factory.mktemp("real-day")
    cfg = real_config(root, llm_server)
    run = run_day(cfg, DT, spark, until="answers_gate")
    return cfg, run


def test_a_whole_day_extracted_by_the_real_model_through_the_warm_server_passes_the_strict_gates(real_day):
    cfg, run = real_day
    steps = {s["step"]: s for s in read_steps(Lake(cfg.lake_uri), DT)}
    plan = steps["llm_plan"]
    assert plan["mode"] == "collective" and plan["n_pending"] > 0 and plan["is_smoke_model"] is False
    shards = [s for name, s in steps.items() if name.startswith("llm_shard_")]
    assert sum(s["answered"] for s in shards) == plan["n_pending"] and all(s["success"] for s in shards)
    assert {s["backend"] for s in shards} == {"openai"} and {s["model_id"] for s in shards} == {"SmolLM2-135M-Instruct"}
    gate = steps["llm_answers_gate"]
    assert gate["success"] and gate["semantic_action"] == "fail" and gate["is_smoke_model"] is False, gate
    assert run.results["assign_knowledge"]["left_out"] == 0


def test_server_killed_mid_shard_fails_it_clearly_and_it_resumes_after_the_restart(real_day, llm_server, tmp_path):
    from reki_core.llm.backends import make_backend
    from reki_core.llm.runner import ShardFailedError, plan_shards, run_shard

    day_cfg, _ = real_day
    # The same day's prompts under a new answer key (another seed), answered two at a time, kept short.
    cfg = real_config(tmp_path, llm_server, REKI__PATHS__LAKE_URI=day_cfg.lake_uri, REKI__LLM__SAMPLING__SEED="1",
                      REKI__LLM__SAMPLING__MAX_TOKENS="16", REKI__LLM__ENGINE__BATCH_SIZE="2",
                      REKI__LLM__ENGINE__MAX_RETRIES="1", REKI__LLM__ENGINE__TIMEOUT_S="30")
    [shard] = plan_shards(cfg, DT)
    assert shard["n_prompts"] > 4
    backend = make_backend(cfg)
    answer = backend.generate

    def killed_after_the_first_batch(requests):
        results = answer(requests)
        llm_server.stop()  # SIGTERM to its process group, as a crash or `make stop` would
        return results

    backend.generate = killed_after_the_first_batch
    try:
        with pytest.raises(ShardFailedError, match=rf"stopped after 4 of {shard['n_prompts']}.*first reason: "
                           rf"{llm_server.url}/: cannot connect.*a retry resumes after them"):
            run_shard(cfg, DT, 0, backend=backend)
    finally:
        llm_server.start()  # supervised in the stack: back on the same port
    resumed = run_shard(cfg, DT, 0)
    assert resumed["success"] and resumed["resumed_from_earlier_attempt"] == 2
    assert resumed["calls"] == shard["n_prompts"] and resumed["stored"] == shard["n_prompts"]
