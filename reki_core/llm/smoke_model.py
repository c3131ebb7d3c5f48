"""The embedded default LLM: a tiny GPT-2-style causal LM built locally, with no download.

`ensure_smoke_model(path)` trains a byte-level BPE tokenizer on a fixed built-in corpus and
initialises a 2-layer GPT-2 from a fixed seed, then `save_pretrained`s both (plus a README model
card) into `path`. The same code always gives the same folder. Its weights are random: the text it
writes is meaningless. It exists so the pipeline runs end to end on a CPU; real knowledge needs a
real instruct model (see the README written into the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

SMOKE_MODEL_VERSION = "smoke-lm-v1"
# The environment that runs the pipeline on this model in-process (plumbing tests, the scale benchmark): no LLM
# server, and answer gates that only warn, since its text is meaningless and it never stops on its own.
SMOKE_LLM_ENV = {
    "REKI__LLM__BACKEND": "transformers",
    "REKI__LLM__IS_SMOKE_MODEL": "true",
    "REKI__LLM__ENGINE__MODEL_PATH": ".reki/models/smoke-lm",
    "REKI__LLM__ENGINE__MODEL_ID": "reki-smoke-lm",
    "REKI__LLM__ENGINE__MAX_MODEL_LEN": "1024",
    "REKI__LLM__ENGINE__BATCH_SIZE": "64",
    "REKI__LLM__SERVER__ENABLED": "false",
    "REKI__QUALITY__LLM_SEMANTIC_ACTION": "warn",
    "REKI__QUALITY__LLM_MAX_TRUNCATED_SHARE": "1.0",
    "REKI__QUALITY__LLM_MIN_ANSWER_CHARS": "1",
}
_COMPLETE_MARKER = "REKI_SMOKE_MODEL.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")

# A ChatML-style template so the chat-template path of the backends is exercised by the smoke model too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

_CORPUS_WORDS = (
    "the a an of and to in is was for on with as by at from that this it his her their they user users item items "
    "movie movies book books film films genre genres director directors actor actors cast author authors time period "
    "country character characters plot theme themes mood tone critical acclaim award awards production quality "
    "soundtrack writing style setting length complexity literary preference preferences likes dislikes enjoys "
    "watched read rated rating ratings stars history recommend recommendation describe common characteristics "
    "given set consisting following analyze analysis reason reasons including but not limited age gender occupation "
    "male female student engineer artist writer programmer educator doctor lawyer retired other comedy drama action "
    "thriller romance horror adventure animation children documentary fantasy mystery science fiction war western "
    "crime musical noir classic modern independent popular story stories strong weak dark light funny serious "
    "emotional visual music score acting performance narrative pacing dialogue ending beginning series sequel "
    "one two three four five year years old new good great bad best worst very more most less "
    "0 1 2 3 4 5 6 7 8 9 ( ) , . : ; ' \" - ? ! / &"
).split()

_README = """# REKI smoke LM (`{version}`)

**This model writes meaningless text.** It is a tiny GPT-2-style causal language model
({n_layer} layers, {n_embd}-d, vocabulary of {vocab_size} byte-level BPE tokens) whose weights are
random (seed {seed}). It was created locally by `reki_core.llm.smoke_model.ensure_smoke_model`, with
no download, so that the REKI pipeline runs end to end on a CPU machine. Every summary the
extraction runner returns carries `is_smoke_model: true` while this model is configured.

Knowledge extracted with it has no value for a recommender. To extract real knowledge, point the
pipeline at a real instruct model, for example with vLLM on a GPU:

```yaml
llm:
  backend: vllm                # or `openai` against `vllm serve` / a hosted endpoint
  is_smoke_model: false
  engine:
    model_path: /models/Qwen2.5-7B-Instruct
    model_id: qwen2.5-7b-instruct
    python: /opt/reki-gpu/bin/python   # venv built from requirements-gpu.txt
    tensor_parallel_size: 1
    max_model_len: 4096
  sampling:
    max_tokens: 512
quality:
  llm_semantic_action: fail
  llm_max_truncated_share: 0.2
```
"""


def _is_complete(path: Path) -> bool:
    marker = path / _COMPLETE_MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text()).get("version") == SMOKE_MODEL_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def _corpus() -> list[str]:
    # Deterministic sentences over the fixed vocabulary; BPE training on the same input gives the same merges.
    words = _CORPUS_WORDS
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 7)]
    lines += [f"{a} {b}" for a in words[:60] for b in words[60:120]]
    return lines


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
        padding_side="left",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def ensure_smoke_model(path: str | Path, seed: int = 0) -> Path:
    """Create the smoke model folder at `path` unless a complete one is there; returns the path."""
    path = Path(path)
    if _is_complete(path):
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _build_tokenizer()
    n_layer, n_embd = 2, 64
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    # Random weights would often emit pad/chat markers, which decode to empty answers.
    # and loop on one token (a blank line): suppress the markers and forbid repeats so the text varies.
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, *tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])]
    model.generation_config.no_repeat_ngram_size = 1

    # Build aside and rename, so a killed set-up never leaves a half folder that looks complete.
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(
            _README.format(version=SMOKE_MODEL_VERSION, n_layer=n_layer, n_embd=n_embd,
                           vocab_size=len(tokenizer), seed=seed)
        )
        weights_sha = hashlib.sha256((staging / "model.safetensors").read_bytes()).hexdigest()
        (staging / _COMPLETE_MARKER).write_text(json.dumps(
            {"version": SMOKE_MODEL_VERSION, "seed": seed, "is_smoke_model": True,
             "meaningless_output": True, "weights_sha256": weights_sha}, indent=2))
        if path.exists():
            shutil.rmtree(path)  # an incomplete folder from an earlier, killed set-up
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def is_smoke_model_folder(path: str | Path) -> bool:
    """True when `path` holds the embedded smoke model (its outputs are meaningless)."""
    return (Path(path) / _COMPLETE_MARKER).is_file()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Create the embedded smoke LM folder (no download).")
    parser.add_argument("--path", default=None, help="target folder (default: cfg.llm.engine.model_path)")
    args = parser.parse_args()
    if args.path is None:
        from reki_core.config import load_config

        cfg = load_config()
        args.path = cfg.resolve(cfg.llm.engine.model_path)
    print(ensure_smoke_model(args.path))


if __name__ == "__main__":
    main()
