"""Shared helpers of the LLM tests: contract-shaped prompt and cluster partitions, a config for tiny runs."""

from __future__ import annotations

import hashlib

import pandas as pd

from reki_core.llm.backends import Backend, GenerationResult
from reki_core.storage.lake import Lake
from tests.conftest import make_config

DAY = "1998-03-01"
NEXT_DAY = "1998-03-02"


def tiny_config(tmp_path, **env):
    """Config for fast runs: the real smoke model, few answer tokens, small batches and shards."""
    settings = {"REKI__LLM__SAMPLING__MAX_TOKENS": "6", "REKI__LLM__ENGINE__BATCH_SIZE": "4",
                "REKI__LLM__SHARD_SIZE": "5"}
    settings.update(env)
    return make_config(tmp_path, **settings)


def prompt_row(kind: str, entity_id: str, text: str, history: str = "", as_of: int = 880000000,
               ask_llm: bool = True) -> dict:
    return {"prompt_id": f"{kind}:{entity_id}", "entity_kind": kind, "entity_id": entity_id, "text": text,
            "history_text": history, "prompt_hash": hashlib.sha256(("t1\n" + text).encode()).hexdigest(),
            "template_version": "t1", "as_of": as_of, "est_tokens": len(text) // 4, "has_knowledge": False,
            "ask_llm": ask_llm}


def individual_prompts(n_users: int, n_items: int, version: str = "") -> list[dict]:
    rows = [prompt_row("user", f"u{i}", f"User u{i} watched movie {i}{version}. Describe the user's preferences.",
                       history=f"User u{i} watched movie {i}{version}.") for i in range(n_users)]
    rows += [prompt_row("item", f"i{i}", f"Describe the movie number {i}{version}.") for i in range(n_items)]
    return rows


def write_prompts(lake: Lake, day: str, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    lake.write_partition(df, "prompts", day)
    return df


class WorkerKilled(BaseException):
    """Stands for a killed worker: not an Exception, so no handler in the runner catches it."""


class ScriptedBackend(Backend):
    """A unit-test seam: answers from a function of the prompt text, records every request it receives."""

    name = "scripted"

    def __init__(self, cfg, answer=lambda text: f"answer to {text}", finish="stop", fail_after_calls=None):
        super().__init__(cfg.llm.engine, cfg.llm.sampling)
        self.answer = answer
        self.finish = finish
        self.fail_after_calls = fail_after_calls
        self.requests: list[str] = []

    def generate(self, requests):
        if self.fail_after_calls is not None and len(self.requests) >= self.fail_after_calls:
            raise WorkerKilled("worker killed")  # like a SIGKILL/OOM: nothing after this point runs
        out = []
        for r in requests:
            self.requests.append(r.request_id)
            text = self.answer(r.text)
            if text is None:
                out.append(GenerationResult.failed(r.request_id, "scripted failure"))
            else:
                out.append(GenerationResult(r.request_id, text, self.finish, len(r.text.split()), len(text.split())))
        return out
