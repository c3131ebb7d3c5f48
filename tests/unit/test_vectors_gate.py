"""The pre-publish gate on augmented vectors blocks incomplete, duplicated, wrong-size or non-finite vectors."""

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from reki_core.quality.gx import GateError
from reki_core.quality.vectors import gate_vectors

DAY = dt.date(2024, 1, 2)


def seed(lake, vectors: pd.DataFrame, users=("u1", "u2"), without_answer=()) -> None:
    """Users (and item i1) of the day; `without_answer`: users whose LLM call failed with nothing to fall back on."""
    lake.write_partition(pd.DataFrame({"user_id": list(users)}), "features/user_history", DAY)
    lake.write_partition(pd.DataFrame({"item_id": ["i1"]}), "features/items", DAY)
    assigned = [("user", u) for u in users if u not in without_answer] + [("item", "i1")]
    lake.write_partition(pd.DataFrame({"entity_kind": [k for k, _ in assigned], "entity_id": [e for _, e in assigned]}),
                         "knowledge/assigned", DAY)
    lake.write_partition(vectors, "vectors/augmented", DAY)


def vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1")), dim=32, value=0.5):
    return pd.DataFrame({"entity_kind": [k for k, _ in rows], "entity_id": [e for _, e in rows],
                         "vector": [np.full(dim, value, dtype=np.float32).tolist() for _ in rows],
                         "model_version": "m1"})


def test_complete_vectors_pass(cfg, lake):
    seed(lake, vectors())
    assert gate_vectors(cfg, DAY, lake)["success"] is True


@pytest.mark.parametrize("bad, column", [
    (vectors(rows=(("user", "u1"), ("item", "i1"))), "lost_vector"),
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


def test_only_entities_whose_llm_call_failed_may_go_without_a_vector(cfg, lake):
    users = [f"u{i}" for i in range(40)]
    rows = [("user", u) for u in users[1:]] + [("item", "i1")]
    seed(lake, vectors(rows=rows), users=users, without_answer=["u0"])  # 1 of 41 (< 5%) serves the fallback
    assert gate_vectors(cfg, DAY, lake)["success"] is True

    seed(lake, vectors(rows=rows), users=users)  # u0 had knowledge: its vector was lost on the way
    with pytest.raises(GateError) as err:
        gate_vectors(cfg, DAY, lake)
    assert "column 'lost_vector'" in str(err.value) and "user:u0" in str(err.value)
    assert "column 'has_vector'" not in str(err.value)  # within the fallback share: only the loss is named

    rows = [("user", u) for u in users[3:]] + [("item", "i1")]
    seed(lake, vectors(rows=rows), users=users, without_answer=users[:3])  # 3 of 41 LLM failures: over 5%
    with pytest.raises(GateError, match="column 'has_vector'"):
        gate_vectors(cfg, DAY, lake)


def test_the_vectors_are_read_in_batches_and_a_bad_one_in_a_later_batch_is_named(cfg, lake):
    from reki_core.quality.vectors import vector_facts

    one_row = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"batch_rows": 1})})
    rows = vectors()
    rows.at[2, "vector"] = [0.5] * 31 + [float("inf")]  # the last row, in the last batch of one
    seed(lake, rows)
    facts = vector_facts(lake, DAY, batch_rows=1)
    assert facts["dim"].tolist() == [32, 32, 32] and facts["finite"].tolist() == [True, True, False]
    with pytest.raises(GateError) as err:
        gate_vectors(one_row, DAY, lake)
    assert "column 'finite'" in str(err.value)
    seed(lake, vectors())
    assert gate_vectors(one_row, DAY, lake)["success"] is True
