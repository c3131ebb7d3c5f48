"""Factorization prompting: the LLM prompts of a day, built from the feature partitions.

Reads `features/user_history`, `features/items`, `features/clusters` (collective mode) and
`raw/users` (profiles) for `dt`, writes `prompts/dt=D/` (see docs/data_contracts.md).

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
from dataclasses import dataclass
from typing import Any, Callable, Iterable

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
    return f"{text} {scenario.prompts.answer_instruction}" if scenario.prompts.answer_instruction else text


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


# ---------------------------------------------------------------- inputs


@dataclass
class PromptInputs:
    """The frames one day's prompts are built from (columns per docs/data_contracts.md)."""

    user_history: pd.DataFrame  # user_id, n_interactions, history, window, as_of, needs_refresh
    items: pd.DataFrame  # item_id, title, year, genres, first_genre, popularity, metadata_hash
    users: pd.DataFrame | None = None  # raw/users snapshot: user_id, age, gender, occupation
    clusters: pd.DataFrame | None = None  # clustering, entity_id, group_id
    previous_items: pd.DataFrame | None = None  # features/items of the previous day (dirty items)
    previous_prompts: pd.DataFrame | None = None  # prompts of the previous day (carried user prompts)


_REQUIRED = {
    "features/user_history": ("user_history", ["user_id", "window", "as_of", "needs_refresh"]),
    "features/items": ("items", ["item_id", "title", "year", "popularity"]),
    "features/clusters": ("clusters", ["clustering", "entity_id", "group_id"]),
}


def _check_columns(inputs: PromptInputs, dt_label: str) -> None:
    for dataset, (attr, columns) in _REQUIRED.items():
        frame = getattr(inputs, attr)
        if frame is None:
            continue
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise PromptError(f"{dataset}/dt={dt_label}: missing column(s) {missing} (see docs/data_contracts.md)")


def _entries(value: Any) -> list[dict]:
    """A list<struct> cell as a list of dicts (parquet gives numpy arrays; None means empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [dict(e) for e in value]


def dirty_item_ids(inputs: PromptInputs) -> set[str]:
    """Items that are new or whose metadata changed since the previous features/items partition."""
    items = inputs.items
    if "needs_refresh" in items.columns:
        return set(items.loc[items["needs_refresh"].astype(bool), "item_id"].astype(str))
    previous = inputs.previous_items
    if previous is None or "metadata_hash" not in items.columns or "metadata_hash" not in previous.columns:
        return set(items["item_id"].astype(str))
    # A null hash compares as "" (NaN never equals itself).
    before = dict(zip(previous["item_id"].astype(str), previous["metadata_hash"].fillna("").astype(str)))
    now = zip(items["item_id"].astype(str), items["metadata_hash"].fillna("").astype(str))
    return {i for i, h in now if before.get(i) != h}


def group_titles(cfg: Config, inputs: PromptInputs) -> dict[tuple[str, str], tuple[list[str], int]]:
    """(group kind, group id) -> (representative `Title (Year)` strings, as_of) for every group with evidence.

    Item groups: members by popularity. User groups: the items the members liked (rating above the
    threshold) or disliked in their knowledge windows, most frequent first; as_of is the newest of
    those interactions, so the point-in-time join never gives a group text to an earlier sample.
    """
    if inputs.clusters is None:
        return {}
    scenario = cfg.scenario
    limit = scenario.prompts.max_title_chars
    items = inputs.items.assign(item_id=inputs.items["item_id"].astype(str))
    popularity = dict(zip(items["item_id"], items["popularity"].fillna(0).astype("int64")))
    display = {i: title_with_year(t, y, limit) for i, t, y in zip(items["item_id"], items["title"], items["year"])
               if clean_text(t, limit)}
    windows = dict(zip(inputs.user_history["user_id"].astype(str), inputs.user_history["window"]))
    out: dict[tuple[str, str], tuple[list[str], int]] = {}
    clusters = inputs.clusters.assign(entity_id=inputs.clusters["entity_id"].astype(str),
                                      group_id=inputs.clusters["group_id"].astype(str))
    for (clustering, group_id), members in clusters.groupby(["clustering", "group_id"], sort=True):
        kind = GROUP_KIND_OF_CLUSTERING.get(clustering)
        if kind is None:
            raise PromptError(f"features/clusters: unknown clustering {clustering!r} (expected {list(GROUP_KIND_OF_CLUSTERING)})")
        if kind == "item_group":
            ranked = sorted((m for m in members["entity_id"] if m in display), key=lambda i: (-popularity.get(i, 0), i))
            as_of = 0
        else:
            liked = kind == "user_pos_group"
            counts: dict[str, int] = {}
            as_of = 0
            for user_id in members["entity_id"]:
                for e in _entries(windows.get(user_id)):
                    item_id = str(e["item_id"])
                    if (int(e["rating"]) > scenario.positive_rating_threshold) == liked and item_id in display:
                        counts[item_id] = counts.get(item_id, 0) + 1
                        as_of = max(as_of, int(e["ts"]))
            ranked = sorted(counts, key=lambda i: (-counts[i], -popularity.get(i, 0), i))
        if ranked:
            out[(kind, group_id)] = ([display[i] for i in ranked[: scenario.group_representatives]], as_of)
    return out


def expected_prompt_keys(cfg: Config, inputs: PromptInputs, mode: str) -> dict[str, set[str]]:
    """entity kind -> ids that must have a prompt today: dirty users and items, and (collective) groups in use."""
    history = inputs.user_history
    has_window = history["window"].map(lambda w: len(_entries(w)) > 0)
    users = set(history.loc[history["needs_refresh"].astype(bool) & has_window, "user_id"].astype(str))
    limit = cfg.scenario.prompts.max_title_chars
    titled = {i for i, t in zip(inputs.items["item_id"].astype(str), inputs.items["title"]) if clean_text(t, limit)}
    expected = {USER: users, ITEM: dirty_item_ids(inputs) & titled}
    if mode == "collective":
        for kind in GROUP_KIND_OF_CLUSTERING.values():
            expected[kind] = set()
        for kind, group_id in group_titles(cfg, inputs):
            expected[kind].add(group_id)
    return expected


# ---------------------------------------------------------------- building


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


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="prompt", mininterval=2.0, disable=None)


def render_prompts(
    cfg: Config,
    inputs: PromptInputs,
    mode: str,
    count_tokens: TokenCounter,
    known_hashes: set[str] = frozenset(),
) -> pd.DataFrame:
    """The prompts frame of one day (columns `COLUMNS`, sorted by kind and id)."""
    scenario = cfg.scenario
    version = scenario.template_version
    budget = token_budget(cfg)
    field_limit, title_limit = scenario.prompts.max_field_chars, scenario.prompts.max_title_chars
    individual = mode == "individual"
    rows: list[dict[str, Any]] = []

    def add(kind: str, entity_id: str, text: str, history_text: str | None, as_of: int, tokens: int,
            dirty: bool, n_titles: int, ask: bool) -> None:
        rows.append({
            "prompt_id": f"{kind}:{entity_id}", "entity_kind": kind, "entity_id": entity_id, "text": text,
            "history_text": history_text, "prompt_hash": prompt_hash(version, text), "template_version": version,
            "as_of": int(as_of), "est_tokens": int(tokens), "is_dirty": dirty, "n_titles": int(n_titles),
            "ask_llm": ask,
        })

    # Users: dirty ones (and ones without an earlier prompt) are rendered, the rest keep their last prompt.
    items = inputs.items.assign(item_id=inputs.items["item_id"].astype(str))
    meta = dict(zip(items["item_id"], zip(items["title"], items["year"])))
    profiles: dict[str, tuple] = {}
    if inputs.users is not None and len(inputs.users):
        u = inputs.users
        cols = [u[c] if c in u.columns else pd.Series([None] * len(u)) for c in ("gender", "age", "occupation")]
        profiles = dict(zip(u["user_id"].astype(str), zip(*cols)))
    carried: dict[str, dict] = {}
    prev = inputs.previous_prompts
    if prev is not None and len(prev):
        prev_users = prev[(prev["entity_kind"] == USER) & (prev["template_version"] == version)]
        carried = {str(r["entity_id"]): r for r in prev_users.to_dict("records")}
    history = inputs.user_history
    for user_id, window, as_of, needs_refresh in _progress(
        zip(history["user_id"].astype(str), history["window"], history["as_of"], history["needs_refresh"]),
        len(history), "user prompts",
    ):
        r = carried.get(user_id)
        carried_tokens = count_tokens(r["text"]) if r is not None and not needs_refresh else 0
        # A prompt is carried only for the window it was made from (a window that advanced on a day whose
        # prompts never ran, a failed run, is rendered now, not lost) and while it fits the budget (after a
        # change of model or of max_model_len it is fitted again).
        stale = r is not None and (int(r["as_of"]) != int(as_of) or carried_tokens > budget)
        if not needs_refresh and r is not None and not stale:
            add(USER, user_id, r["text"], r["history_text"], r["as_of"], carried_tokens, False,
                r.get("n_titles", 0) if pd.notna(r.get("n_titles", 0)) else 0, individual)
            continue
        entries = sorted(_entries(window), key=lambda e: (int(e["ts"]), str(e["item_id"])))
        if not entries:
            continue  # nothing to reason about yet
        lines = [history_entry(*meta.get(str(e["item_id"]), (None, None)), e["rating"], title_limit) for e in entries]
        gender, age, occupation = profiles.get(user_id, (None, None, None))
        profile = profile_phrase(gender, age, occupation, field_limit)
        text, shown, tokens = _fit(lambda p: render_user(cfg, profile, p)[0], lines, count_tokens, budget, True)
        add(USER, user_id, text, "\n".join(shown), int(as_of), tokens, bool(needs_refresh) or stale, len(shown),
            individual)

    # Items: factual knowledge depends on no interaction, so it is usable at any time (as_of 0).
    dirty_items = dirty_item_ids(inputs)
    for item_id, (title, year) in _progress(meta.items(), len(meta), "item prompts"):
        if not clean_text(title, title_limit):
            continue  # an item without a title gives the LLM nothing to describe
        text = render_item(cfg, title, year)
        add(ITEM, item_id, text, None, 0, count_tokens(text), item_id in dirty_items, 1, individual)

    if mode == "collective":
        for (kind, group_id), (titles, as_of) in group_titles(cfg, inputs).items():
            text, shown, tokens = _fit(lambda t, k=kind: render_group(cfg, k, t), titles, count_tokens, budget, False)
            add(kind, group_id, text, None, as_of, tokens, True, len(shown), True)

    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "has_knowledge"])
    frame["has_knowledge"] = frame["prompt_hash"].isin(known_hashes)
    frame = frame[COLUMNS].sort_values(["entity_kind", "entity_id"], kind="stable").reset_index(drop=True)
    return frame


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("prompt_id", pa.string()), ("entity_kind", pa.string()), ("entity_id", pa.string()), ("text", pa.string()),
        ("history_text", pa.string()), ("prompt_hash", pa.string()), ("template_version", pa.string()),
        ("as_of", pa.int64()), ("est_tokens", pa.int64()), ("has_knowledge", pa.bool_()), ("ask_llm", pa.bool_()),
        ("is_dirty", pa.bool_()), ("n_titles", pa.int32()),
    ])


def _previous(lake: Lake, dataset: str, day: dt.date) -> pd.DataFrame | None:
    before = lake.latest_partition(dataset, upto=day - dt.timedelta(days=1))
    return lake.read_partition(dataset, before) if before else None


def load_inputs(cfg: Config, lake: Lake, day: str | dt.date, mode: str | None = None) -> tuple[PromptInputs, str]:
    """The feature partitions of `day` as `PromptInputs`, and the resolved extraction mode."""
    day = as_date(day)
    # Only the user columns prompts use (those the table has: `_check_columns` names any missing): the `history`
    # column, every interaction to date, is most of the dataset.
    dataset, (_, wanted) = "features/user_history", _REQUIRED["features/user_history"]
    present = set(lake.column_names(dataset))
    inputs = PromptInputs(
        user_history=lake.read_partition(dataset, day, columns=[c for c in wanted if c in present]),
        items=lake.read_partition("features/items", day),
    )
    users_day = lake.latest_partition("raw/users", upto=day)
    inputs.users = lake.read_partition("raw/users", users_day) if users_day else None
    inputs.previous_items = _previous(lake, "features/items", day)
    inputs.previous_prompts = _previous(lake, DATASET, day)
    mode = mode or resolve_mode(cfg, len(inputs.user_history), len(inputs.items))
    if mode == "collective":
        if not lake.has_partition("features/clusters", day):
            raise PromptError(
                f"collective extraction needs {lake.describe('features/clusters', day)}, "
                "which is missing (run the clustering job first)"
            )
        inputs.clusters = lake.read_partition("features/clusters", day)
    _check_columns(inputs, day.isoformat())
    return inputs, mode


def build_prompts(cfg: Config, dt: str | dt.date, lake: Lake | None = None,
                  count_tokens: TokenCounter | None = None) -> dict[str, Any]:
    """Build and write `prompts/dt=D/`; returns the counts (also recorded in `_runs/dt=D/prompts.json`)."""
    from reki_core.llm.store import known_prompt_hashes, sampling_version
    from reki_core.runlog import timed_step

    lake = lake or lake_of(cfg)
    day = as_date(dt)
    with timed_step(lake, day, "prompts") as record:
        inputs, mode = load_inputs(cfg, lake, day)
        known = known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg))
        frame = render_prompts(cfg, inputs, mode, count_tokens or make_token_counter(cfg), known)
        import pyarrow as pa

        path = lake.write_partition(pa.Table.from_pandas(frame, schema=_schema(), preserve_index=False), DATASET, day)
        record.update(prompt_counts(frame, mode))
        record["path"] = lake.uri_of(path)
        return dict(record)


def prompt_counts(frame: pd.DataFrame, mode: str) -> dict[str, Any]:
    """Counts by kind: prompts, already known, dirty, to ask the LLM."""
    by_kind = {k: int(n) for k, n in frame["entity_kind"].value_counts().sort_index().items()}
    known = {k: int(n) for k, n in frame.groupby("entity_kind")["has_knowledge"].sum().items()}
    return {
        "mode": mode,
        "rows": int(len(frame)),
        "by_kind": by_kind,
        "with_knowledge": known,
        "dirty": {k: int(n) for k, n in frame.groupby("entity_kind")["is_dirty"].sum().items()},
        "to_ask": int((frame["ask_llm"] & ~frame["has_knowledge"]).sum()),
        "max_est_tokens": int(frame["est_tokens"].max()) if len(frame) else 0,
    }
