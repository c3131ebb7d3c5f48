"""Small daily runs of the feature jobs in the driver (pyarrow and plain Python), without starting Spark.

A day of ML-100K touches a few hundred users, and a Spark run of it costs mostly fixed costs: a JVM and a
session to start (through spark-submit), then some 28 Spark jobs whose stages cost about the same whatever
their rows (README, "Why a small day runs in the driver"). So when a daily run is small (the previous
day's state is usable, and the buckets to recompute hold at most `spark.in_driver_max_interactions`
interactions), the jobs compute it here, and Spark is not started at all. Otherwise (a full build, a big
day, a changed item snapshot) these functions return None and the Spark job runs.

This is the one place the pipeline keeps a second implementation of its transforms, and only of the
daily step: `items` when the item snapshot is unchanged (then only popularity moves), `user_history` and
`ctr_samples` on the touched buckets. Both write the same files: the same Arrow schema (that of the
previous partition's files, which Spark wrote), rows and order. tests/spark/test_in_driver.py holds
them equal, on both window modes, against a Spark build of the same day: a change to a Spark transform
needs its twin here.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import re
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spark_jobs import ctr_samples, items, user_history
from spark_jobs.buckets import bucket_files, read_manifest, write_bucketed
from spark_jobs.common import previous_day

_EPOCH = dt.date(1970, 1, 1)


def run(step: str, cfg, lake, day: dt.date) -> dict | None:
    """The run-log payload of `step` for `day` computed here, or None when Spark must run it."""
    limit = cfg.spark.in_driver_max_interactions
    runner = _RUNS.get(step)
    return runner(cfg, lake, day, limit) if runner and limit else None


# --------------------------------------------------------------------------- Spark's user bucket, in Python
_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_MASK = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _lane(acc: int, value: int) -> int:
    return _rotl((acc + value * _P2) & _MASK, 31) * _P1 & _MASK


def xxhash64(data: bytes, seed: int = 42) -> int:
    """XXH64 of `data` as a signed long: Spark's `xxhash64` of a string (its UTF-8 bytes, Spark's seed 42)."""
    n, i = len(data), 0
    if n >= 32:
        acc = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed & _MASK, (seed - _P1) & _MASK]
        while i + 32 <= n:
            acc = [_lane(a, v) for a, v in zip(acc, struct.unpack_from("<4Q", data, i))]
            i += 32
        h = (_rotl(acc[0], 1) + _rotl(acc[1], 7) + _rotl(acc[2], 12) + _rotl(acc[3], 18)) & _MASK
        for a in acc:
            h = ((h ^ _lane(0, a)) * _P1 + _P4) & _MASK
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while i + 8 <= n:
        h = (_rotl(h ^ _lane(0, struct.unpack_from("<Q", data, i)[0]), 27) * _P1 + _P4) & _MASK
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (struct.unpack_from("<I", data, i)[0] * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * _P5 & _MASK), 11) * _P1 & _MASK
        i += 1
    h = (h ^ (h >> 33)) * _P2 & _MASK
    h = (h ^ (h >> 29)) * _P3 & _MASK
    h ^= h >> 32
    return h - (1 << 64) if h >> 63 else h


def user_bucket(user_id: str, n_buckets: int) -> int:
    """`buckets.bucket_expr`: pmod(xxhash64(user_id), n_buckets)."""
    return xxhash64(user_id.encode("utf-8")) % n_buckets


# --------------------------------------------------------------------------- reading
def _read_files(paths: Iterable, columns: list[str] | None = None) -> pa.Table | None:
    tables = [pq.read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else None


def _partition_files(lake, dataset: str, day: dt.date) -> list:
    return sorted(lake.local_path(f"{dataset}/dt={day.isoformat()}").glob("*.parquet"))


def _bucketed_schema(lake, dataset: str, day: dt.date) -> pa.Schema | None:
    """The schema of the partition's files when it is the one this module writes (`SCHEMAS`), else None."""
    files = [f for fs in bucket_files(lake, dataset, day).values() for f in fs]
    return _if_current(dataset, pq.read_schema(files[0])) if files else None


def _if_current(dataset: str, schema: pa.Schema | None) -> pa.Schema | None:
    """`schema` (with its nullability and Spark's metadata, as Spark wrote it) when its columns and types are
    those this module computes; after a change of the Spark job's columns, Spark runs the day (None)."""
    expected = SCHEMAS[dataset]
    same = schema is not None and [(f.name, _shape(f.type)) for f in schema] == [(f.name, _shape(f.type)) for f in expected]
    return schema if same else None


def _shape(t: pa.DataType):
    """A type without what Spark and Arrow name or flag differently (list element names, nullability)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _shape(t.value_type))
    if pa.types.is_struct(t):
        return ("struct", tuple((t.field(i).name, _shape(t.field(i).type)) for i in range(t.num_fields)))
    return str(t)


def _struct(**fields) -> pa.DataType:
    return pa.struct([pa.field(k, v) for k, v in fields.items()])


_STR, _I32, _I64 = pa.string(), pa.int32(), pa.int64()
_ENTRY = _struct(item_id=_STR, ts=_I64, rating=_I32)
# What each Spark job writes (names and types; nullability and metadata come from the previous partition's
# files). tests/spark/test_in_driver.py compares the files both engines write, so a change to a Spark job's
# columns fails it until this and the code below change too.
SCHEMAS = {
    "features/items": pa.schema([("item_id", _STR), ("title", _STR), ("year", _I32), ("genres", pa.list_(_STR)),
                                 ("first_genre", _STR), ("popularity", _I64), ("metadata_hash", _STR),
                                 ("needs_refresh", pa.bool_())]),
    "features/items_undescribed": pa.schema([("item_id", _STR), ("popularity", _I64)]),
    "features/user_history": pa.schema([
        ("user_id", _STR), ("n_interactions", _I32), ("history", pa.list_(_ENTRY)),
        ("window", pa.list_(_struct(item_id=_STR, ts=_I64, rating=_I32, title=_STR, year=_I32))),
        ("window_size", _I32), ("window_n", _I32), ("as_of", _I64), ("window_hash", _STR), ("needs_refresh", pa.bool_()),
        ("refreshed_dt", pa.date32()), ("age", _I32), ("gender", _STR), ("occupation", _STR)]),
    "features/knowledge_versions": pa.schema([("user_id", _STR), ("window_n", _I32), ("window_size", _I32), ("as_of", _I64),
                                              ("window_hash", _STR), ("version_dt", pa.date32())]),
    "features/ctr_samples": pa.schema([
        ("user_id", _STR), ("item_id", _STR), ("ts", _I64), ("rating", _I32), ("label", pa.int8()), ("item_genre", _STR),
        ("hist_item_ids", pa.list_(_STR)), ("hist_genres", pa.list_(_STR)), ("hist_ratings", pa.list_(_I32)),
        ("split", _STR), ("knowledge_prompt_hash", _STR), ("knowledge_as_of", _I64), ("knowledge_window_hash", _STR),
        ("knowledge_window_n", _I32)]),
}


_INTERACTION_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "rating": pa.int32(), "ts": pa.int64()}


def _new_interaction_files(lake, since_exclusive: dt.date, upto: dt.date) -> list:
    days = [d for d in lake.partitions("raw/interactions") if since_exclusive < d <= upto]
    return [f for d in days for f in _partition_files(lake, "raw/interactions", d)]


def _count_new_interactions(lake, since_exclusive: dt.date, upto: dt.date) -> int:
    """How many interactions `_new_interactions` would read (from the files' footers: nothing is read yet)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _new_interaction_files(lake, since_exclusive, upto))


def _new_interactions(lake, since_exclusive: dt.date, upto: dt.date) -> pa.Table | None:
    """`common.read_interactions`: raw/interactions with since_exclusive < dt <= upto, typed as Spark casts them.
    None when a key or time is null: the raw gate stops such data, and Spark's handling is left to Spark."""
    tables = [pq.read_table(f, columns=list(_INTERACTION_TYPES)) for f in _new_interaction_files(lake, since_exclusive, upto)]
    empty = pa.table({k: pa.array([], t) for k, t in _INTERACTION_TYPES.items()})
    table = pa.concat_tables([empty] + [t.select(list(_INTERACTION_TYPES)).cast(pa.schema(_INTERACTION_TYPES))
                                        for t in tables])
    return None if any(table[c].null_count for c in ("user_id", "item_id", "ts")) else table


# --------------------------------------------------------------------------- items
# `items.normalise_title` and `items.title_year` with Java's regex semantics (Spark's): `\s` and `\d` are
# ASCII, `.` stops at any line terminator, `$` also matches before a final one, and `trim` strips spaces only.
_WS = r"[ \t\n\x0b\f\r]"
_DOT = r"[^\n\r\u0085\u2028\u2029]"
_END = r"(?=(?:\r\n|[\n\r\u0085\u2028\u2029])?\Z)"
_SPACES = re.compile(_WS + "+")
_TRAILING_YEAR = re.compile(_WS + r"*\(([0-9]{4})\)" + _END)
_ARTICLE = re.compile(r"^(" + _DOT + r"+?), (The|A|An)((?: \(" + _DOT + r"*\))?)" + _END)
_TITLE_YEAR = re.compile(r"\(([0-9]{4})\)" + _WS + "*" + _END)


def normalise_title(title: str | None) -> str | None:
    """`items.normalise_title`, then an empty title is null (as `items.item_rows`)."""
    if title is None:
        return None
    t = _SPACES.sub(" ", title).strip(" ")
    t = _TRAILING_YEAR.sub("", t).strip(" ")
    t = _ARTICLE.sub(r"\g<2> \g<1>\g<3>", t)
    return t or None


def title_year(title: str | None) -> int | None:
    """`items.title_year`: the year of a trailing "(YYYY)" of the raw title."""
    found = None if title is None else _TITLE_YEAR.search(title)
    return int(found.group(1)) if found else None


def item_features(item_id: str, title: str | None, year: int | None, genres: list | None) -> dict:
    """One described item's features, as `items.item_rows` computes them."""
    name = normalise_title(title)
    year = year if year is not None else title_year(title)
    genres = list(genres or [])
    first = genres[0] if genres and genres[0] is not None else items.UNKNOWN_GENRE
    text = "\x1f".join([name or "", "" if year is None else str(year), "\x1e".join(g for g in genres if g is not None)])
    return {"item_id": item_id, "title": name, "year": year, "genres": genres, "first_genre": first,
            "metadata_hash": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def items_day(cfg, lake, day: dt.date, limit: int) -> dict | None:
    """`items.run` for a daily run: features of today's snapshot, popularity carried plus the new interactions."""
    prev_day = previous_day(lake, items.DATASET, day)
    if prev_day is None or not lake.has_partition("raw/items", day):
        return None
    if _count_new_interactions(lake, prev_day, day) > limit:
        return None
    raw = _read_files(_partition_files(lake, "raw/items", day))
    previous = _read_files(_partition_files(lake, items.DATASET, prev_day))
    if raw is None or previous is None or raw.num_rows > limit or _if_current(items.DATASET, previous.schema) is None:
        return None
    types = raw.schema
    if not (pa.types.is_integer(types.field("year").type) and pa.types.is_list(types.field("genres").type)):
        return None  # Spark casts other types: leave them to it
    ids = raw["item_id"].cast(pa.string()).to_pylist()
    if len(set(ids)) != len(ids) or None in ids:
        return None  # Spark's join would repeat the item; the raw gate stops that day anyway
    prev_ids = previous["item_id"].to_pylist()
    if len(set(prev_ids)) != len(prev_ids):
        return None
    prev_pop = dict(zip(prev_ids, previous["popularity"].to_pylist()))
    prev_hash = dict(zip(prev_ids, previous["metadata_hash"].to_pylist()))
    if lake.has_partition(items.UNDESCRIBED, prev_day):
        undescribed = _read_files(_partition_files(lake, items.UNDESCRIBED, prev_day))
        if undescribed is not None:
            prev_pop.update(zip(undescribed["item_id"].to_pylist(), undescribed["popularity"].to_pylist()))
    new = _new_interactions(lake, prev_day, day)
    if new is None:
        return None
    new_counts = Counter(new["item_id"].to_pylist())

    rows = []
    for item_id, title, year, genres in zip(ids, raw["title"].cast(pa.string()).to_pylist(), raw["year"].to_pylist(),
                                            raw["genres"].to_pylist()):
        row = item_features(item_id, title, year, genres)
        old = prev_hash.get(item_id)
        rows.append({**row, "popularity": prev_pop.get(item_id, 0) + new_counts.get(item_id, 0),
                     "needs_refresh": old is None or old != row["metadata_hash"]})
    rows.sort(key=lambda r: r["item_id"])
    described = pa.Table.from_pylist(rows, schema=previous.schema)
    known = set(ids)
    others = sorted((i, prev_pop.get(i, 0) + new_counts.get(i, 0)) for i in (set(prev_pop) | set(new_counts)) - known)
    others = [(i, p) for i, p in others if p > 0]
    undescribed_table = pa.table({"item_id": pa.array([i for i, _ in others], pa.string()),
                                  "popularity": pa.array([p for _, p in others], pa.int64())},
                                 schema=pa.schema([pa.field("item_id", pa.string()), pa.field("popularity", pa.int64(), False)]))
    # As `items.run`: the undescribed items first, so no items partition lacks its companion.
    lake.write_partition(undescribed_table, items.UNDESCRIBED, day)
    lake.write_partition(described, items.DATASET, day)
    return {
        "items": described.num_rows,
        "dirty_items": sum(r["needs_refresh"] for r in rows),
        "items_without_title": described["title"].null_count,
        "interacted_items_without_metadata": undescribed_table.num_rows,
        "incremental_from": prev_day.isoformat(),
    }


# --------------------------------------------------------------------------- user_history
def _window_hash(window: list | None) -> str | None:
    """`user_history.window_hash`: sha256 of "item:ts:rating|..." (concat_ws skips a null part)."""
    if window is None:
        return None
    text = "|".join(":".join(str(v) for v in (e["item_id"], e["ts"], e["rating"]) if v is not None) for e in window)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _null_first(value):
    """A sort key ordering None first, as Spark's ascending sorts do."""
    return (value is not None, value)


def _event_key(e: dict):
    return (_null_first(e["ts"]), _null_first(e["item_id"]), _null_first(e["rating"]))


def _advance_user(prev: dict | None, new_events: list[dict], params) -> dict:
    """`build_histories` and `advance_windows` for one user: history, window, versions made today."""
    history = list(prev["history"]) if prev else []
    if new_events:
        history = sorted(history + new_events, key=_event_key)
    base = prev["n_interactions"] if prev else 0
    per_day = Counter((e["ts"] // 86400) for e in new_events)
    day_counts, running = [], base
    for day_number in sorted(per_day):
        running += per_day[day_number]
        day_counts.append((_EPOCH + dt.timedelta(days=day_number), running))
    last_n, versions = (prev["window_n"] if prev else None), []
    k = params.refresh_min_new_interactions
    for day, n in day_counts:
        if last_n is None or (n - last_n >= k and params.key(n) != params.key(last_n)):
            last_n = n
            versions.append((day, n))
    window = None if last_n is None else params.window(history, last_n)
    return {"history": history, "window_n": last_n, "window": window, "versions": versions}


def _version_row(user_id: str, day: dt.date, n: int, history: list, params) -> dict:
    window = params.window(history, n)
    return {"user_id": user_id, "window_n": n, "window_size": len(window),
            "as_of": window[-1]["ts"] if window else None, "window_hash": _window_hash(window), "version_dt": day}


def _history_row(user_id: str, state: dict, prev: dict | None, titles: dict, profile: tuple | None) -> dict:
    window = state["window"]
    shown = None if not window else [  # posexplode of an empty window gives no rows: Spark leaves it null
        {**e, "title": titles.get(e["item_id"], (None, None))[0], "year": titles.get(e["item_id"], (None, None))[1]}
        for e in window]
    versions = state["versions"]
    age, gender, occupation = profile or (None, None, None)
    return {
        "user_id": user_id,
        "n_interactions": len(state["history"]),
        "history": state["history"],
        "window": shown,
        "window_size": None if shown is None else len(shown),
        "window_n": state["window_n"],
        "as_of": window[-1]["ts"] if window else None,
        "window_hash": _window_hash(window),
        "needs_refresh": bool(versions),
        "refreshed_dt": versions[-1][0] if versions else (prev["refreshed_dt"] if prev else None),
        "age": age,
        "gender": gender,
        "occupation": occupation,
    }


def _user_profiles(lake, day: dt.date) -> dict | None:
    """user_id -> (age, gender, occupation) of `raw/users/dt=day`; {} without a snapshot, None when a user
    appears twice or has no id (Spark's join would repeat the user's row: leave that day to Spark)."""
    if not lake.has_partition("raw/users", day):
        return {}
    table = _read_files(_partition_files(lake, "raw/users", day), ["user_id", "age", "gender", "occupation"])
    if table is None:
        return None  # a partition without a file: Spark's read names it
    ids = table["user_id"].cast(pa.string()).to_pylist()
    if len(set(ids)) != len(ids) or None in ids:
        return None
    columns = [table["age"].cast(pa.int32()).to_pylist(), table["gender"].cast(pa.string()).to_pylist(),
               table["occupation"].cast(pa.string()).to_pylist()]
    return {u: p for u, p in zip(ids, zip(*columns))}


def _item_lookup(lake, day: dt.date, columns: list[str]) -> dict | None:
    """item_id -> the other `columns` of `features/items/dt=day`; None when an item appears twice (Spark's
    joins would repeat its entries: leave that day to Spark)."""
    table = _read_files(_partition_files(lake, "features/items", day), ["item_id", *columns])
    if table is None:
        return None
    ids = table["item_id"].to_pylist()
    values = zip(*(table[c].to_pylist() for c in columns))
    lookup = dict(zip(ids, values))
    return lookup if len(lookup) == len(ids) else None


def _titles(lake, day: dt.date) -> dict | None:
    return _item_lookup(lake, day, ["title", "year"])


def _touched_buckets(lake, day, prev_day, new: pa.Table, n_buckets: int) -> set[int]:
    """`user_history.touched_buckets`, without Spark."""
    users = set(new["user_id"].to_pylist()) | set(user_history.profile_changes(lake, day, prev_day))
    buckets = user_history.flagged_buckets(lake, prev_day) | {user_bucket(u, n_buckets) for u in users}
    changed = user_history.changed_items(lake, day, prev_day)
    if changed:  # rare: only then are the previous windows read
        buckets |= _buckets_listing(lake, prev_day, "window", changed, buckets)
    return buckets


def _buckets_listing(lake, day: dt.date, column: str, item_ids: list[str], skip: set[int]) -> set[int]:
    """Buckets of `features/user_history/dt=day`, other than `skip`, with one of `item_ids` in a user's
    `column` (the window or the whole history)."""
    wanted = pa.array(item_ids, pa.string())
    found = set()
    for bucket, files in bucket_files(lake, user_history.DATASET, day).items():
        if bucket not in skip:
            listed = pc.struct_field(pc.list_flatten(_read_files(files, [column])[column]), "item_id")
            if pc.any(pc.is_in(listed, value_set=wanted)).as_py():
                found.add(bucket)
    return found


def _interactions_in(lake, day: dt.date, buckets: set[int]) -> int:
    """The interactions the buckets of `features/user_history/dt=day` hold (their manifest's counts)."""
    entries = read_manifest(lake, user_history.DATASET, day)["buckets"]
    return sum(entries[str(b)]["counts"].get("interactions", 0) for b in buckets if str(b) in entries)


def _rows_by_user(table: pa.Table | None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in ([] if table is None else table.to_pylist()):
        out[row["user_id"]].append(row)
    return out


def _by_bucket(rows: Iterable[dict], n_buckets: int, buckets_of: dict[str, int]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        user = row["user_id"]
        if user not in buckets_of:
            buckets_of[user] = user_bucket(user, n_buckets)
        out[buckets_of[user]].append(row)
    return out


def user_history_day(cfg, lake, day: dt.date, limit: int) -> dict | None:
    """`user_history.run` for a daily run: the touched buckets recomputed here, every other one linked."""
    params = user_history.WindowParams.from_config(cfg)
    n_buckets = cfg.spark.user_buckets
    prev_day = user_history.previous_state(lake, day, n_buckets)
    if prev_day is None or not lake.has_partition("features/items", day):
        return None
    schemas = {ds: _bucketed_schema(lake, ds, prev_day) for ds in (user_history.DATASET, user_history.VERSIONS)}
    profiles = _user_profiles(lake, day)
    if None in schemas.values() or profiles is None:
        return None
    if _count_new_interactions(lake, prev_day, day) > limit:
        return None
    new = _new_interactions(lake, prev_day, day)
    titles = _titles(lake, day)
    if new is None or titles is None:
        return None
    rewritten = _touched_buckets(lake, day, prev_day, new, n_buckets)
    if new.num_rows + _interactions_in(lake, prev_day, rewritten) > limit:
        return None

    def read(dataset: str) -> pa.Table | None:
        files = bucket_files(lake, dataset, prev_day, rewritten)
        return _read_files(f for b in sorted(files) for f in files[b])

    prev_table = read(user_history.DATASET)
    prev_rows = {r["user_id"]: r for r in ([] if prev_table is None else prev_table.to_pylist())}
    prev_versions = read(user_history.VERSIONS)
    new_events: dict[str, list[dict]] = defaultdict(list)
    for e in new.select(["user_id", "item_id", "ts", "rating"]).to_pylist():
        new_events[e.pop("user_id")].append(e)
    # Every previous version of the rewritten buckets is kept (as Spark's union), a user's new ones added.
    history_rows, version_rows = [], [] if prev_versions is None else prev_versions.to_pylist()
    for user_id in set(prev_rows) | set(new_events):
        prev = prev_rows.get(user_id)
        state = _advance_user(prev, new_events.get(user_id, []), params)
        history_rows.append(_history_row(user_id, state, prev, titles, profiles.get(user_id)))
        version_rows.extend(_version_row(user_id, d, n, state["history"], params) for d, n in state["versions"])
    buckets_of: dict[str, int] = {}
    carry = {"carry_from": prev_day, "rewritten": rewritten}
    written_versions = _write(version_rows, ["user_id", "window_n"], schemas[user_history.VERSIONS], lake,
                              user_history.VERSIONS, day, prev_day, n_buckets, buckets_of, carry)
    stats = _write(history_rows, ["user_id"], schemas[user_history.DATASET], lake, user_history.DATASET, day, prev_day,
                   n_buckets, buckets_of, carry, user_history.summarise_history(params.max_window),
                   ["n_interactions", "needs_refresh"])
    return user_history.payload(stats, written_versions, params, prev_day, rewritten)


def _write(rows: list[dict], sort_by: list[str], schema: pa.Schema, lake, dataset: str, day, prev_day, n_buckets: int,
           buckets_of: dict[str, int], carry: dict, summarise=None, summary_columns=None) -> dict[str, int]:
    """Rows into their buckets' files, in `sort_by` order (Spark's: nulls first), with the previous manifest's schema."""
    tables = {}
    for bucket, bucket_rows in _by_bucket(rows, n_buckets, buckets_of).items():
        bucket_rows.sort(key=lambda r: tuple(_null_first(r[c]) for c in sort_by))
        tables[bucket] = pa.Table.from_pylist(bucket_rows, schema=schema)
    return write_bucketed(tables, lake, dataset, day, n_buckets, sort_by, summarise, summary_columns, **carry,
                          schema=read_manifest(lake, dataset, prev_day)["schema"])


# --------------------------------------------------------------------------- ctr_samples
def _samples_of_user(user_id: str, history: list[dict], versions: list[dict], genres: dict, params, split: str) -> list[dict]:
    """`ctr_samples.transform` for one user: each interaction with the newest version whose as_of is strictly
    earlier (the highest window_n among equal as_of) and the previous `max_hist_len` interactions."""
    versions = sorted(versions, key=lambda v: (_null_first(v["as_of"]), _null_first(v["window_n"])))
    as_ofs = [_null_first(v["as_of"]) for v in versions]
    events = [(e["item_id"], _genre(genres.get(e["item_id"])), e["rating"], e["ts"]) for e in history]
    size = params.max_hist_len
    out = []
    for pos, (item_id, genre, rating, ts) in enumerate(events):
        found = bisect.bisect_left(as_ofs, _null_first(ts)) - 1
        if found < 0:
            continue  # no knowledge from before this interaction: no sample
        version = versions[found]
        hist = events[max(0, pos - size): pos]
        out.append({
            "user_id": user_id, "item_id": item_id, "ts": ts, "rating": rating,
            "label": None if rating is None else int(rating > params.positive_rating_threshold),
            "item_genre": genre,
            "hist_item_ids": [h[0] for h in hist], "hist_genres": [h[1] for h in hist], "hist_ratings": [h[2] for h in hist],
            "split": split, "knowledge_prompt_hash": None, "knowledge_as_of": version["as_of"],
            "knowledge_window_hash": version["window_hash"], "knowledge_window_n": version["window_n"],
        })
    return out


def _genre(first_genre: str | None) -> str:
    return ctr_samples.UNKNOWN_GENRE if first_genre is None else first_genre


def _split_of(user_id: str, fractions: tuple[float, float, float]) -> str:
    """`ctr_samples.split_of`: the first 32 bits of sha256(user_id) as a fraction of 2**32."""
    unit = int(hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:8], 16) / float(16**8)
    return "train" if unit < fractions[0] else "valid" if unit < fractions[0] + fractions[1] else "test"


def ctr_samples_day(cfg, lake, day: dt.date, limit: int) -> dict | None:
    """`ctr_samples.run` for a daily run: the buckets whose users' samples can change recomputed here."""
    params = ctr_samples.SampleParams.from_config(cfg)
    n_buckets = cfg.spark.user_buckets
    prev_day = ctr_samples.previous_state(lake, day, n_buckets)
    if prev_day is None or not all(lake.has_partition(ds, day) for ds in ("features/items", user_history.DATASET, user_history.VERSIONS)):
        return None
    schema = _bucketed_schema(lake, ctr_samples.DATASET, prev_day)
    if schema is None:
        return None
    rewritten = ctr_samples.grown_user_buckets(lake, day, prev_day)
    regenred = ctr_samples.regenred_items(lake, day, prev_day)
    if regenred:  # rare: only then are all histories read
        rewritten |= _buckets_listing(lake, day, "history", regenred, rewritten)
    if _interactions_in(lake, day, rewritten) > limit:
        return None
    lookup = _item_lookup(lake, day, ["first_genre"])
    if lookup is None:
        return None
    genres = {item_id: genre for item_id, (genre,) in lookup.items()}
    tables = {}
    histories = bucket_files(lake, user_history.DATASET, day, rewritten)
    versions = bucket_files(lake, user_history.VERSIONS, day, rewritten)
    for bucket in sorted(rewritten):
        users = _read_files(histories.get(bucket, []), ["user_id", "history"])
        by_user = _rows_by_user(_read_files(versions.get(bucket, []), ["user_id", "as_of", "window_hash", "window_n"]))
        rows = []
        for user in ([] if users is None else users.to_pylist()):
            rows.extend(_samples_of_user(user["user_id"], user["history"] or [], by_user.get(user["user_id"], []), genres,
                                         params, _split_of(user["user_id"], params.split_fractions)))
        rows.sort(key=lambda r: (_null_first(r["user_id"]), _null_first(r["ts"]), _null_first(r["item_id"])))
        tables[bucket] = pa.Table.from_pylist(rows, schema=schema)
    stats = write_bucketed(tables, lake, ctr_samples.DATASET, day, n_buckets, ["user_id", "ts", "item_id"],
                           ctr_samples.summarise, ["split", "label"], carry_from=prev_day, rewritten=rewritten,
                           schema=read_manifest(lake, ctr_samples.DATASET, prev_day)["schema"])
    return ctr_samples.payload(stats, lake, day, prev_day, rewritten)


_RUNS = {"features_items": items_day, "features_user_history": user_history_day, "features_ctr_samples": ctr_samples_day}
