"""The pandas prompt stage the Spark job `spark_jobs/prompts.py` replaced (issue 28), frozen as the oracle of
tests/spark/test_prompts_job.py: the same inputs must give the same rows. It reads every user, item and group into one
process, which is why it left the pipeline; only the tests use it. The wording and sanitising are the pipeline's own
(`reki_core.prompts`), shared by both.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pandas as pd

from reki_core.config import Config
from reki_core.prompts import (COLUMNS, DATASET, GROUP_KIND_OF_CLUSTERING, ITEM, USER, PromptError, TokenCounter,
                               _fit, clean_text, history_entry, profile_phrase, prompt_hash, render_group, render_item,
                               render_user, resolve_mode, title_with_year, token_budget)
from reki_core.quality.prompts import check_prompts  # noqa: F401  (the gate on a whole frame)
from reki_core.storage.lake import Lake, as_date

_REQUIRED = {
    "features/user_history": ("user_history", ["user_id", "window", "as_of", "needs_refresh"]),
    "features/items": ("items", ["item_id", "title", "year", "popularity"]),
    "features/clusters": ("clusters", ["clustering", "entity_id", "group_id"]),
}


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
