"""MovieLens-100K, obtained at set-up from the `recbole==1.2.1` wheel (its licence forbids redistribution).

`obtain()` downloads the wheel with pip, extracts `dataset_example/ml-100k/ml-100k.{inter,item,user}`,
checks the row counts and caches the files under the git-ignored data folder.
`load()` returns the three frames in the raw schema (see `reki_core.datasets.schema`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from reki_core.datasets.schema import normalise_interactions, normalise_items, normalise_users

RECBOLE_SPEC = "recbole==1.2.1"
_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
EXPECTED_ROWS = {"ml-100k.inter": 100_000, "ml-100k.user": 943, "ml-100k.item": 1_682}


class DatasetError(RuntimeError):
    """The dataset could not be obtained or does not look as expected."""


def _count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in fh) - 1  # minus the header line


def check_counts(folder: Path) -> None:
    for name, expected in EXPECTED_ROWS.items():
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{path}: missing")
        found = _count_rows(path)
        if found != expected:
            raise DatasetError(f"{path}: expected {expected} rows, found {found}")


def obtain(data_dir: Path) -> Path:
    """The cached ml-100k folder, downloading the recbole wheel first if needed."""
    target = data_dir / "ml-100k"
    if all((target / f).is_file() for f in FILES):
        check_counts(target)
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE_SPEC, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if result.returncode != 0 or not wheels:
            raise DatasetError(f"could not download {RECBOLE_SPEC} with pip: {result.stderr.strip()[-500:]}")
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as whl:
            for name in FILES:
                with whl.open(_MEMBER_DIR + name) as src, (staging / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        check_counts(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # appears whole or not at all
    return target


def load(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(interactions, users, items) in the raw schema."""
    inter = pd.read_csv(folder / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = ["user_id", "item_id", "rating", "ts"]
    inter["rating"] = inter["rating"].astype(float).astype("int32")
    inter["ts"] = inter["ts"].astype(float).astype("int64")

    users = pd.read_csv(folder / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    users.columns = ["user_id", "age", "gender", "occupation", "zip_code"]
    users["age"] = users["age"].astype("int32")

    items = pd.read_csv(folder / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    items.columns = ["item_id", "title", "year", "genres"]
    items["year"] = pd.to_numeric(items["year"], errors="coerce").astype("Int32")
    items["genres"] = items["genres"].map(lambda s: [g for g in s.split(" ") if g])
    return normalise_interactions(inter), normalise_users(users), normalise_items(items)
