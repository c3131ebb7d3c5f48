"""`reki summary`: what `make run` prints at the end of a run."""

from __future__ import annotations

import datetime as dt

from click.testing import CliRunner

from reki_core.cli import main
from reki_core.runlog import record_step
from reki_core.storage.lake import Lake

DAY = dt.date(1998, 3, 31)


def _run(tmp_path, monkeypatch):
    monkeypatch.setenv("REKI__PATHS__LAKE_URI", str(tmp_path / "lake"))
    monkeypatch.setenv("REKI__PATHS__STATE_DIR", str(tmp_path / "state"))
    return CliRunner().invoke(main, ["summary", "--dt", DAY.isoformat()])


def test_summary_prints_steps_the_published_uri_and_the_data_docs(tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake"))
    record_step(lake, DAY, "land", {"success": True, "rows_today": 2217, "seconds": 1.5})
    record_step(lake, DAY, "publish", {"success": True, "uri": "s3://b/movielens/vectors/v=x/", "latest_moved": True})
    result = _run(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "rows_today=2217" in result.output and "s3://b/movielens/vectors/v=x/" in result.output
    assert "Data Docs" not in result.output  # none were built for this run

    docs = tmp_path / "lake" / "_runs" / f"dt={DAY}" / "data_docs" / "index.html"
    docs.parent.mkdir(parents=True)
    docs.write_text("<html></html>")
    result = _run(tmp_path, monkeypatch)
    assert f"_runs/dt={DAY}/data_docs/index.html" in result.output.replace("\n", "")


def test_summary_of_a_date_that_never_ran_says_where_it_looked(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch)
    assert result.exit_code != 0 and "no run records for 1998-03-31" in result.output
