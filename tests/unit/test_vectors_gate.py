"""The pre-publish gate on augmented vectors blocks incomplete, duplicated, wrong-size or non-finite vectors."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from reki_core.quality.gx import GateError
from reki_core.quality.vectors import gate_vectors

DAY = dt.date(2024, 1, 2)


def seed(lake, vectors: pd.DataFrame) -> None:
    lake.write_partition(pd.DataFrame({"user_id": ["u1", "u2"]}), "features/user_history", DAY)
    lake.write_partition(pd.DataFrame({"item_id": ["i1"]}), "features/items", DAY)
    lake.write_partition(vectors, "vectors/augmented", DAY)


def vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1")), dim=32, value=0.5):
    return pd.DataFrame({"entity_kind": [k for k, _ in rows], "entity_id": [e for _, e in rows],
                         "vector": [np.full(dim, value, dtype=np.float32).tolist() for _ in rows],
                         "model_version": "m1"})


def test_complete_vectors_pass(cfg, lake):
    seed(lake, vectors())
    assert gate_vectors(cfg, DAY, lake)["success"] is True


@pytest.mark.parametrize("bad, column", [
    (vectors(rows=(("user", "u1"), ("item", "i1"))), "has_vector"),
    (vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1"), ("user", "u1"))), "key"),
    (vectors(dim=16), "dim"),
    (vectors(value=float("nan")), "finite"),
    (vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1"), ("item", "ghost"))), "expected"),
], ids=["missing-user", "duplicate", "wrong-dim", "nan", "unknown-entity"])
def test_bad_vectors_fail_naming_the_column(cfg, lake, bad, column):
    seed(lake, bad)
    with pytest.raises(GateError) as err:
        gate_vectors(cfg, DAY, lake)
    assert f"column '{column}'" in str(err.value)
    assert lake.read_json(f"_runs/dt={DAY}/vectors_gate.json")["success"] is False
