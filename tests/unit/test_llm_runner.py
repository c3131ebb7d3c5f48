"""The extraction runner: planning, cache hits, resume after a kill, failures, over-long prompts (assignment: tests/spark)."""

from __future__ import annotations

import pandas as pd
import pytest
from llm_test_helpers import (DAY, NEXT_DAY, ScriptedBackend, WorkerKilled, individual_prompts, prompt_row,
                              tiny_config, write_prompts)

from reki_core.llm import runner
from reki_core.llm.store import known_prompt_hashes, read_answers, sampling_version
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake


def _run_all(cfg, day, backend):
    shards = runner.plan_shards(cfg, day)
    results = [runner.run_shard(cfg, day, s["shard_id"], backend=backend) for s in shards]
    return shards, results


def test_plan_is_deterministic_and_second_run_makes_zero_calls(tmp_path):
    cfg = tiny_config(tmp_path)
    lake = Lake(cfg.lake_uri)
    prompts = write_prompts(lake, DAY, individual_prompts(7, 5))
    first = runner.plan_shards(cfg, DAY)
    assert first == runner.plan_shards(cfg, DAY)  # same input, same shard ids and plan id
    assert [s["n_prompts"] for s in first] == [5, 5, 2]

    backend = ScriptedBackend(cfg)
    _, results = _run_all(cfg, DAY, backend)
    assert sorted(backend.requests) == sorted(prompts["prompt_hash"])  # every prompt exactly once
    assert sum(r["calls"] for r in results) == 12
    assert known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg)) == set(prompts["prompt_hash"])

    again = ScriptedBackend(cfg)
    assert runner.plan_shards(cfg, DAY) == []  # nothing pending: no shard, no call
    assert _run_all(cfg, DAY, again) == ([], []) and again.requests == []
    summary = runner.extraction_summary(cfg, DAY)
    assert summary["calls"] == 0 and summary["cache_hits"] == 12 and summary["is_smoke_model"] is True
    assert "meaningless" in summary["note"]


def test_a_day_with_more_prompts_than_shards_allowed_gets_bigger_shards(tmp_path):
    """12 prompts, shards of 5, at most 2 shards (Airflow's map limit): two shards of 6."""
    cfg = tiny_config(tmp_path, REKI__LLM__MAX_SHARDS="2")
    write_prompts(Lake(cfg.lake_uri), DAY, individual_prompts(7, 5))
    shards = runner.plan_shards(cfg, DAY)
    assert [(s["shard_id"], s["n_prompts"]) for s in shards] == [(0, 6), (1, 6)]
    plan = Lake(cfg.lake_uri).read_partition(runner.PLAN, DAY)
    assert plan.groupby("shard_id").size().tolist() == [6, 6]


def test_next_day_sends_only_changed_prompts(tmp_path):
    cfg = tiny_config(tmp_path)
    lake = Lake(cfg.lake_uri)
    write_prompts(lake, DAY, individual_prompts(6, 4))
    _run_all(cfg, DAY, ScriptedBackend(cfg))
    rows = individual_prompts(6, 4)
    rows[0] = prompt_row("user", "u0", "User u0 watched movie 0 and movie 99. Describe.", "User u0 watched 0, 99.")
    write_prompts(lake, NEXT_DAY, rows)
    backend = ScriptedBackend(cfg)
    _run_all(cfg, NEXT_DAY, backend)
    assert backend.requests == [rows[0]["prompt_hash"]]
    summary = runner.extraction_summary(cfg, NEXT_DAY)
    assert (summary["calls"], summary["cache_hits"]) == (1, 9)


def test_killed_shard_resumes_after_its_finished_batches(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LLM__SHARD_SIZE="12")  # one shard of 12, batches of 4
    lake = Lake(cfg.lake_uri)
    prompts = write_prompts(lake, DAY, individual_prompts(8, 4))
    [shard] = runner.plan_shards(cfg, DAY)
    killed = ScriptedBackend(cfg, fail_after_calls=8)  # dies at the third batch
    with pytest.raises(WorkerKilled):
        runner.run_shard(cfg, DAY, shard["shard_id"], backend=killed)
    assert len(killed.requests) == 8
    # Nothing is published to the store by a killed shard ...
    assert known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg)) == set()
    # ... but its retry sends only the 4 prompts the dead worker had not finished.
    retry = ScriptedBackend(cfg)
    result = runner.run_shard(cfg, DAY, shard["shard_id"], backend=retry)
    assert len(retry.requests) == 4 and set(retry.requests).isdisjoint(killed.requests)
    # The 8 answers of the killed attempt are its calls, resumed, not cache hits.
    assert (result["cache_hits"], result["resumed_from_earlier_attempt"], result["calls"]) == (0, 8, 12)
    assert result["answered"] == result["stored"] == 12
    # ScriptedBackend answers "answer to <text>": its tokens are the words of that, over all 12 prompts.
    assert result["completion_tokens"] == sum(2 + len(t.split()) for t in prompts["text"])
    assert known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg)) == set(prompts["prompt_hash"])
    assert not lake.fs.exists(f"{lake.root}/{runner.INFLIGHT}/dt={DAY}/shard-00000")


def test_replanning_after_a_kill_keeps_the_finished_batches(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LLM__SHARD_SIZE="12")
    lake = Lake(cfg.lake_uri)
    write_prompts(lake, DAY, individual_prompts(8, 4))
    runner.plan_shards(cfg, DAY)
    with pytest.raises(WorkerKilled):
        runner.run_shard(cfg, DAY, 0, backend=ScriptedBackend(cfg, fail_after_calls=4))
    shards = runner.plan_shards(cfg, DAY)  # a whole-DAG re-run plans again
    assert sum(s["n_prompts"] for s in shards) == 8
    steps = {s["step"]: s for s in read_steps(lake, DAY)}
    assert steps["llm_plan"]["recovered_from_killed_shards"] == 4


def test_answers_of_a_shard_that_gave_up_are_kept_by_the_next_days_plan(tmp_path):
    """DAY's shard dies after 4 answers and is never re-run; NEXT_DAY has the same prompts: only 4 are sent."""
    cfg = tiny_config(tmp_path, REKI__LLM__SHARD_SIZE="12")
    lake = Lake(cfg.lake_uri)
    write_prompts(lake, DAY, individual_prompts(8, 4))
    runner.plan_shards(cfg, DAY)
    killed = ScriptedBackend(cfg, fail_after_calls=4)
    with pytest.raises(WorkerKilled):
        runner.run_shard(cfg, DAY, 0, backend=killed)
    write_prompts(lake, NEXT_DAY, individual_prompts(8, 4))
    shards = runner.plan_shards(cfg, NEXT_DAY)
    assert sum(s["n_prompts"] for s in shards) == 8
    assert {s["step"]: s for s in read_steps(lake, NEXT_DAY)}["llm_plan"]["recovered_from_killed_shards"] == 4
    assert set(killed.requests) <= known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg))
    assert not lake.fs.exists(f"{lake.root}/{runner.INFLIGHT}/dt={DAY}")


def test_failing_prompt_is_recorded_and_retried_next_run(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LLM__MAX_FAILURE_RATE="0.5")
    lake = Lake(cfg.lake_uri)
    prompts = write_prompts(lake, DAY, individual_prompts(3, 2))
    bad = prompts.loc[0, "text"]
    _run_all(cfg, DAY, ScriptedBackend(cfg, answer=lambda t: None if t == bad else f"ok {t}"))
    failures = lake.read_partition(runner.FAILURES, DAY)
    assert failures[["prompt_hash", "action", "reason"]].values.tolist() == [
        [prompts.loc[0, "prompt_hash"], "error", "scripted failure"]]
    retry = ScriptedBackend(cfg)
    _run_all(cfg, DAY, retry)
    assert retry.requests == [prompts.loc[0, "prompt_hash"]]
    assert not lake.has_partition(runner.FAILURES, DAY)  # the new plan answered it


def test_shard_fails_when_failures_pass_the_rate(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LLM__MAX_FAILURE_RATE="0.2")
    lake = Lake(cfg.lake_uri)
    prompts = write_prompts(lake, DAY, individual_prompts(3, 2))
    bad = set(prompts["text"][:2])
    runner.plan_shards(cfg, DAY)
    with pytest.raises(runner.ShardFailedError, match=r"2 of 5 prompts failed \(40.0% > llm.max_failure_rate 20.0%\)"):
        runner.run_shard(cfg, DAY, 0, backend=ScriptedBackend(cfg, answer=lambda t: None if t in bad else "fine"))
    retry = ScriptedBackend(cfg)
    runner.run_shard(cfg, DAY, 0, backend=retry)  # the answered three are kept; only the two are sent again
    assert sorted(retry.requests) == sorted(prompts["prompt_hash"][:2])


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_over_long_prompts_follow_the_policy(tmp_path, policy):
    cfg = tiny_config(tmp_path, REKI__LLM__OVER_LONG_POLICY=policy, REKI__LLM__ENGINE__MAX_MODEL_LEN="200",
                      REKI__LLM__MAX_FAILURE_RATE="0")
    lake = Lake(cfg.lake_uri)
    rows = individual_prompts(2, 0) + [prompt_row("item", "long", "Describe " + "very long title " * 200 + "END")]
    write_prompts(lake, DAY, rows)
    seen = {}
    _run_all(cfg, DAY, ScriptedBackend(cfg, answer=lambda t: seen.setdefault(t, "answer")))
    failures = lake.read_partition(runner.FAILURES, DAY)
    assert failures["prompt_hash"].tolist() == [rows[-1]["prompt_hash"]]
    assert failures["action"].tolist() == ["truncated" if policy == "truncate" else "skipped"]
    assert "limit 194" in failures["reason"][0]  # 200 - 6 answer tokens
    answers = read_answers(lake, cfg.llm.engine.model_id, sampling_version(cfg))
    if policy == "truncate":
        [sent] = [t for t in seen if t.startswith("Describe very")]
        assert sent.endswith("END") and len(sent) < len(rows[-1]["text"])
        assert answers.set_index("prompt_hash").loc[rows[-1]["prompt_hash"], "truncated_prompt"]
    else:
        assert len(seen) == 2 and rows[-1]["prompt_hash"] not in set(answers["prompt_hash"])


def test_missing_prompts_partition_names_the_path(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="prompts/dt=1998-03-01"):
        runner.plan_shards(cfg, DAY)


def test_shard_batches_prompts_of_similar_length(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LLM__SHARD_SIZE="12")  # one shard of 12, batches of 4
    lake = Lake(cfg.lake_uri)
    rows = [prompt_row("item", f"i{i}", f"Describe movie {i}." + " Long details." * (40 if i % 2 else 0))
            for i in range(12)]
    write_prompts(lake, DAY, rows)
    backend = ScriptedBackend(cfg)
    _run_all(cfg, DAY, backend)
    text_of = {r["prompt_hash"]: r["text"] for r in rows}
    sent_lengths = backend.count_prompt_tokens([text_of[h] for h in backend.requests])
    # Short and long prompts alternate in hash order; sent shortest first, no batch mixes them.
    assert sent_lengths == sorted(sent_lengths)
    assert sorted(backend.requests) == sorted(text_of)


def test_new_weights_under_an_old_model_id_stop_the_plan_instead_of_reusing_its_answers(tmp_path):
    """The cache is keyed by llm.engine.model_id: weights changed in place under the same id are caught."""
    from reki_core.llm.store import ModelIdentityError

    weights = tmp_path / "my-llm"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "llama"}')
    (weights / "model.safetensors").write_bytes(bytes(range(256)) * 16384)  # 4 MiB: fingerprinted by samples
    cfg = tiny_config(tmp_path, REKI__LLM__ENGINE__MODEL_PATH=str(weights), REKI__LLM__ENGINE__MODEL_ID="my-llm-v1")
    lake = Lake(cfg.lake_uri)
    write_prompts(lake, DAY, individual_prompts(3, 2))
    _run_all(cfg, DAY, ScriptedBackend(cfg))
    assert runner.read_plan(cfg, DAY)["weights_fingerprint"]

    (weights / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 16384)  # fine-tuned, saved in place
    with pytest.raises(ModelIdentityError, match=r"model_id 'my-llm-v1' already names other weights") as err:
        runner.plan_shards(cfg, DAY)
    assert str(weights) in str(err.value)
    renamed = tiny_config(tmp_path, REKI__LLM__ENGINE__MODEL_PATH=str(weights), REKI__LLM__ENGINE__MODEL_ID="my-llm-v2")
    assert sum(s["n_prompts"] for s in runner.plan_shards(renamed, DAY)) == 5  # its own id: every prompt is asked again

    (weights / "model.safetensors").write_bytes(bytes(range(256)) * 16384)  # the old weights back
    assert runner.plan_shards(cfg, DAY) == []  # their answers are still good


# ---------------------------------------------------------------- the answer key and a broken server


@pytest.mark.parametrize("change", [
    {"REKI__LLM__BACKEND": "openai"},  # another engine
    {"REKI__LLM__ENGINE__DTYPE": "bfloat16"},
    {"REKI__LLM__ENGINE__QUANTIZATION": "bnb-8bit"},
    {"REKI__LLM__SAMPLING__MAX_TOKENS": "7"},
    {"REKI__LLM__ENGINE__WEIGHTS_FINGERPRINT": "sha256-of-the-fleet-s-weights"},  # a remote fleet's declared weights
])
def test_anything_that_shapes_an_answer_changes_the_answer_key(tmp_path, change):
    assert sampling_version(tiny_config(tmp_path)) != sampling_version(tiny_config(tmp_path, **change))


def test_the_local_servers_program_is_part_of_the_answer_key_and_a_fleets_is_not_guessed(tmp_path):
    llama = tiny_config(tmp_path, REKI__LLM__BACKEND="openai", REKI__LLM__SERVER__PROGRAM="llama.cpp")
    transformers = tiny_config(tmp_path, REKI__LLM__BACKEND="openai", REKI__LLM__SERVER__PROGRAM="transformers")
    assert sampling_version(llama) != sampling_version(transformers)
    fleet = {"REKI__LLM__BACKEND": "openai", "REKI__LLM__ENGINE__BASE_URLS": "[http://gpu-0:8000/v1]"}
    assert sampling_version(tiny_config(tmp_path, **fleet, REKI__LLM__SERVER__PROGRAM="llama.cpp")) == \
        sampling_version(tiny_config(tmp_path, **fleet, REKI__LLM__SERVER__PROGRAM="transformers"))


def test_a_changed_chat_template_changes_the_answer_key(tmp_path):
    weights = tmp_path / "llm"
    weights.mkdir()
    (weights / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    cfg = tiny_config(tmp_path, REKI__LLM__ENGINE__MODEL_PATH=str(weights))
    before = sampling_version(cfg)
    (weights / "chat_template.jinja").write_text("<|user|>{{ messages[0]['content'] }}<|assistant|>")
    assert sampling_version(cfg) != before


def test_a_hung_server_fails_the_shard_clearly_within_its_timeout(tmp_path):
    import time

    from test_llm_backends import _ChatServer, _serve

    server = _serve(_ChatServer())
    try:
        cfg = tiny_config(tmp_path, REKI__LLM__BACKEND="openai", REKI__LLM__ENGINE__BASE_URLS=f"[{server.url}]",
                          REKI__LLM__ENGINE__TIMEOUT_S="0.3", REKI__LLM__ENGINE__MAX_RETRIES="0",
                          REKI__LLM__ENGINE__BATCH_SIZE="2", REKI__LLM__SHARD_SIZE="20")
        prompts = write_prompts(Lake(cfg.lake_uri), DAY, individual_prompts(6, 4))
        server.script = {t: ["hang"] for t in prompts["text"]}  # it lists its model, then answers nothing
        server.hang_s = 60.0  # far beyond the timeout, so waiting for the server could not pass even on a busy machine
        runner.plan_shards(cfg, DAY)
        started = time.perf_counter()
        with pytest.raises(runner.ShardFailedError, match=r"2 of 2 prompts failed \(stopped after 2 of 10: it could "
                           r"no longer succeed\).*first reason: .*no answer within llm.engine.timeout_s"):
            runner.run_shard(cfg, DAY, 0)
        assert len(server.seen) == 2  # one batch was sent, not all five
        assert time.perf_counter() - started < 30  # the client gave up at its timeout, not at the server's 60 s
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_answering_garbage_fails_the_shard_naming_it(tmp_path):
    from test_llm_backends import _ChatServer, _serve

    server = _serve(_ChatServer())
    try:
        cfg = tiny_config(tmp_path, REKI__LLM__BACKEND="openai", REKI__LLM__ENGINE__BASE_URLS=f"[{server.url}]",
                          REKI__LLM__ENGINE__MAX_RETRIES="0", REKI__LLM__SHARD_SIZE="20")
        prompts = write_prompts(Lake(cfg.lake_uri), DAY, individual_prompts(3, 2))
        server.script = {t: ["garbage"] for t in prompts["text"]}
        runner.plan_shards(cfg, DAY)
        with pytest.raises(runner.ShardFailedError, match=r"malformed chat-completions response"):
            runner.run_shard(cfg, DAY, 0)  # the shard's own backend, from config
    finally:
        server.shutdown()
        server.server_close()


def test_a_shard_reads_only_its_slice_of_the_plan_prompts_and_store(tmp_path, monkeypatch):
    """No whole-day read of the plan or the prompts, and only its own hashes of the store: a shard's memory is
    bounded by the shard. Its prompts are those of the whole-day selection, in the same order."""
    cfg = tiny_config(tmp_path, REKI__LAKE__BATCH_ROWS="2")
    lake = Lake(cfg.lake_uri)
    rows = individual_prompts(7, 5)
    rows.append({**rows[3], "entity_id": "u3-twin", "prompt_id": "user:u3-twin"})  # the same prompt: one call
    rows.append(prompt_row("item", "i99", "Describe the movie number 99.", ask_llm=False))  # not for the LLM
    whole_day = write_prompts(lake, DAY, rows)
    prompts = whole_day[whole_day["ask_llm"]].drop_duplicates("prompt_hash")
    expected = prompts.sort_values("prompt_hash").reset_index(drop=True)  # the whole day's selection
    shards = runner.plan_shards(cfg, DAY)
    plan = lake.read_partition(runner.PLAN, DAY)
    assert sorted(plan["prompt_hash"]) == sorted(expected["prompt_hash"])
    whole_reads, store_lookups = [], []
    read_partition, known = Lake.read_partition, runner.known_prompt_hashes
    monkeypatch.setattr(Lake, "read_partition", lambda self, dataset, *a, **k: (
        whole_reads.append(dataset), read_partition(self, dataset, *a, **k))[1])
    monkeypatch.setattr(runner, "known_prompt_hashes", lambda *a, **k: (store_lookups.append(k.get("among")),
                                                                        known(*a, **k))[1])
    backend = ScriptedBackend(cfg)
    for shard in shards:
        mine = set(plan.loc[plan["shard_id"] == shard["shard_id"], "prompt_hash"])
        got, _ = runner.extraction_prompts(cfg, DAY, lake, among=mine)
        want = expected[expected["prompt_hash"].isin(mine)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
        assert "u3-twin" not in set(got["entity_id"])  # the first row of a hash, as the whole day keeps it
        runner.run_shard(cfg, DAY, shard["shard_id"], backend=backend)
        assert store_lookups[-1] == mine
    assert not {runner.PLAN, runner.PROMPTS} & set(whole_reads), whole_reads
    assert sorted(backend.requests) == sorted(prompts["prompt_hash"])


def test_the_mode_is_collective_when_the_day_has_group_prompts_and_only_flagged_rows_are_planned(tmp_path):
    cfg = tiny_config(tmp_path, REKI__LAKE__BATCH_ROWS="1")
    lake = Lake(cfg.lake_uri)
    rows = [{**r, "ask_llm": False} for r in individual_prompts(3, 2)]
    rows += [prompt_row("item_group", "g1", "Describe what movies 1 and 2 share."),
             prompt_row("user_pos_group", "p1", "Describe what users who liked movie 1 share.")]
    write_prompts(lake, DAY, rows)
    chosen, mode = runner.extraction_prompts(cfg, DAY, lake)
    assert mode == "collective" and sorted(chosen["entity_kind"]) == ["item_group", "user_pos_group"]
    runner.plan_shards(cfg, DAY)
    assert lake.read_json(f"{runner.PLAN}/dt={DAY}/_plan.json")["mode"] == "collective"
    write_prompts(lake, NEXT_DAY, individual_prompts(3, 2))
    assert runner.extraction_prompts(cfg, NEXT_DAY, lake)[1] == "individual"
