"""Factorization prompting: the wording of the LLM prompts, sanitising untrusted text, prompt hashes, token counts.

The day's prompts (`prompts/dt=D/`, see docs/data_contracts.md) are built by the Spark job `spark_jobs/prompts.py`
from `features/user_history`, `features/items`, `features/clusters` (collective mode) and `raw/users` (profiles); it
calls the pure helpers here (`user_prompt_row`, `item_prompt_row`, `group_prompt_row`) in its Python workers, one
entity at a time. `build_prompts` runs that job for callers outside the DAG.

- User prompt: profile sentence, the knowledge window as `"Title (Year)", N stars;` lines in time
  order, then the preference question along the scenario's user factors. `history_text` is the
  history part alone (the encoder reads history part + answer).
- Item prompt: introduce the item (quoted title and year) along the item factors.
- Group prompts (collective mode): representative titles of an item group, or of what a user group
  liked / disliked, then "describe the common characteristics".

All data (titles, profile fields) is untrusted: it is NFKC-normalised, stripped of control
characters, capped, quoted, and text that tries to act as an instruction is replaced by
`[filtered]`. Wording and factors come from the scenario config (`cfg.scenario.prompts`).

Users whose knowledge need not be regenerated today (`needs_refresh` false) keep the prompt of
their last refresh (carried from the newest earlier `prompts/` partition), so the daily run only
asks the LLM about what changed. Item and group prompts are re-rendered; an unchanged one has
the same hash and is found in the knowledge store (`has_knowledge`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import unicodedata
from typing import Any, Callable

import pandas as pd

from reki_core.config import Config
from reki_core.storage.lake import Lake, as_date, lake_of

DATASET = "prompts"
USER, ITEM = "user", "item"
GROUP_KIND_OF_CLUSTERING = {"item": "item_group", "user_pos": "user_pos_group", "user_neg": "user_neg_group"}
KINDS = (USER, ITEM, *GROUP_KIND_OF_CLUSTERING.values())
COLUMNS = [
    "prompt_id", "entity_kind", "entity_id", "text", "history_text", "prompt_hash", "template_version",
    "as_of", "est_tokens", "has_knowledge", "ask_llm", "is_dirty", "n_titles",
]
# Without a tokenizer, assume 3 characters per token: conservative for titles, names and numbers.
CHARS_PER_TOKEN = 3
# Room for the chat template's role markers around the prompt.
CHAT_OVERHEAD_TOKENS = 16
FILTERED = "[filtered]"

TokenCounter = Callable[[str], int]


class PromptError(ValueError):
    """The inputs of the prompt stage are missing or do not follow the data contract."""


# ---------------------------------------------------------------- untrusted text

# Characters that can break the prompt's layout: controls and line/paragraph separators (become a space).
_SPACE_CATEGORIES = {"Cc", "Zl", "Zp"}
# Invisible ones that can hide text: format chars (soft hyphen, zero-width, bidi), surrogates, private, unassigned.
# Deleted, not spaced: "Ig\u00adnore" must read "Ignore" to the filter, as it does to the LLM.
_DELETE_CATEGORIES = {"Cf", "Cs", "Co", "Cn"}
_QUOTE_CHARS = dict.fromkeys(map(ord, '"\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb\u301d\u301e\uff02'), "'")
_INJECTION_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    # chat special tokens (<|im_start|>, <|endoftext|>) with the role name that follows them
    r"<\|[^|<>]{0,40}\|>(?:\s*(?:system|user|assistant|developer|tool)\b)?",
    r"<\||\|>",  # their leftovers
    r"</?\s*(?:s|system|user|assistant|human|im_start|im_end|inst|sys)\s*>",
    r"\[/?\s*(?:inst|sys)\s*\]",
    r"<<\s*/?\s*sys\s*>>",
    r"`{3,}",  # code fences
    r"#{2,}\s*(?:instructions?|system|response|assistant|user|input)\b",
    r"\b(?:system|assistant|user|human|developer)\s*:",  # role markers
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.;!?]{0,40}?"
    r"\b(?:instructions?|prompts?|rules?|directions?|above|previous|prior|earlier|everything)\b",
    r"\b(?:answer|respond|reply|output)\s+(?:only|just|with only)\b",
    r"\bsystem\s+(?:prompt|message)\b",
    r"\b(?:new|updated) instructions?\b",
    r"\byou are now\b",
)]


def clean_text(value: Any, max_chars: int) -> str:
    """Untrusted text made safe to quote: NFKC, no controls, one line, no instruction-like text, capped."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    text = unicodedata.normalize("NFKC", str(value))
    text = "".join("" if (cat := unicodedata.category(ch)) in _DELETE_CATEGORIES else " " if cat in _SPACE_CATEGORIES
                   else ch for ch in text)
    text = text.translate(_QUOTE_CHARS)
    for _ in range(5):  # a removal can join fragments into a new marker: repeat until stable
        before = text
        for pattern in _INJECTION_PATTERNS:
            text = pattern.sub(FILTERED, text)
        if text == before:
            break
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max(max_chars - 3, 1)].rstrip() + "..."
    return text


def _valid_year(year: Any) -> int | None:
    try:
        value = int(year)
    except (TypeError, ValueError):
        return None
    return value if 1000 <= value <= 2999 else None


def title_with_year(title: Any, year: Any, max_chars: int) -> str:
    """`Title (Year)` (cleaned; no year part when the year is unknown)."""
    name = clean_text(title, max_chars) or "unknown title"
    known_year = _valid_year(year)
    return f"{name} ({known_year})" if known_year else name


def history_entry(title: Any, year: Any, rating: Any, max_chars: int) -> str:
    """One knowledge-history line: `"Title (Year)", N stars;`."""
    return f'"{title_with_year(title, year, max_chars)}", {int(rating)} stars;'


# ---------------------------------------------------------------- profile sentence

_AGE_BUCKETS = [(18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")]
_GENDERS = {"m": "male", "male": "male", "f": "female", "female": "female"}
# MovieLens occupation codes; "other" says nothing, so it is left out.
_OCCUPATIONS = {
    "administrator": "who is an administrator", "artist": "who is an artist", "doctor": "who is a doctor",
    "educator": "who is an educator", "engineer": "who is an engineer",
    "entertainment": "who works in entertainment", "executive": "who is an executive",
    "healthcare": "who works in healthcare", "homemaker": "who is a homemaker", "lawyer": "who is a lawyer",
    "librarian": "who is a librarian", "marketing": "who works in marketing", "none": "who has no occupation",
    "programmer": "who is a programmer", "retired": "who is retired", "salesman": "who is a salesman",
    "scientist": "who is a scientist", "student": "who is a student", "technician": "who is a technician",
    "writer": "who is a writer", "other": "",
}


def age_bucket(age: Any) -> str | None:
    try:
        years = int(age)
    except (TypeError, ValueError):
        return None
    if not 1 <= years <= 120:
        return None
    for upper, label in _AGE_BUCKETS:
        if years < upper:
            return label
    return "56 or older"


def profile_phrase(gender: Any, age: Any, occupation: Any, max_chars: int) -> str:
    """E.g. `a male user aged 25-34 who is a technician`; `a user with no known profile details` when empty."""
    words = ["a"]
    known_gender = _GENDERS.get(clean_text(gender, 10).lower())
    if known_gender:
        words.append(known_gender)
    words.append("user")
    bucket = age_bucket(age)
    if bucket:
        words.append(f"aged {bucket}")
    job = clean_text(occupation, max_chars)
    if job:
        words.append(_OCCUPATIONS.get(job.lower(), f'whose occupation is "{job}"'))
    phrase = " ".join(w for w in words if w)
    return phrase if phrase != "a user" else "a user with no known profile details"


# ---------------------------------------------------------------- rendering


def _format(cfg: Config, template_name: str, factors: list[str], **values: str) -> str:
    scenario = cfg.scenario
    template = getattr(scenario.prompts, template_name)
    fields = {"guard": scenario.prompts.guard, "domain": scenario.domain, "item_noun": scenario.item_noun,
              "factors": ", ".join(factors), **values}
    try:
        text = template.format_map(fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise PromptError(
            f"scenario '{scenario.name}': template prompts.{template_name} is invalid ({exc!r}); "
            f"placeholders available: {sorted(fields)}"
        ) from None
    instruction = scenario.prompts.answer_instruction_by_kind.get(template_name, scenario.prompts.answer_instruction)
    return f"{text} {instruction}" if instruction else text


def render_user(cfg: Config, profile: str, entries: list[str]) -> tuple[str, str]:
    """(prompt text, history_text) of a user prompt from a profile phrase and history lines."""
    history_text = "\n".join(entries)
    text = _format(cfg, "user", cfg.scenario.factors.user, profile=profile, history=history_text)
    return text, history_text


def render_item(cfg: Config, title: Any, year: Any) -> str:
    limit = cfg.scenario.prompts.max_title_chars
    item = f'"{clean_text(title, limit)}"'
    known_year = _valid_year(year)
    if known_year:
        item += f" ({known_year})"
    return _format(cfg, "item", cfg.scenario.factors.item, item=item)


def render_group(cfg: Config, kind: str, titles: list[str]) -> str:
    """A group prompt; `titles` are already `Title (Year)` cleaned strings."""
    factors = cfg.scenario.factors.item if kind == "item_group" else cfg.scenario.factors.user
    quoted = "; ".join(f'"{t}"' for t in titles)
    return _format(cfg, kind, factors, titles=quoted)


def prompt_hash(template_version: str, text: str) -> str:
    return hashlib.sha256(f"{template_version}\n{text}".encode("utf-8")).hexdigest()


def token_budget(cfg: Config) -> int:
    """Prompt tokens the LLM can take: its context minus the answer's room."""
    return cfg.llm.engine.max_model_len - cfg.llm.sampling.max_tokens


def make_token_counter(cfg: Config) -> TokenCounter:
    """Exact counts with the configured model's `tokenizer.json` when present, else chars / CHARS_PER_TOKEN."""
    tokenizer_file = cfg.resolve(cfg.llm.engine.model_path) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids) + CHAT_OVERHEAD_TOKENS
    return lambda text: math.ceil(len(text) / CHARS_PER_TOKEN) + CHAT_OVERHEAD_TOKENS


def resolve_mode(cfg: Config, n_users: int, n_items: int) -> str:
    """`individual` or `collective` (`auto`: collective above `auto_collective_above` users + items)."""
    mode = cfg.scenario.extraction_mode
    if mode == "auto":
        return "collective" if n_users + n_items > cfg.scenario.auto_collective_above else "individual"
    return mode


def groups_needed(cfg: Config, lake: Lake, day: dt.date) -> bool:
    """Whether day D's extraction is collective, so the clusters job must run (from the feature jobs' counts).

    When it is not, the day's `features_clusters` step is recorded as skipped and any groups partition an
    earlier run of D left in another mode is removed (`skip_groups`, as the clusters job itself does).
    """
    from reki_core.runlog import read_steps, record_step

    steps = {s["step"]: s for s in read_steps(lake, day)}
    missing = [s for s in ("features_items", "features_user_history") if s not in steps]
    if missing:
        raise PromptError(f"_runs/dt={as_date(day)}: no run record of {missing}: run the feature jobs first")
    mode = resolve_mode(cfg, int(steps["features_user_history"]["users"]), int(steps["features_items"]["items"]))
    if mode == "collective":
        return True
    record_step(lake, day, "features_clusters", {**skip_groups(lake, day, mode), "success": True})
    return False


def skip_groups(lake: Lake, day: dt.date, mode: str) -> dict:
    """No groups for day D in `mode`: removes any groups partition an earlier run of D left; returns the step record."""
    lake.delete_partition("features/clusters", day)
    return {"skipped": True, "mode": mode, "reason": "individual extraction needs no groups"}


# ---------------------------------------------------------------- building


# The columns each input must have (a missing one is named with its dataset and day).
REQUIRED_COLUMNS = {
    "features/user_history": ["user_id", "window", "as_of", "needs_refresh"],
    "features/items": ["item_id", "title", "year", "popularity"],
    "features/clusters": ["clustering", "entity_id", "group_id"],
}


def _entries(value: Any) -> list[dict]:
    """A list<struct> cell as a list of dicts (parquet gives numpy arrays; None means empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [dict(e) for e in value]


def _fit(render: Callable[[list[str]], str], parts: list[str], count_tokens: TokenCounter, budget: int,
         drop_first: bool) -> tuple[str, list[str], int]:
    """Render, dropping parts (oldest history lines or least popular titles) until the prompt fits the budget."""
    parts = list(parts)
    text = render(parts)
    tokens = count_tokens(text)
    while tokens > budget and len(parts) > 1:
        parts = parts[1:] if drop_first else parts[:-1]
        text = render(parts)
        tokens = count_tokens(text)
    return text, parts, tokens


# ---------------------------------------------------------------- one prompt (called in the Spark job's Python workers)

_COUNTERS: dict[tuple[str, bool], TokenCounter] = {}


def worker_token_counter(cfg: Config) -> TokenCounter:
    """`make_token_counter(cfg)`, built once per Python process: a Spark worker loads the tokenizer file once, from
    its own host's model folder (a per-host set-up artefact)."""
    tokenizer_file = cfg.resolve(cfg.llm.engine.model_path) / "tokenizer.json"
    key = (str(tokenizer_file), tokenizer_file.is_file())
    if key not in _COUNTERS:
        _COUNTERS[key] = make_token_counter(cfg)
    return _COUNTERS[key]


def prompt_row(version: str, kind: str, entity_id: str, text: str, history_text: str | None, as_of: Any,
               tokens: int, dirty: bool, n_titles: Any, ask: bool) -> dict[str, Any]:
    """One row of `prompts` (every column but `has_knowledge`, which the store decides)."""
    return {"prompt_id": f"{kind}:{entity_id}", "entity_kind": kind, "entity_id": entity_id, "text": text,
            "history_text": history_text, "prompt_hash": prompt_hash(version, text), "template_version": version,
            "as_of": int(as_of), "est_tokens": int(tokens), "is_dirty": bool(dirty), "n_titles": int(n_titles),
            "ask_llm": bool(ask)}


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def user_prompt_row(cfg: Config, count_tokens: TokenCounter, user_id: str, window: Any, as_of: Any,
                    needs_refresh: Any, profile: tuple, carried: dict | None, individual: bool) -> dict | None:
    """A user's prompt row: the carried one (`carried`: text, history_text, as_of, n_titles of the user's prompt in the
    previous partition, same template version) when the user needs no refresh, its window has not moved since and it
    fits the budget; else rendered from `window` (entries with item_id, ts, rating, title, year), oldest lines dropped
    until it fits. None for a user with nothing to reason about yet (an empty window and nothing carried)."""
    version, budget = cfg.scenario.template_version, token_budget(cfg)
    carried_tokens = count_tokens(carried["text"]) if carried is not None and not needs_refresh else 0
    # A prompt is carried only for the window it was made from (a window that advanced on a day whose prompts never
    # ran, a failed run, is rendered now, not lost) and while it fits the budget (after a change of model or of
    # max_model_len it is fitted again).
    stale = carried is not None and (int(carried["as_of"]) != int(as_of) or carried_tokens > budget)
    if not needs_refresh and carried is not None and not stale:
        n_titles = carried.get("n_titles", 0)
        return prompt_row(version, USER, user_id, carried["text"], carried["history_text"], carried["as_of"],
                          carried_tokens, False, 0 if _missing(n_titles) else n_titles, individual)
    entries = sorted(_entries(window), key=lambda e: (int(e["ts"]), str(e["item_id"])))
    if not entries:
        return None
    title_limit = cfg.scenario.prompts.max_title_chars
    lines = [history_entry(e.get("title"), e.get("year"), e["rating"], title_limit) for e in entries]
    profile_text = profile_phrase(*profile, cfg.scenario.prompts.max_field_chars)
    text, shown, tokens = _fit(lambda p: render_user(cfg, profile_text, p)[0], lines, count_tokens, budget, True)
    return prompt_row(version, USER, user_id, text, "\n".join(shown), as_of, tokens, bool(needs_refresh) or stale,
                      len(shown), individual)


def item_display(cfg: Config, title: Any, year: Any) -> str | None:
    """The `Title (Year)` a group prompt shows of an item; None for an item without a title (no prompt of its own)."""
    limit = cfg.scenario.prompts.max_title_chars
    return title_with_year(title, year, limit) if clean_text(title, limit) else None


def item_prompt_row(cfg: Config, count_tokens: TokenCounter, item_id: str, title: Any, year: Any, dirty: bool,
                    individual: bool) -> dict | None:
    """An item's prompt row (factual knowledge depends on no interaction: as_of 0); None for an untitled item."""
    if not clean_text(title, cfg.scenario.prompts.max_title_chars):
        return None  # an item without a title gives the LLM nothing to describe
    text = render_item(cfg, title, year)
    return prompt_row(cfg.scenario.template_version, ITEM, item_id, text, None, 0, count_tokens(text), dirty, 1,
                      individual)


def group_prompt_row(cfg: Config, count_tokens: TokenCounter, kind: str, group_id: str, titles: list[str],
                     as_of: Any) -> dict:
    """A group's prompt row from its representative titles (best first; the last ones dropped until it fits)."""
    text, shown, tokens = _fit(lambda t: render_group(cfg, kind, t), list(titles), count_tokens, token_budget(cfg),
                               False)
    return prompt_row(cfg.scenario.template_version, kind, group_id, text, None, as_of, tokens, True, len(shown), True)


def build_prompts(cfg: Config, dt: str | dt.date, lake: Lake | None = None, spark=None) -> dict[str, Any]:
    """Write `prompts/dt=D/` with the Spark job `spark_jobs/prompts.py` (the DAG runs it as the Spark Connect task
    `prompts`), for callers outside the DAG (the in-process pipeline driver, the benchmarks): on `spark`, else the
    active session, else a classic session of its own, stopped after. Records step `prompts` and returns its payload."""
    from reki_core.spark import get_spark
    from spark_jobs.common import jobs_named, run_jobs

    own = None
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        if spark is None:
            spark = own = get_spark(cfg, "reki-prompts")
    try:
        [payload] = run_jobs(spark, jobs_named(["prompts"]), cfg, lake or lake_of(cfg), as_date(dt)).values()
    finally:
        if own is not None:
            own.stop()
    return payload
