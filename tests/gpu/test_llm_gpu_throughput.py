"""The transformers and vLLM backends generate on a CUDA GPU (skipped without one). Their speed against the
CPU is measured by `bench/llm_gpu.py`, not asserted here."""

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


def test_transformers_on_gpu_gives_the_cpu_results_for_the_same_prompts(tmp_path):
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
    assert [r.request_id for r in gpu_results] == [r.request_id for r in cpu_results] == [p.request_id for p in PROMPTS]
    # Greedy decoding of the same model: the devices may differ only where float rounding flips a token.
    same = sum(g.completion_tokens == c.completion_tokens for g, c in zip(gpu_results, cpu_results))
    assert same >= 0.9 * len(PROMPTS), f"only {same} of {len(PROMPTS)} completions have the CPU's length on the GPU"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is installed only in the GPU venv")
def test_vllm_generates_on_gpu(tmp_path):
    cfg = make_config(tmp_path, REKI__LLM__BACKEND="vllm", REKI__LLM__SAMPLING__MAX_TOKENS="32")
    from reki_core.llm.backends import make_backend

    backend = make_backend(cfg)
    rate, results = measure_tokens_per_s(backend, PROMPTS)
    print(f"\nvllm smoke LM: {rate:.0f} tok/s")
    assert [r.request_id for r in results] == [p.request_id for p in PROMPTS]
    assert all(r.finish_reason in ("stop", "length") for r in results)
