"""The run's GX Data Docs travel into the published version the way the DAG's publish task sends the report."""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from published_vectors import fresh_bucket_config, reader, writer

from reki_core.quality.gx import suite_name
from reki_core.quality.vectors import gate_vectors
from reki_core.storage import publish
from reki_core.storage.lake import Lake, as_date
from reki_core.storage.s3_access import ObjectStore, resolve_s3_access
from spark_jobs.common import jobs_named, run_jobs

pytestmark = pytest.mark.integration

DAY = "1998-03-31"
MODEL = "1998-03-31-dcnv2-abc"


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)


def test_data_docs_archive_is_published_beside_the_version_and_listed_in_the_manifest(tmp_path, seaweed, spark):
    cfg = fresh_bucket_config(tmp_path, seaweed)
    lake = Lake(cfg.lake_uri)
    users, items = ["u0", "u1"], ["i0", "i1", "i2"]
    lake.write_partition(pd.DataFrame({"user_id": users}), "features/user_history", DAY)
    lake.write_partition(pd.DataFrame({"item_id": items}), "features/items", DAY)
    lake.write_partition(pd.DataFrame({
        "entity_kind": ["user"] * 2 + ["item"] * 3, "entity_id": users + items,
        "vector": [np.full(cfg.model.expert_output_dim, 0.1, dtype=np.float32) for _ in range(5)],
        "model_version": MODEL}), "vectors/augmented", DAY)
    lake.write_partition(pd.DataFrame({"entity_kind": ["user"] * 2 + ["item"] * 3, "entity_id": users + items}),
                         "knowledge/assigned", DAY)
    registry = Path(lake.root) / f"models/registry/{MODEL}"
    registry.mkdir(parents=True)
    (registry / "adaptor.pt").write_bytes(b"adaptor-state")
    (registry / "model_card.json").write_text(json.dumps({"test": {"with_knowledge": {"auc": 0.74}}}))
    run_jobs(spark, jobs_named(["vectors_checks"]), cfg, lake, as_date(DAY))  # the DAG's vectors_checks task
    assert gate_vectors(cfg, DAY, lake)["success"]

    # The DAG's publish task: every file the report wrote goes beside the version, and none stays on this host.
    scratch = f"reki-report-{DAY}-"
    result = publish.publish_with_report(cfg, DAY, "manual__1", **writer(seaweed))
    assert not [p for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(scratch)]
    assert {f"run_report_{DAY}.{ext}" for ext in ("md", "html", "json")} <= set(result["manifest"]["files"])
    archive = f"run_report_{DAY}_data_docs.zip"
    manifest = result["manifest"]
    assert archive in manifest["run_report_files"] and archive in manifest["files"]

    store = ObjectStore(resolve_s3_access(cfg, **reader(seaweed)))
    body, _ = store.get(manifest["files"][archive]["key"])
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        index = zf.read("data_docs/index.html").decode()
    assert suite_name("vectors", f"vectors/augmented/dt={DAY}") in index
    markdown, _ = store.get(manifest["files"][f"run_report_{DAY}.md"]["key"])
    assert f"packed as [{archive}]({archive})" in markdown.decode()
