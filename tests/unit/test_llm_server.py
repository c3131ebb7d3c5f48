"""The warm LLM server as the stacks start it: its command (loopback, the configured model; llama.cpp's slots,
context and sleeping threads, or transformers serve's dtype and bounded KV cache) in `reki stack up` and as a
supervised program of the cluster profile."""

from __future__ import annotations

import json

import pytest

from reki_core import cluster
from reki_core.llm.llama_cpp_server import server_binary
from reki_core.localstack import LLMServer
from tests.conftest import make_config

REAL = {"REKI__LLM__SERVER__ENABLED": "true", "REKI__LLM__BACKEND": "openai",
        "REKI__LLM__ENGINE__MODEL_PATH": ".reki/models/SmolLM2-135M-Instruct"}


def test_llama_cpp_serves_the_folders_gguf_on_loopback_with_its_slots_and_threads(tmp_path):
    cfg = make_config(tmp_path, **REAL, REKI__LLM__SERVER__PORT="18090", REKI__LLM__SERVER__PARALLEL="4",
                      REKI__LLM__SERVER__THREADS="3", REKI__LLM__ENGINE__MAX_MODEL_LEN="1024")
    assert cfg.llm.server.program == "llama.cpp"  # the default
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "REKI_MODEL.json").write_text(json.dumps({"gguf_file": "m.Q4_1.gguf"}))
    argv = LLMServer(cfg, model_path=str(folder)).command()
    assert argv[0] == str(server_binary())
    pairs = dict(zip(argv[1::], argv[2::]))
    assert (pairs["--model"], pairs["--alias"]) == (str(folder / "m.Q4_1.gguf"), cfg.llm.engine.model_id)
    assert (pairs["--host"], pairs["--port"], pairs["--parallel"], pairs["--ctx-size"]) == ("127.0.0.1", "18090", "4", "4096")
    assert pairs["--threads"] == pairs["--threads-batch"] == "3" and pairs["--flash-attn"] == "off"


def test_llama_cpp_threads_spin_briefly_before_sleeping_whatever_the_caller_set(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # a set policy makes GNU OpenMP ignore GOMP_SPINCOUNT
    env = LLMServer(make_config(tmp_path, **REAL)).environment()
    assert env["GOMP_SPINCOUNT"] == "3000" and "OMP_WAIT_POLICY" not in env


def test_a_folder_without_its_gguf_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="reki setup"):
        LLMServer(make_config(tmp_path, **REAL), model_path=str(tmp_path)).command()


def test_transformers_serve_serves_the_configured_folder_on_loopback_with_a_bounded_kv_cache(tmp_path):
    cfg = make_config(tmp_path, **REAL, REKI__LLM__SERVER__PROGRAM="transformers", REKI__LLM__SERVER__PORT="18090",
                      REKI__LLM__SERVER__KV_CACHE_BLOCKS="64")
    server = LLMServer(cfg)
    argv = server.command()
    assert argv[1:3] == ["serve", str(cfg.resolve(".reki/models/SmolLM2-135M-Instruct"))]
    pairs = dict(zip(argv[3::], argv[4::]))
    assert (pairs["--host"], pairs["--port"], pairs["--device"], pairs["--dtype"]) == ("127.0.0.1", "18090", "cpu", "float32")
    assert "--continuous-batching" in argv and pairs["--cb-num-blocks"] == "64"
    assert server.url == "http://127.0.0.1:18090/v1" == cfg.llm.server_urls()[0]
    assert server.log_file == cfg.state_dir / "logs" / "llm-server.log"


def test_base_urls_replace_the_local_server_for_the_shards(tmp_path):
    cfg = make_config(tmp_path, REKI__LLM__ENGINE__BASE_URLS="[http://gpu-0:8000/v1, http://gpu-1:8000/v1]")
    assert cfg.llm.server_urls() == ["http://gpu-0:8000/v1", "http://gpu-1:8000/v1"]


def test_the_cluster_profile_supervises_the_server_after_the_connect_server(tmp_path):
    cfg = make_config(tmp_path, **REAL)
    names = cluster.program_names(cfg)
    assert names.index("llm-server") == names.index("spark-connect") + 1 < names.index("api-server")
    conf = cluster.supervisord_conf(cfg)
    section = conf.split("[program:llm-server]")[1].split("[program:")[0]
    assert "llama-server --model" in section and "--host 127.0.0.1" in section and "autostart=true" in section
    assert 'GOMP_SPINCOUNT="3000"' in section  # threads spin briefly, then sleep, as under `reki stack up`
    assert ("llm-server", [(cfg.llm.server.port, "llm.server.port")]) in cluster.service_ports_of(cfg).items()
    # Disabled (a remote fleet in llm.engine.base_urls, or the tests' smoke model): no program at all.
    assert "llm-server" not in cluster.program_names(make_config(tmp_path, REKI__LLM__SERVER__ENABLED="false"))
