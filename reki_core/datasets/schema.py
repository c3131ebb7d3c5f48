"""The raw schema every source lands in (MovieLens, synthetic, any production feed)."""

from __future__ import annotations

import datetime as dt

import pandas as pd

# column -> logical type; the landing checks incoming files against these.
INTERACTIONS = {"user_id": "string", "item_id": "string", "rating": "integer", "ts": "integer"}
USERS = {"user_id": "string", "age": "integer", "gender": "string", "occupation": "string", "zip_code": "string"}
ITEMS = {"item_id": "string", "title": "string", "year": "integer", "genres": "list"}

RATING_MIN, RATING_MAX = 1, 5


def day_bounds(day: dt.date) -> tuple[int, int]:
    """[start, end) of a UTC day in epoch seconds: the `ts` of the interactions landed for that day (a landing rule)."""
    start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
    return start, start + 86_400


def normalise_interactions(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string"),
            "item_id": df["item_id"].astype("string"),
            "rating": df["rating"].astype("int32"),
            "ts": df["ts"].astype("int64"),
        }
    )
    return out.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def normalise_users(df: pd.DataFrame) -> pd.DataFrame:
    out = df[list(USERS)].copy()
    for col in ("user_id", "gender", "occupation", "zip_code"):
        out[col] = out[col].astype("string")
    out["age"] = out["age"].astype("Int32")
    return out.sort_values("user_id", kind="stable").reset_index(drop=True)


def normalise_items(df: pd.DataFrame) -> pd.DataFrame:
    out = df[list(ITEMS)].copy()
    out["item_id"] = out["item_id"].astype("string")
    out["title"] = out["title"].astype("string")
    out["year"] = out["year"].astype("Int32")
    out["genres"] = out["genres"].map(lambda g: [str(x) for x in g] if g is not None else [])
    return out.sort_values("item_id", kind="stable").reset_index(drop=True)
