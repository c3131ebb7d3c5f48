"""LLM backends behind one interface: `backend.generate(requests) -> results`, same order, one result each.

- `transformers`: Hugging Face causal LM on CPU or GPU, batched with left padding (the embedded default).
- `vllm`: thin adapter over vLLM's offline `LLM.generate`; runs only in the GPU venv (requirements-gpu.txt).
- `openai`: any OpenAI-compatible chat-completions endpoint (`vllm serve`, a hosted API), bounded
  concurrency, retries with exponential backoff on 429/5xx and network errors, timeouts.

A failing request never raises out of `generate`: its result has `finish_reason="error"` and `error` set,
so one bad prompt does not fail its shard. Heavy imports (torch, transformers, vllm, httpx) stay inside.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from reki_core.config import Config, LLMEngineConfig, LLMSamplingConfig

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "error")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # the prompt_hash: stable across runs
    text: str


@dataclass
class GenerationResult:
    request_id: str
    text: str
    finish_reason: str  # stop | length | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, request_id: str, error: str, prompt_tokens: int = 0) -> "GenerationResult":
        return cls(request_id, "", "error", prompt_tokens, 0, error)


def measure_tokens_per_s(backend: "Backend", requests: Sequence[GenerationRequest]) -> tuple[float, list[GenerationResult]]:
    """Completion tokens per second of one `generate` over `requests`, and its results. It warms up on the
    same requests first: CUDA loads kernels lazily, per shape, so a warm-up on other shapes would leave
    that load inside the timed call."""
    cuda = str(getattr(backend, "device", "")).startswith("cuda")
    backend.generate(requests)
    if cuda:
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    results = backend.generate(requests)
    if cuda:
        torch.cuda.synchronize()
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - start), results


class Backend(ABC):
    """One LLM engine. `generate` keeps the order of `requests` and never raises for a single bad request."""

    name: str = ""

    def __init__(self, engine: "LLMEngineConfig", sampling: "LLMSamplingConfig"):
        self.engine = engine
        self.sampling = sampling

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    @staticmethod
    def isolating_failures(run_batch, chunk: list[GenerationRequest]) -> list[GenerationResult]:
        """`run_batch(chunk)`; when it raises, each request alone, so a bad prompt fails only itself."""
        try:
            return run_batch(chunk)
        except Exception as exc:  # noqa: BLE001 - isolate the bad prompt: retry the batch one by one
            log.warning("batch of %d failed (%s); retrying one prompt at a time", len(chunk), exc)
        results = []
        for req in chunk:
            try:
                results.extend(run_batch([req]))
            except Exception as one_exc:  # noqa: BLE001
                results.append(GenerationResult.failed(req.request_id, f"{type(one_exc).__name__}: {one_exc}"))
        return results

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt (chat template included) that leaves room for `max_tokens` of answer."""
        return self.engine.max_model_len - self.sampling.max_tokens

    def count_prompt_tokens(self, texts: Sequence[str]) -> list[int]:
        # Without a tokenizer (remote endpoint) a conservative 4-characters-per-token estimate.
        return [math.ceil(len(t) / 4) + 8 for t in texts]

    def truncate_prompt(self, text: str, max_tokens: int) -> str:
        return _keep_head_and_tail(text, max(0, (max_tokens - 8) * 4 - len(_ELLIPSIS)))

    def close(self) -> None:
        """Free the engine (GPU memory); the backend is unusable afterwards."""


_ELLIPSIS = "\n...\n"


def _keep_head_and_tail(text: str, max_chars: int) -> str:
    # Prompts end with the instruction: keep the start and the end, cut the middle of the history.
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return text[:head] + _ELLIPSIS + (text[-tail:] if tail else "")


class _TokenizerPrompts:
    """Chat-template rendering, token counting and truncation for backends that hold a HF tokenizer."""

    _tokenizer: Any

    def render(self, text: str) -> str:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    def count_prompt_tokens(self, texts: Sequence[str]) -> list[int]:
        rendered = [self.render(t) for t in texts]
        return [len(ids) for ids in self._tokenizer(rendered, add_special_tokens=False)["input_ids"]]

    def truncate_prompt(self, text: str, max_tokens: int) -> str:
        overhead = self.count_prompt_tokens([""])[0] + len(self._tokenizer(_ELLIPSIS, add_special_tokens=False)["input_ids"])
        budget = max(0, max_tokens - overhead)
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + overhead <= max_tokens:
            return text
        head = budget // 2
        tail = budget - head
        decode = self._tokenizer.decode
        truncated = decode(ids[:head]) + _ELLIPSIS + (decode(ids[-tail:]) if tail else "")
        # Re-tokenising decoded text can merge differently; shave until it fits.
        while self.count_prompt_tokens([truncated])[0] > max_tokens and tail > 0:
            tail -= 1
            truncated = decode(ids[:head]) + _ELLIPSIS + (decode(ids[-tail:]) if tail else "")
        return truncated


# ---------------------------------------------------------------- transformers


class TransformersBackend(_TokenizerPrompts, Backend):
    """Hugging Face generation, batched with left padding at temperature 0 (greedy); above it, seeded sampling
    one prompt at a time, so each prompt's answer is reproducible whatever else the shard holds."""

    name = "transformers"

    def __init__(self, engine: "LLMEngineConfig", sampling: "LLMSamplingConfig", model_path: str):
        super().__init__(engine, sampling)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = engine.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"llm.engine.device is '{engine.device}' but CUDA is not available on this machine")
        self.device = device
        self._tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self._eos_ids = self._eos_token_ids()

    def _eos_token_ids(self) -> set[int]:
        ids = self._model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        # Sampling draws from one generator for the whole batch, so a prompt's sample would depend on its batch
        # neighbours (a resumed shard batches differently): sampled prompts run one by one, each seeded, as
        # vLLM seeds each request. Greedy decoding (the default) does not depend on them and is batched.
        size = 1 if self.sampling.temperature > 0 else max(1, self.engine.batch_size)
        for start in range(0, len(requests), size):
            results.extend(self.isolating_failures(self._generate_batch, list(requests[start : start + size])))
        return results

    def _generate_batch(self, chunk: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        rendered = [self.render(r.text) for r in chunk]
        enc = self._tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.sampling.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": self.sampling.max_tokens, "do_sample": sample,
                                  "pad_token_id": self._tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=self.sampling.temperature, top_p=self.sampling.top_p)
            torch.manual_seed(self.sampling.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self._model.generate(**enc, **kwargs)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for req, n_prompt, ids in zip(chunk, prompt_lens, new_tokens):
            stop_at = next((i for i, t in enumerate(ids) if t in self._eos_ids), None)
            kept = ids if stop_at is None else ids[:stop_at]
            text = self._tokenizer.decode(kept, skip_special_tokens=True).strip()
            finish = "stop" if stop_at is not None else "length"
            n_completion = len(kept) + (1 if stop_at is not None else 0)  # the EOS token is generated too
            results.append(GenerationResult(req.request_id, text, finish, int(n_prompt), n_completion))
        return results

    def close(self) -> None:
        import torch

        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- vLLM


def vllm_engine_kwargs(engine: "LLMEngineConfig", sampling: "LLMSamplingConfig", model_path: str) -> dict[str, Any]:
    """Arguments of `vllm.LLM(...)`, from the engine config group."""
    return {
        "model": model_path,
        "served_model_name": engine.model_id,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "seed": sampling.seed,
        "trust_remote_code": False,
    }


def vllm_sampling_kwargs(sampling: "LLMSamplingConfig") -> dict[str, Any]:
    """Arguments of `vllm.SamplingParams(...)`, from the sampling config group."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
    }


class VLLMBackend(_TokenizerPrompts, Backend):
    """Offline batch generation with vLLM: one engine per process, the whole request list in one call."""

    name = "vllm"

    def __init__(self, engine: "LLMEngineConfig", sampling: "LLMSamplingConfig", model_path: str):
        super().__init__(engine, sampling)
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "llm.backend is 'vllm' but vllm is not importable in this interpreter; run the shard with the "
                "GPU venv built from requirements-gpu.txt (set llm.engine.python)"
            ) from exc
        self._llm = vllm.LLM(**vllm_engine_kwargs(engine, sampling, model_path))
        self._params = vllm.SamplingParams(**vllm_sampling_kwargs(sampling))
        self._tokenizer = self._llm.get_tokenizer()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        # vLLM schedules the whole list itself (continuous batching); a raising call is retried per prompt.
        return self.isolating_failures(self._generate_all, list(requests)) if requests else []

    def _generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        prompts = [self.render(r.text) for r in requests]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=True)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} prompts")
        results = []
        for req, out in zip(requests, outputs):
            n_prompt = len(out.prompt_token_ids or [])
            if not out.outputs:
                results.append(GenerationResult.failed(req.request_id, "vllm returned no completion", n_prompt))
                continue
            completion = out.outputs[0]
            finish = completion.finish_reason if completion.finish_reason in ("stop", "length") else "error"
            error = None if finish != "error" else f"vllm finish_reason={completion.finish_reason!r}"
            results.append(GenerationResult(req.request_id, completion.text.strip() if finish != "error" else "",
                                            finish, n_prompt, len(completion.token_ids), error))
        return results

    def close(self) -> None:
        self._llm = None


# ---------------------------------------------------------------- OpenAI-compatible endpoint


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend(Backend):
    """Chat completions against `engine.base_url` (ending in /v1), `max_concurrency` requests in flight."""

    name = "openai"

    def __init__(self, engine: "LLMEngineConfig", sampling: "LLMSamplingConfig"):
        super().__init__(engine, sampling)
        import httpx

        if not engine.base_url:
            raise ValueError("llm.backend is 'openai' but llm.engine.base_url is empty (e.g. http://host:8000/v1)")
        self.url = engine.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(engine.api_key_env, "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            log.warning("environment variable %s is not set: calling %s without an API key", engine.api_key_env, self.url)
        limits = httpx.Limits(max_connections=engine.max_concurrency, max_keepalive_connections=engine.max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=engine.timeout_s, limits=limits)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.engine.max_concurrency)) as pool:
            return list(pool.map(self._complete_with_retries, requests))  # map keeps input order

    def _payload(self, text: str) -> dict[str, Any]:
        return {
            "model": self.engine.model_id,
            "messages": [{"role": "user", "content": text}],
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "max_tokens": self.sampling.max_tokens,
            "seed": self.sampling.seed,
        }

    def _complete_with_retries(self, req: GenerationRequest) -> GenerationResult:
        attempts = self.engine.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            try:
                return self._complete_once(req)
            except _RetryableError as exc:
                last_error = str(exc)
                if attempt + 1 == attempts:
                    break
                # Exponential backoff with jitter; a server's Retry-After wins when it asks for longer.
                delay = min(self.engine.retry_backoff_max_s, self.engine.retry_backoff_s * 2**attempt)
                delay = max(delay * (0.5 + random.random() / 2), exc.retry_after or 0.0)
                log.info("%s: %s; retry %d/%d in %.2fs", req.request_id[:12], exc, attempt + 1, attempts - 1, delay)
                time.sleep(delay)
            except Exception as exc:  # noqa: BLE001 - not retryable (4xx, bad response): record and go on
                return GenerationResult.failed(req.request_id, str(exc))
        return GenerationResult.failed(req.request_id, f"gave up after {attempts} attempts: {last_error}")

    def _complete_once(self, req: GenerationRequest) -> GenerationResult:
        import httpx

        try:
            resp = self._client.post(self.url, json=self._payload(req.text))
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise _RetryableError(f"{type(exc).__name__} calling {self.url}: {exc}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            retry_after = resp.headers.get("Retry-After")
            raise _RetryableError(f"HTTP {resp.status_code} from {self.url}: {resp.text[:200]}",
                                  float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None)
        if resp.status_code in (401, 403):
            raise RuntimeError(f"HTTP {resp.status_code} from {self.url}: check the API key in ${self.engine.api_key_env}")
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code} from {self.url}: {resp.text[:200]}")
        body = resp.json()
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] or ""
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"malformed chat-completions response from {self.url}: {str(body)[:200]}") from exc
        usage = body.get("usage") or {}
        if finish not in ("stop", "length"):
            return GenerationResult.failed(req.request_id, f"finish_reason={finish!r}", int(usage.get("prompt_tokens", 0)))
        return GenerationResult(req.request_id, text.strip(), finish, int(usage.get("prompt_tokens", 0)),
                                int(usage.get("completion_tokens", 0)))

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------- factory


def make_backend(cfg: "Config") -> Backend:
    """The backend `cfg.llm.backend` names; creates the embedded smoke model first when it is configured."""
    llm = cfg.llm
    model_path = str(cfg.resolve(llm.engine.model_path))
    if llm.backend == "openai":
        return OpenAIBackend(llm.engine, llm.sampling)
    if llm.is_smoke_model:
        from reki_core.llm.smoke_model import ensure_smoke_model

        ensure_smoke_model(model_path)
    if llm.backend == "vllm":
        return VLLMBackend(llm.engine, llm.sampling, model_path)
    return TransformersBackend(llm.engine, llm.sampling, model_path)
