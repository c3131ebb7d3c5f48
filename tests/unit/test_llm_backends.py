"""The three backends behind one interface: transformers on the real smoke model, the vLLM adapter contract
against a stand-in `vllm` module, and the OpenAI-compatible backend against a real local HTTP server."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from llm_test_helpers import tiny_config

from reki_core.llm.backends import (GenerationRequest, OpenAIBackend, TransformersBackend, VLLMBackend,
                                    make_backend, measure_tokens_per_s)
from reki_core.llm.smoke_model import ensure_smoke_model

REQUESTS = [GenerationRequest(f"h{i}", f"Describe the movie number {i} " + "and its plot " * i) for i in range(5)]


# ---------------------------------------------------------------- transformers on the smoke model


@pytest.fixture(scope="module")
def smoke_backend(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path_factory.mktemp("tf"), REKI__LLM__ENGINE__BATCH_SIZE="3")
    return make_backend(cfg)  # creates the smoke model folder when it is missing


def test_smoke_model_is_deterministic_idempotent_and_says_it_is_meaningless(tmp_path):
    a = ensure_smoke_model(tmp_path / "a")
    b = ensure_smoke_model(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    ensure_smoke_model(a)  # complete: left alone
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    assert "meaningless" in (a / "README.md").read_text()
    (a / "tokenizer.json").unlink()  # incomplete: rebuilt
    ensure_smoke_model(a)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_transformers_batched_keeps_order_and_matches_one_at_a_time(smoke_backend):
    batched = smoke_backend.generate(REQUESTS)
    single = [smoke_backend.generate([r])[0] for r in REQUESTS]
    assert [r.request_id for r in batched] == [r.request_id for r in REQUESTS]
    assert [r.text for r in batched] == [r.text for r in single]  # left padding does not change greedy output
    assert len({r.text for r in batched}) > 1
    for res, req in zip(batched, REQUESTS):
        assert res.finish_reason in ("stop", "length") and res.error is None and res.text
        assert 1 <= res.completion_tokens <= 6
        # The chat template wraps the prompt: more tokens than the bare text.
        assert res.prompt_tokens == smoke_backend.count_prompt_tokens([req.text])[0]
        assert res.prompt_tokens > len(smoke_backend._tokenizer(req.text)["input_ids"])
    assert any(r.finish_reason == "length" and r.completion_tokens == 6 for r in batched)
    assert smoke_backend.generate(REQUESTS[:2])[0].text == batched[0].text  # deterministic


def test_transformers_sampling_gives_a_prompt_the_same_answer_whatever_its_batch(tmp_path):
    """At temperature > 0 a resumed shard (other prompts around it) still reproduces each prompt's answer."""
    import torch

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, REKI__LLM__ENGINE__BATCH_SIZE="3", REKI__LLM__SAMPLING__TEMPERATURE="1.5",
                      REKI__LLM__SAMPLING__MAX_TOKENS="12")
    backend = make_backend(cfg)
    whole = backend.generate(REQUESTS)
    resumed = backend.generate(REQUESTS[1:])  # the shard's tail, after a kill: batched differently
    assert [r.text for r in resumed] == [r.text for r in whole[1:]]
    assert backend.generate([REQUESTS[4], REQUESTS[0]])[0].text == whole[4].text
    other_seed = make_backend(tiny_config(tmp_path / "b", REKI__LLM__SAMPLING__TEMPERATURE="1.5",
                                          REKI__LLM__SAMPLING__MAX_TOKENS="12", REKI__LLM__SAMPLING__SEED="7"))
    assert [r.text for r in other_seed.generate(REQUESTS)] != [r.text for r in whole]  # it does sample


def test_transformers_truncation_fits_the_budget_and_keeps_both_ends(smoke_backend):
    text = "START " + "middle words " * 600 + "the instruction at the END"
    cut = smoke_backend.truncate_prompt(text, 120)
    assert smoke_backend.count_prompt_tokens([cut])[0] <= 120
    assert cut.startswith("START") and cut.endswith("END")


def test_transformers_isolates_a_failing_prompt(smoke_backend, monkeypatch):
    original = smoke_backend._generate_batch

    def fail_on_h2(chunk):
        if any(r.request_id == "h2" for r in chunk):
            raise RuntimeError("CUDA out of memory")
        return original(chunk)

    monkeypatch.setattr(smoke_backend, "_generate_batch", fail_on_h2)
    results = smoke_backend.generate(REQUESTS)
    assert [r.finish_reason == "error" for r in results] == [False, False, True, False, False]
    assert "out of memory" in results[2].error


def test_transformers_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tiny_config(tmp_path, REKI__LLM__ENGINE__DEVICE="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        TransformersBackend(cfg.llm.engine, cfg.llm.sampling, str(cfg.resolve(cfg.llm.engine.model_path)))


# ---------------------------------------------------------------- vLLM adapter against a stand-in module


class _StandInTokenizer:
    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return f"<user>{messages[0]['content']}</user><assistant>"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def _stand_in_vllm(calls: dict):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            calls["sampling"] = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def get_tokenizer(self):
            return _StandInTokenizer()

        def generate(self, prompts, params, use_tqdm=True):
            if any("poison" in p for p in prompts):
                raise ValueError("stand-in engine error on a bad prompt")
            calls["prompts"] = prompts
            finish = ["stop", "length", "abort"]
            # Each output mirrors its prompt, so a lost order would show.
            return [types.SimpleNamespace(
                prompt_token_ids=list(range(len(p.split()))),
                outputs=[types.SimpleNamespace(text=f" answer({p}) ", token_ids=[1] * (i + 2),
                                               finish_reason=finish[i % 3])])
                for i, p in enumerate(prompts)]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_adapter_builds_params_applies_template_and_maps_outputs(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _stand_in_vllm(calls))
    cfg = tiny_config(tmp_path, REKI__LLM__BACKEND="vllm", REKI__LLM__IS_SMOKE_MODEL="false",
                      REKI__LLM__ENGINE__MODEL_PATH="/models/qwen", REKI__LLM__ENGINE__MODEL_ID="qwen-7b",
                      REKI__LLM__ENGINE__TENSOR_PARALLEL_SIZE="2", REKI__LLM__ENGINE__MAX_MODEL_LEN="4096",
                      REKI__LLM__ENGINE__GPU_MEMORY_UTILIZATION="0.9", REKI__LLM__SAMPLING__TEMPERATURE="0.7",
                      REKI__LLM__SAMPLING__TOP_P="0.95", REKI__LLM__SAMPLING__SEED="11")
    backend = make_backend(cfg)
    assert isinstance(backend, VLLMBackend)
    assert calls["engine"] == {"model": "/models/qwen", "served_model_name": "qwen-7b", "tensor_parallel_size": 2,
                               "max_model_len": 4096, "gpu_memory_utilization": 0.9, "seed": 11,
                               "trust_remote_code": False}
    assert calls["sampling"] == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 6, "seed": 11}
    requests = [GenerationRequest(f"h{i}", f"prompt {i}") for i in range(4)]
    results = backend.generate(requests)
    assert calls["prompts"] == [f"<user>prompt {i}</user><assistant>" for i in range(4)]
    assert [r.request_id for r in results] == ["h0", "h1", "h2", "h3"]
    assert [r.finish_reason for r in results] == ["stop", "length", "error", "stop"]
    assert results[0].text == "answer(<user>prompt 0</user><assistant>)"
    assert results[2].text == "" and "abort" in results[2].error
    assert [r.completion_tokens for r in results] == [2, 3, 4, 5]
    assert [r.prompt_tokens for r in results] == [2, 2, 2, 2]
    assert backend.max_prompt_tokens == 4090
    assert backend.generate([]) == []
    # An engine error on one prompt fails that prompt alone, with the error; the others are answered.
    mixed = backend.generate([GenerationRequest("a", "fine"), GenerationRequest("b", "poison"), GenerationRequest("c", "ok")])
    assert [(r.request_id, r.finish_reason) for r in mixed] == [("a", "stop"), ("b", "error"), ("c", "stop")]
    assert "stand-in engine error" in mixed[1].error


def test_vllm_backend_without_vllm_names_the_gpu_venv(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails, as in the Airflow venv
    cfg = tiny_config(tmp_path, REKI__LLM__BACKEND="vllm", REKI__LLM__IS_SMOKE_MODEL="false")
    with pytest.raises(RuntimeError, match="requirements-gpu.txt"):
        make_backend(cfg)


# ---------------------------------------------------------------- OpenAI-compatible servers, real local HTTP servers


class _ChatServer(ThreadingHTTPServer):
    """A scripted OpenAI-compatible server: /v1/models lists `models`; a chat prompt found in `script` gets those
    statuses (or "hang": no answer for `hang_s`; "garbage": a 200 that is not a chat completion) before a 200."""

    daemon_threads = True

    def __init__(self, models=("/srv/models/served",)):
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.models = list(models)
        self.script: dict[str, list] = {}
        self.seen: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hang_s = 5.0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # a client that gave up at its timeout, as the hang and retry tests want: no traceback
        super().handle_error(request, client_address)


class _ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, data: bytes, content_type: str = "application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path != "/v1/models":
            return self._send(404, b"{}")
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in self.server.models]
        self._send(200, json.dumps({"object": "list", "data": models}).encode())

    def do_POST(self):
        server: _ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        with server.lock:
            server.seen.append(body)
            server.auth.append(self.headers.get("Authorization"))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            codes = server.script.get(prompt, [])
            status = codes.pop(0) if codes else 200
        time.sleep(server.hang_s if status == "hang" else 0.05)  # 0.05: long enough for concurrent requests to overlap
        with server.lock:
            server.in_flight -= 1
        if status == "garbage":
            return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
        if status not in (200, "hang"):
            return self._send(status, b'{"error": {"message": "busy"}}', headers=[("Retry-After", "0.1")] * (status == 429))
        finish = "length" if "long" in prompt else "stop"
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": f" re: {prompt} "},
                                "finish_reason": finish}],
                   "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 3, "total_tokens": 0}}
        self._send(200, json.dumps(payload).encode())


def _serve(server: _ChatServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def chat_server():
    server = _serve(_ChatServer())
    yield server
    server.shutdown()
    server.server_close()


def _openai_config(tmp_path, *servers, **env):
    settings = {"REKI__LLM__BACKEND": "openai", "REKI__LLM__IS_SMOKE_MODEL": "false",
                "REKI__LLM__ENGINE__BASE_URLS": "[" + ", ".join(s.url for s in servers) + "]",
                "REKI__LLM__ENGINE__MODEL_ID": "reki-model", "REKI__LLM__ENGINE__API_KEY_ENV": "REKI_TEST_LLM_KEY",
                "REKI__LLM__ENGINE__MAX_RETRIES": "2", "REKI__LLM__ENGINE__MAX_CONCURRENCY": "3"}
    return tiny_config(tmp_path, **{**settings, **env})


def test_openai_backend_keeps_order_bounds_concurrency_sends_the_key_and_the_served_model(tmp_path, chat_server,
                                                                                          monkeypatch):
    monkeypatch.setenv("REKI_TEST_LLM_KEY", "secret-123")
    backend = make_backend(_openai_config(tmp_path, chat_server))
    assert isinstance(backend, OpenAIBackend)
    requests = [GenerationRequest(f"h{i}", f"prompt {i}" + (" long" if i == 4 else "")) for i in range(9)]
    results = backend.generate(requests)
    assert [r.request_id for r in results] == [f"h{i}" for i in range(9)]
    assert results[0].text == "re: prompt 0" and results[0].finish_reason == "stop"
    assert results[4].finish_reason == "length"
    assert (results[1].prompt_tokens, results[1].completion_tokens) == (2, 3)
    assert 1 < chat_server.max_in_flight <= 3
    assert set(chat_server.auth) == {"Bearer secret-123"}
    sent = next(b for b in chat_server.seen if b["messages"][0]["content"] == "prompt 0")
    # A server pinned to one model (transformers serve FOLDER) is sent the name its /v1/models gives.
    assert (sent["model"], sent["max_tokens"], sent["temperature"], sent["seed"]) == ("/srv/models/served", 6, 0.0, 0)
    assert sent["messages"] == [{"role": "user", "content": "prompt 0"}]  # the server applies the chat template


def test_openai_backend_spreads_a_shard_over_every_server_starting_at_its_own(tmp_path):
    servers = [_serve(_ChatServer(models=["reki-model", "other"])) for _ in range(2)]
    try:
        cfg = _openai_config(tmp_path, *servers)
        results = make_backend(cfg, shard_id=1).generate([GenerationRequest(f"h{i}", f"p{i}") for i in range(5)])
        assert all(r.finish_reason == "stop" for r in results)
        # round robin from server 1: p0, p2, p4 there, p1, p3 on server 0; the configured id is served by name
        assert sorted(b["messages"][0]["content"] for b in servers[1].seen) == ["p0", "p2", "p4"]
        assert sorted(b["messages"][0]["content"] for b in servers[0].seen) == ["p1", "p3"]
        assert {b["model"] for s in servers for b in s.seen} == {"reki-model"}
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_openai_backend_refuses_a_server_that_serves_other_models(tmp_path):
    server = _serve(_ChatServer(models=["a", "b"]))
    try:
        with pytest.raises(RuntimeError, match=r"serves \['a', 'b'\], not llm.engine.model_id 'reki-model'"):
            make_backend(_openai_config(tmp_path, server))
    finally:
        server.shutdown()
        server.server_close()


def test_openai_backend_names_an_unreachable_server(tmp_path, chat_server):
    url = chat_server.url
    chat_server.shutdown()
    chat_server.server_close()
    cfg = tiny_config(tmp_path, REKI__LLM__BACKEND="openai", REKI__LLM__ENGINE__BASE_URLS=f"[{url}]",
                      REKI__LLM__ENGINE__MAX_RETRIES="0")
    with pytest.raises(RuntimeError, match=f"LLM server {url}/ did not list its models.*APIConnectionError"):
        make_backend(cfg)


def test_openai_backend_honours_retry_after_on_429_then_succeeds(tmp_path, chat_server):
    chat_server.script["flaky"] = [429, 503]
    backend = make_backend(_openai_config(tmp_path, chat_server))
    [result] = backend.generate([GenerationRequest("h", "flaky")])
    assert result.finish_reason == "stop" and result.text == "re: flaky"
    assert [b["messages"][0]["content"] for b in chat_server.seen] == ["flaky"] * 3


def test_openai_backend_records_failure_when_500s_exhaust_retries(tmp_path, chat_server):
    chat_server.script["broken"] = [500, 500, 500, 500]
    backend = make_backend(_openai_config(tmp_path, chat_server))
    results = backend.generate([GenerationRequest("bad", "broken"), GenerationRequest("good", "fine")])
    assert results[0].finish_reason == "error" and results[0].error.startswith(chat_server.url)
    assert "HTTP 500" in results[0].error
    assert results[1].finish_reason == "stop"
    assert sum(b["messages"][0]["content"] == "broken" for b in chat_server.seen) == 3  # 1 try + 2 retries


def test_openai_backend_does_not_retry_a_refused_key_and_never_shows_it(tmp_path, chat_server, monkeypatch):
    monkeypatch.setenv("REKI_TEST_LLM_KEY", "secret-123")
    chat_server.script["denied"] = [401]
    backend = make_backend(_openai_config(tmp_path, chat_server))
    [result] = backend.generate([GenerationRequest("h", "denied")])
    assert result.finish_reason == "error" and "REKI_TEST_LLM_KEY" in result.error and "secret-123" not in result.error
    assert len(chat_server.seen) == 1


def test_openai_backend_gives_up_on_a_hung_server_within_its_timeout(tmp_path, chat_server):
    chat_server.script["slow"] = ["hang", "hang"]
    backend = make_backend(_openai_config(tmp_path, chat_server, REKI__LLM__ENGINE__TIMEOUT_S="0.3",
                                          REKI__LLM__ENGINE__MAX_RETRIES="1"))
    started = time.perf_counter()
    [result] = backend.generate([GenerationRequest("h", "slow")])
    assert result.finish_reason == "error" and "no answer within llm.engine.timeout_s (0.3s)" in result.error
    assert time.perf_counter() - started < 4  # two tries of 0.3 s and one backoff, not the server's 5 s


def test_openai_backend_names_a_garbage_answer(tmp_path, chat_server):
    chat_server.script["junk"] = ["garbage"]
    backend = make_backend(_openai_config(tmp_path, chat_server, REKI__LLM__ENGINE__MAX_RETRIES="0"))
    [result, fine] = backend.generate([GenerationRequest("h", "junk"), GenerationRequest("g", "fine")])
    assert result.finish_reason == "error" and "malformed chat-completions response" in result.error
    assert fine.finish_reason == "stop"


def test_measure_tokens_per_s_warms_up_on_the_same_requests_and_counts_completion_tokens(smoke_backend, monkeypatch):
    seen = []
    generate = smoke_backend.generate

    def recording(requests):
        seen.append([r.request_id for r in requests])
        return generate(requests)

    monkeypatch.setattr(smoke_backend, "generate", recording)
    rate, results = measure_tokens_per_s(smoke_backend, REQUESTS)
    assert seen == [[r.request_id for r in REQUESTS]] * 2  # the warm-up has the timed call's shapes
    assert [r.request_id for r in results] == [r.request_id for r in REQUESTS]
    tokens = sum(r.completion_tokens for r in results)
    assert tokens > 0 and math.isfinite(rate) and rate > 0
