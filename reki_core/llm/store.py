"""The knowledge store (`knowledge/store/`): append-only parquet shards of LLM answers keyed by prompt hash.

Each finished shard is one parquet file with at least `prompt_hash, model_id, sampling_version`
(see docs/data_contracts.md). Files whose name starts with `_` or `.` are in progress and ignored.
"""

from __future__ import annotations

import hashlib
import json

from reki_core.config import Config
from reki_core.storage.lake import Lake

STORE_DATASET = "knowledge/store"


def sampling_version(cfg: Config) -> str:
    """A short id of everything besides `model_id` that shapes an answer to the same prompt (the answer key):
    the engine (backend, and the local server's program), how it runs the weights (dtype, quantisation), the
    weights' fingerprint, the chat template and the sampling settings. Changing any of them re-asks every prompt;
    nothing stale is reused."""
    engine = cfg.llm.engine
    payload = {"backend": cfg.llm.backend, **cfg.llm.sampling.model_dump(), "dtype": engine.dtype,
               "quantization": engine.quantization, "weights": weights_fingerprint(cfg) or "",
               "chat_template": chat_template_fingerprint(cfg)}
    if cfg.llm.backend == "openai" and not engine.base_urls:  # the local stack's server: which program runs it
        payload["server"] = cfg.llm.server.program
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"s-{digest[:12]}"


def weights_fingerprint(cfg: Config) -> str | None:
    """The configured LLM's weights: `llm.engine.weights_fingerprint` where declared (a remote fleet, whose
    weights are not here), else the fingerprint of the local `model_path` folder (every byte; a file is read
    again only when it changes), else None (a hosted model known by its id alone)."""
    from reki_core.fingerprint import folder_fingerprint

    if cfg.llm.engine.weights_fingerprint:
        return cfg.llm.engine.weights_fingerprint
    folder = cfg.resolve(cfg.llm.engine.model_path)
    if not folder.is_dir():
        return None
    return folder_fingerprint(folder, cfg.state_dir / "cache" / "llm-weights-files.json")


def chat_template_fingerprint(cfg: Config) -> str:
    """sha256 of the local model folder's chat template (the server applies it to every prompt), or "" without
    one; a remote fleet's template is covered by its declared weights fingerprint."""
    folder = cfg.resolve(cfg.llm.engine.model_path)
    template = folder / "chat_template.jinja"
    if template.is_file():
        text = template.read_text()
    elif (folder / "tokenizer_config.json").is_file():
        text = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
        text = text if isinstance(text, str) else json.dumps(text, sort_keys=True)
    else:
        return ""
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def store_files(lake: Lake, model_id: str | None = None, sampling_version: str | None = None) -> list[str]:
    """Finished shard files of the knowledge store, sorted (empty when the store does not exist yet).

    With `model_id` and `sampling_version`, only the files that can hold their answers: that model's folder
    and files at the top of the store; other models' folders are not even listed, however large they grow.
    """
    base = lake.dataset_path(STORE_DATASET)
    if not lake.fs.exists(base):
        return []
    if model_id is None:
        found = lake.fs.find(base)
    else:
        folder = lake.dataset_path(_model_folder(model_id, sampling_version))
        found = [p for p in lake.fs.ls(base, detail=False) if lake.fs.isfile(p)]
        found += lake.fs.find(folder) if lake.fs.exists(folder) else []
    files = []
    for path in found:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            files.append(path)
    return sorted(files)


def known_prompt_hashes(lake: Lake, model_id: str, sampling_version: str, among: set[str] | None = None) -> set[str]:
    """Prompt hashes that already have an answer from `model_id` under `sampling_version` (only those `among`, when
    given: a shard holds its own hashes, never the whole store's)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(among), pa.string()) if among is not None else None
    known: set[str] = set()
    for path in store_files(lake, model_id, sampling_version):
        try:
            with lake.fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=["prompt_hash", "model_id", "sampling_version"])
        except (KeyError, ValueError) as exc:  # pyarrow names the missing column; add the file
            raise ValueError(f"knowledge store shard {lake.uri_of(path)}: {exc}") from exc
        mask = pc.and_(pc.equal(table["model_id"], model_id), pc.equal(table["sampling_version"], sampling_version))
        if wanted is not None:
            mask = pc.and_(mask, pc.is_in(table["prompt_hash"], value_set=wanted))
        known.update(table.filter(mask)["prompt_hash"].to_pylist())
    return known


# ---------------------------------------------------------------- writing and reading answers (the runner)

# Columns of a store shard (docs/data_contracts.md); `truncated_prompt` marks answers to a cut prompt.
STORE_COLUMNS = ["prompt_hash", "model_id", "sampling_version", "text", "prompt_tokens", "completion_tokens",
                 "finish_reason", "created_dt", "truncated_prompt"]


def _model_id_folder(model_id: str) -> str:
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return f"{STORE_DATASET}/model_id={safe_model}"


def _model_folder(model_id: str, sampling_version: str) -> str:
    # One folder per model and sampling version keeps reads of one model cheap as the store grows.
    return f"{_model_id_folder(model_id)}/sampling_version={sampling_version}"


# ---------------------------------------------------------------- the weights behind a model_id

WEIGHTS_RECORD = "_weights.json"


class ModelIdentityError(RuntimeError):
    """`llm.engine.model_id` names other weights than those its cached answers came from."""


def check_model_weights(cfg: Config, lake: Lake) -> str | None:
    """The fingerprint of the configured LLM's weights (`weights_fingerprint`), checked against the one
    recorded for its `model_id`.

    Outputs, the model card and the manifest name the model by `model_id`, so new weights under an old id would
    make them lie: the first plan of an id records its weights' fingerprint, and a later plan whose weights
    differ stops, naming both. None where the weights are neither a local folder nor declared (a hosted model):
    the id is all there is to go by.
    """
    import datetime as dt

    fingerprint = weights_fingerprint(cfg)
    if fingerprint is None:
        return None
    folder = cfg.resolve(cfg.llm.engine.model_path)
    source = "llm.engine.weights_fingerprint" if cfg.llm.engine.weights_fingerprint else str(folder)
    model_id = cfg.llm.engine.model_id
    relpath = f"{_model_id_folder(model_id)}/{WEIGHTS_RECORD}"
    record = lake.read_json(relpath)
    if record is None:
        lake.write_json(relpath, {"model_id": model_id, "fingerprint": fingerprint, "model_path": source,
                                  "recorded_at": dt.datetime.now(dt.UTC).isoformat()})
    elif record["fingerprint"] != fingerprint:
        raise ModelIdentityError(
            f"llm.engine.model_id {model_id!r} already names other weights: answers were cached under it for "
            f"{record['model_path']} (fingerprint {record['fingerprint'][:12]}, recorded {record['recorded_at']}), "
            f"but {source} now has fingerprint {fingerprint[:12]}. Give these weights a model_id of their own "
            f"(the knowledge cache is keyed by it), or put the old weights back ({lake.uri_of(lake.dataset_path(relpath))}).")
    return fingerprint


def store_table(rows):
    """A store shard table with the contract's column types, from a DataFrame or a list of dicts."""
    import pandas as pd
    import pyarrow as pa

    df = pd.DataFrame(rows, columns=STORE_COLUMNS) if not isinstance(rows, pd.DataFrame) else rows[STORE_COLUMNS]
    schema = pa.schema([("prompt_hash", pa.string()), ("model_id", pa.string()), ("sampling_version", pa.string()),
                        ("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                        ("finish_reason", pa.string()), ("created_dt", pa.string()), ("truncated_prompt", pa.bool_())])
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


def write_parquet_atomically(lake: Lake, relpath: str, table) -> str:
    """Write `table` to `<lake>/<relpath>` so readers see the whole file or none (dot-named temp, then rename)."""
    import uuid

    import pyarrow.parquet as pq

    path = f"{lake.root}/{relpath}"
    folder, name = path.rsplit("/", 1)
    lake.fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
    with lake.fs.open(tmp, "wb") as fh:
        pq.write_table(table, fh)
    lake.fs.mv(tmp, path)
    return path


def write_store_shard(lake: Lake, model_id: str, sampling_version: str, name: str, rows) -> str:
    """Append one finished shard of answers to the store as `<model folder>/<name>.parquet`."""
    return write_parquet_atomically(lake, f"{_model_folder(model_id, sampling_version)}/{name}.parquet", store_table(rows))


def read_answers(lake: Lake, model_id: str, sampling_version: str, prompt_hashes=None):
    """Answers of `model_id` under `sampling_version` (one row per prompt_hash), optionally only some hashes."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(set(prompt_hashes)), pa.string()) if prompt_hashes is not None else None
    tables = []
    for path in store_files(lake, model_id, sampling_version):
        with lake.fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        missing = [c for c in ("prompt_hash", "model_id", "sampling_version", "text") if c not in table.column_names]
        if missing:
            raise ValueError(f"knowledge store shard {lake.uri_of(path)}: missing columns {missing}")
        mask = pc.and_(pc.equal(table["model_id"], model_id), pc.equal(table["sampling_version"], sampling_version))
        if wanted is not None:
            mask = pc.and_(mask, pc.is_in(table["prompt_hash"], value_set=wanted))
        table = table.filter(mask)
        for col in STORE_COLUMNS:  # shards written by older code may lack added columns
            if col not in table.column_names:
                table = table.append_column(col, pa.nulls(len(table)))
        tables.append(table.select(STORE_COLUMNS).cast(store_table([]).schema))
    if not tables:
        return pd.DataFrame(columns=STORE_COLUMNS)
    df = pa.concat_tables(tables).to_pandas()
    # A shard re-published after a crash can repeat a hash: the answers are equivalent, keep one.
    return df.drop_duplicates("prompt_hash", keep="last").reset_index(drop=True)
