"""LLM backends behind one interface: `backend.generate(requests) -> results`, same order, one result each.

- `transformers`: Hugging Face causal LM on CPU or GPU, batched with left padding (the embedded default).
- `vllm`: thin adapter over vLLM's offline `LLM.generate`; runs only in the GPU venv (requirements-gpu.txt).
- `openai`: OpenAI-compatible chat-completions servers (the local stack's warm llama.cpp server,
  a `vllm serve` fleet, a hosted API) through the `openai` client: bounded concurrency per shard, requests
  spread over the configured servers, the client's retries (429/5xx, network errors, Retry-After) and timeouts.

A failing request never raises out of `generate`: its result has `finish_reason="error"` and `error` set,
so one bad prompt does not fail its shard. Heavy imports (torch, transformers, vllm, openai) stay inside.
"""

from __future__ import annotations

import logging
import math
import os
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


# ---------------------------------------------------------------- OpenAI-compatible servers


def served_model(client, wanted: str) -> str:
    """The model name to send to the server behind `client`, from its /v1/models: `wanted` (llm.engine.model_id)
    when it is served (`vllm serve --served-model-name`), else the one model a pinned server serves
    (`transformers serve FOLDER` names it by its folder). Raises naming the server and what it serves."""
    url = str(client.base_url)
    try:
        ids = [m.id for m in client.models.list().data]
    except Exception as exc:  # noqa: BLE001 - any failure here means the server cannot be used: say which
        raise RuntimeError(f"LLM server {url} did not list its models (GET /models): {type(exc).__name__}: {exc}") from exc
    if wanted in ids:
        return wanted
    if len(ids) == 1:
        return ids[0]
    raise RuntimeError(f"LLM server {url} serves {ids or 'no model'}, not llm.engine.model_id {wanted!r}")


class OpenAIBackend(Backend):
    """Chat completions against OpenAI-compatible servers (`llama-server`, `transformers serve`, `vllm serve`, a
    hosted API).

    The server applies the model's chat template and batches concurrent requests (from this shard and every
    other one). A shard keeps `engine.max_concurrency` requests in flight, spread round robin over `base_urls`
    (starting at `shard_id`, so shards start on different servers). Retries, backoff, Retry-After and timeouts
    are the maintained `openai` client's (`engine.max_retries`, `engine.timeout_s`).
    """

    name = "openai"

    def __init__(self, engine: "LLMEngineConfig", sampling: "LLMSamplingConfig", base_urls: Sequence[str],
                 shard_id: int = 0):
        super().__init__(engine, sampling)
        import openai

        if not base_urls:
            raise ValueError("llm.backend is 'openai' but no server URL is configured (llm.engine.base_urls)")
        api_key = os.environ.get(engine.api_key_env, "")
        if not api_key and any(not _is_loopback(u) for u in base_urls):
            log.warning("environment variable %s is not set: calling %s without an API key", engine.api_key_env,
                        ", ".join(base_urls))
        # The client insists on a key; a server started without --api-key ignores it.
        self._clients = [openai.OpenAI(base_url=url, api_key=api_key or "no-key", timeout=engine.timeout_s,
                                       max_retries=engine.max_retries) for url in base_urls]
        self.models = [served_model(c, engine.model_id) for c in self._clients]
        self._first = shard_id % len(self._clients)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        n = len(self._clients)
        targets = [(self._first + i) % n for i in range(len(requests))]
        with ThreadPoolExecutor(max_workers=self.engine.max_concurrency) as pool:
            return list(pool.map(self._complete, requests, targets))  # map keeps input order

    def _complete(self, req: GenerationRequest, target: int) -> GenerationResult:
        client = self._clients[target]
        try:
            resp = client.chat.completions.create(
                model=self.models[target], messages=[{"role": "user", "content": req.text}],
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_tokens, seed=self.sampling.seed)
            choice = resp.choices[0]
            text, finish = choice.message.content or "", choice.finish_reason
            usage = resp.usage
        except Exception as exc:  # noqa: BLE001 - after the client's retries: this prompt fails, the shard goes on
            return GenerationResult.failed(req.request_id, _describe_failure(exc, client, self.engine.api_key_env))
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        if finish not in ("stop", "length"):
            return GenerationResult.failed(req.request_id, f"{client.base_url}: finish_reason={finish!r}", prompt_tokens)
        return GenerationResult(req.request_id, text.strip(), finish, prompt_tokens,
                                int(getattr(usage, "completion_tokens", 0) or 0))

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _describe_failure(exc: Exception, client, api_key_env: str) -> str:
    """One line naming the server and what went wrong, after the client's retries (never the key itself)."""
    import openai

    where = str(client.base_url)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return f"{where}: HTTP {exc.status_code}: check the API key in ${api_key_env}"
    if isinstance(exc, openai.APITimeoutError):
        return f"{where}: no answer within llm.engine.timeout_s ({client.timeout}s), retries included"
    if isinstance(exc, openai.APIStatusError):
        return f"{where}: HTTP {exc.status_code}: {str(exc.message)[:200]}"
    if isinstance(exc, openai.APIConnectionError):
        return f"{where}: cannot connect ({exc.__cause__ or exc})"
    # A 200 whose body is not a chat completion (a proxy's HTML page, a broken server): say so.
    return f"{where}: malformed chat-completions response ({type(exc).__name__}: {str(exc)[:200]})"


# ---------------------------------------------------------------- factory


def make_backend(cfg: "Config", shard_id: int = 0) -> Backend:
    """The backend `cfg.llm.backend` names (`shard_id` picks the server an openai shard starts on); creates the
    embedded smoke model first when it is configured."""
    llm = cfg.llm
    model_path = str(cfg.resolve(llm.engine.model_path))
    if llm.backend == "openai":
        return OpenAIBackend(llm.engine, llm.sampling, llm.server_urls(), shard_id)
    if llm.is_smoke_model:
        from reki_core.llm.smoke_model import ensure_smoke_model

        ensure_smoke_model(model_path)
    if llm.backend == "vllm":
        return VLLMBackend(llm.engine, llm.sampling, model_path)
    return TransformersBackend(llm.engine, llm.sampling, model_path)
