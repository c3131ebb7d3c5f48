"""Synthetic users, items and interactions in the raw schema, for scale tests and benchmarks.

Item popularity and user activity are Zipf-skewed (a few heads, long tails), ratings come from an
item quality plus a user bias plus noise, and everything is a vectorised function of the seed, so
10M interactions take seconds and the same seed gives the same frames.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reki_core.datasets.schema import normalise_interactions, normalise_items, normalise_users
from reki_core.storage.lake import Lake

GENRES = ["Fiction", "Mystery", "Romance", "Fantasy", "Science Fiction", "Thriller", "History", "Biography",
          "Poetry", "Horror", "Children", "Philosophy", "Travel", "Cooking", "Science", "Comics"]
OCCUPATIONS = ["engineer", "student", "educator", "writer", "artist", "healthcare", "retired", "lawyer",
               "scientist", "programmer", "marketing", "librarian", "other"]
_ADJECTIVES = ["Silent", "Hidden", "Last", "Broken", "Golden", "Distant", "Secret", "Crimson", "Quiet", "Lost",
               "Bright", "Wild", "Frozen", "Hollow", "Ancient", "Café", "Señor's", "Žižkov"]
_NOUNS = ["River", "Garden", "Empire", "Letter", "Mountain", "Winter", "Kingdom", "Voyage", "Harbor", "Clock",
          "Shadow", "Island", "Library", "Orchard", "Storm", "Mirror"]
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class SyntheticData:
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    rng.shuffle(weights)  # popularity is not tied to the id order
    return weights / weights.sum()


def generate(
    n_interactions: int,
    n_users: int | None = None,
    n_items: int | None = None,
    start: dt.date = dt.date(2024, 1, 1),
    days: int = 30,
    seed: int = 0,
    activity_exponent: float = 0.8,
    popularity_exponent: float = 1.0,
) -> SyntheticData:
    """Users, items and about `n_interactions` interactions (exact duplicates dropped) over `days` days."""
    rng = np.random.default_rng(seed)
    n_users = n_users or max(50, n_interactions // 100)
    n_items = n_items or max(50, n_interactions // 200)

    user_ids = np.array([f"u{i}" for i in range(n_users)], dtype=object)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    user_idx = rng.choice(n_users, size=n_interactions, p=_zipf_weights(n_users, activity_exponent, rng))
    item_idx = rng.choice(n_items, size=n_interactions, p=_zipf_weights(n_items, popularity_exponent, rng))
    start_ts = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp())
    ts = start_ts + rng.integers(0, days * SECONDS_PER_DAY, size=n_interactions)

    quality = rng.normal(3.4, 0.7, n_items)
    bias = rng.normal(0.0, 0.5, n_users)
    raw_rating = quality[item_idx] + bias[user_idx] + rng.normal(0.0, 0.9, n_interactions)
    rating = np.clip(np.rint(raw_rating), 1, 5).astype("int32")

    inter = pd.DataFrame({"user_id": user_ids[user_idx], "item_id": item_ids[item_idx], "rating": rating, "ts": ts})
    inter = inter.drop_duplicates(["user_id", "item_id", "ts"])

    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "age": rng.integers(16, 75, n_users).astype("int32"),
            "gender": rng.choice(np.array(["M", "F"], dtype=object), n_users),
            "occupation": rng.choice(np.array(OCCUPATIONS, dtype=object), n_users),
            "zip_code": np.char.zfill(rng.integers(0, 100_000, n_users).astype(str), 5).astype(object),
        }
    )
    adjective = rng.integers(0, len(_ADJECTIVES), n_items)
    noun = rng.integers(0, len(_NOUNS), n_items)
    # About one title in six ends in ", The" like library catalogues do; the item features move it to the front.
    article = np.where(rng.random(n_items) < 0.17, ", The", "")
    titles = [f"{_ADJECTIVES[a]} {_NOUNS[b]} {i}{art}" for i, (a, b, art) in enumerate(zip(adjective, noun, article))]
    genre_p = _zipf_weights(len(GENRES), 1.0, rng)
    n_genres = rng.integers(1, 4, n_items)
    genre_draws = rng.choice(len(GENRES), size=(n_items, 3), p=genre_p)
    genres = [list(dict.fromkeys(GENRES[g] for g in row[:k])) for row, k in zip(genre_draws, n_genres)]
    items = pd.DataFrame({"item_id": item_ids, "title": titles, "year": rng.integers(1950, 2025, n_items), "genres": genres})
    return SyntheticData(normalise_interactions(inter), normalise_users(users), normalise_items(items))


# The `synthetic` source's replay (the books scenario): a MovieLens-100K-sized history, the same for every run.
REPLAY_INTERACTIONS = 100_000


def generate_for_replay(start: dt.date, end: dt.date, n_interactions: int = REPLAY_INTERACTIONS,
                        seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """interactions, users, items of the `synthetic` source, spread over the days `start`..`end` (both included)."""
    if end < start:
        raise ValueError(f"scenario.source: end_date {end} is before start_date {start}")
    data = generate(n_interactions, start=start, days=(end - start).days + 1, seed=seed)
    return data.interactions, data.users, data.items


def interaction_days(interactions: pd.DataFrame) -> pd.Series:
    """The UTC day of each interaction (the raw partition it lands in)."""
    return pd.to_datetime(interactions["ts"], unit="s", utc=True).dt.date


def write_raw_lake(
    lake: Lake,
    interactions: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    snapshot_days: list[dt.date] | None = None,
) -> list[dt.date]:
    """Write raw partitions as the landing would: interactions per UTC day, user/item snapshots as of a day.

    Snapshots hold the users and items seen so far (first interaction on or before the day; items
    nobody rated yet are in the catalogue from the first day). `snapshot_days` defaults to every day.
    Returns the interaction days written.
    """
    from tqdm import tqdm

    days = interaction_days(interactions)
    written = []
    for day, part in tqdm(interactions.groupby(days, sort=True), desc="raw/interactions", leave=False):
        lake.write_partition(part.reset_index(drop=True), "raw/interactions", day)
        written.append(day)
    first_user_day = days.groupby(interactions["user_id"]).min()
    first_item_day = days.groupby(interactions["item_id"]).min()
    user_first = users["user_id"].map(first_user_day)
    item_first = items["item_id"].map(first_item_day).fillna(min(written) if written else dt.date.min)
    for day in snapshot_days if snapshot_days is not None else written:
        lake.write_partition(users[user_first.notna() & (user_first <= day)].reset_index(drop=True), "raw/users", day)
        lake.write_partition(items[item_first <= day].reset_index(drop=True), "raw/items", day)
    return written
