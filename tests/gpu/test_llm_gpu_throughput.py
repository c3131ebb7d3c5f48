"""GPU throughput of the transformers backend vs the CPU on the same prompts (skipped without CUDA)."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from reki_core.llm.backends import GenerationRequest, TransformersBackend, measure_tokens_per_s  # noqa: E402
from reki_core.llm.smoke_model import ensure_smoke_model  # noqa: E402
from tests.conftest import make_config  # noqa: E402

PROMPTS = [GenerationRequest(f"h{i}", f"Describe the movie number {i}, its genre, director and plot." * 3)
           for i in range(128)]


def test_transformers_on_gpu_is_faster_than_cpu_for_the_same_prompts(tmp_path):
    cfg = make_config(tmp_path, REKI__LLM__SAMPLING__MAX_TOKENS="32", REKI__LLM__ENGINE__BATCH_SIZE="64")
    path = str(ensure_smoke_model(cfg.resolve(cfg.llm.engine.model_path)))
    cpu = TransformersBackend(cfg.llm.engine.model_copy(update={"device": "cpu"}), cfg.llm.sampling, path)
    gpu = TransformersBackend(cfg.llm.engine.model_copy(update={"device": "cuda"}), cfg.llm.sampling, path)
    cpu_rate, cpu_results = measure_tokens_per_s(cpu, PROMPTS)
    gpu_rate, gpu_results = measure_tokens_per_s(gpu, PROMPTS)
    print(f"\ntransformers smoke LM, {len(PROMPTS)} prompts, batch 64, 32 tokens: "
          f"cpu {cpu_rate:.0f} tok/s, gpu ({torch.cuda.get_device_name()}) {gpu_rate:.0f} tok/s, "
          f"ratio {gpu_rate / cpu_rate:.2f}")
    assert all(r.finish_reason != "error" for r in gpu_results)
    assert len(gpu_results) == len(cpu_results) == len(PROMPTS)
    assert gpu_rate > cpu_rate


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is installed only in the GPU venv")
def test_vllm_generates_on_gpu(tmp_path):
    cfg = make_config(tmp_path, REKI__LLM__BACKEND="vllm", REKI__LLM__SAMPLING__MAX_TOKENS="32")
    from reki_core.llm.backends import make_backend

    backend = make_backend(cfg)
    rate, results = measure_tokens_per_s(backend, PROMPTS)
    print(f"\nvllm smoke LM: {rate:.0f} tok/s")
    assert [r.request_id for r in results] == [p.request_id for p in PROMPTS]
    assert all(r.finish_reason in ("stop", "length") for r in results)
