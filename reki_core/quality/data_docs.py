"""Great Expectations Data Docs of one run date: every gate's suites and validation results as GX's own HTML site.

Each gate step keeps the GX validation results of its suites (`ExpectationSuiteValidationResult` JSON)
in `_runs/dt=D/gx_validations/<step>/` (`keep_validations`), then the site of the date is brought up to
date (`build_data_docs`): a fresh ephemeral GX context gets those results and their suites, and GX's
SiteBuilder renders `_runs/dt=D/data_docs/index.html` with one page per suite and per validation.
The docs are updated right after each gate, so a failing gate's results are in them before the run
stops: the first gate of a run builds the site whole, each later one renders only its own pages and
the index (GX's incremental build), written into the site pages first, index last. Landing clears
`_runs/dt=D/` at the start of each run, so the docs describe that run only.
Docs are a by-product: an error building them is logged loudly and never changes a gate's verdict.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import uuid
from typing import Any

from reki_core.quality.gx import ephemeral_context, safe_name
from reki_core.storage.lake import Lake, as_date

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

logger = logging.getLogger(__name__)

VALIDATIONS_DIR = "gx_validations"
DATA_DOCS_DIR = "data_docs"
SITE_NAME = "reki_run"
# GX tutorial pictures and fonts (about 3.5 MB) are left out: the pages fall back to system fonts.
_SKIPPED_STATIC = ("static/fonts/", "static/images/iterative-dev-loop.png", "static/images/glossary_scroller.gif",
                   "static/images/validation_failed_unexpected_values.gif")


def runs_path(day: str | dt.date, *parts: str) -> str:
    """Lake-relative path inside the run folder of `day`."""
    return "/".join([f"_runs/dt={as_date(day).isoformat()}", *parts])


def keep_validations(lake: Lake, day: str | dt.date, step: str, results: list) -> str | None:
    """Store the GX validation results of one gate step (replacing that step's earlier ones), update the docs.

    `results` are `GateResult`s. Returns the URI of the docs' index.html, or None when keeping or
    building failed: that is logged as an error and the gate's own verdict is left untouched.
    """
    try:
        folder = f"{lake.root}/{runs_path(day, VALIDATIONS_DIR, safe_name(step))}"
        rerun = lake.fs.exists(folder)
        if rerun:  # a re-run of the step replaces its results
            lake.fs.rm(folder, recursive=True)
        for result in results:
            for validation in result.validations:
                name = safe_name(validation["result"]["suite_name"])
                lake.write_json(runs_path(day, VALIDATIONS_DIR, safe_name(step), f"{name}.json"),
                                {"step": step, "gate": result.gate, "dataset": result.dataset, **validation})
        # A re-run's earlier pages leave the site only with a whole build.
        uri = build_data_docs(lake, day, step=None if rerun else step)
        for result in results:
            result.data_docs = uri
        return uri
    except Exception:  # noqa: BLE001 - the docs must never decide a gate
        logger.exception("GX Data Docs of step '%s' for dt=%s were NOT written (the gate's result stands; "
                         "rebuild with reki_core.quality.data_docs.build_data_docs)", step, as_date(day))
        return None


def stored_validations(lake: Lake, day: str | dt.date) -> list[dict[str, Any]]:
    """Every kept validation of `day`, in the order the gates ran."""
    folder = f"{lake.root}/{runs_path(day, VALIDATIONS_DIR)}"
    if not lake.fs.exists(folder):
        return []
    paths = sorted(p for p in lake.fs.find(folder) if p.endswith(".json"))
    stored = [lake.read_json(p[len(lake.root) + 1:]) for p in paths]
    return sorted(stored, key=lambda s: s["validated_at"])


def _annotate(result, dataset: str) -> None:
    """Name the dataset (GX shows a data frame's asset as None) and note each expectation's type and severity:
    GX renders prose only, while alerts and run logs name the type."""
    result.meta["batch_kwargs"] = {"data_asset_name": dataset}
    for r in result.results:
        config = r.expectation_config
        severity = (config.meta or {}).get("severity", "fail")
        config.notes = [f"`{config.type}`",
                        "warn only: reported, does not stop the run" if severity == "warn" else "a failure stops the run"]


def _suite_of(result) -> Any:
    """The expectation suite a validation result was run with (its page in the docs)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    suite = gx.ExpectationSuite(name=result.suite_name)
    for r in result.results:
        config = r.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        suite.add_expectation_configuration(
            ExpectationConfiguration(type=config.type, kwargs=kwargs, meta=config.meta, notes=config.notes))
    return suite


def _render_site(validations: list[dict[str, Any]], day: dt.date, site_dir: str, step: str | None = None) -> None:
    """Render `validations` with GX's SiteBuilder into the local folder `site_dir`: every page, or with `step` only
    that step's validations and suites (and the index, which lists them all)."""
    from great_expectations.core.expectation_validation_result import expectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = ephemeral_context()  # a fresh one: only this date's results end up in the site
    rendered: list = []  # with `step`: the resources whose pages are rendered
    context.add_data_docs_site(SITE_NAME, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": site_dir},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    for stored in validations:
        result = expectationSuiteValidationResultSchema.load(stored["result"])
        _annotate(result, stored["dataset"])
        if result.suite_name not in {s.name for s in context.suites.all()}:
            context.suites.add(_suite_of(result))
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
            run_id=RunIdentifier(run_name=stored["step"],
                                 run_time=dt.datetime.fromisoformat(stored["validated_at"])),
            batch_identifier=safe_name(stored["dataset"]),
        )
        context.validation_results_store.set(key, result)
        if stored["step"] == step:
            rendered += [key, key.expectation_suite_identifier]
    context.build_data_docs(site_names=[SITE_NAME], resource_identifiers=rendered or None)


def build_data_docs(lake: Lake, day: str | dt.date, step: str | None = None) -> str:
    """Render every kept validation of `day` into `_runs/dt=D/data_docs/`; returns index.html's URI. The site is
    replaced whole, or, with `step` and a site already holding every other step's validations, only `step`'s pages
    and the index are rendered and written into it (pages first: the index never links a page not written yet).

    Raises FileNotFoundError when no gate of `day` has kept results, RuntimeError when GX wrote no index.
    """
    day = as_date(day)
    validations = stored_validations(lake, day)
    if not validations:
        raise FileNotFoundError(f"no GX validation results under {lake.uri_of(f'{lake.root}/{runs_path(day, VALIDATIONS_DIR)}')}"
                                f": no gate has run for dt={day} since landing")
    final = f"{lake.root}/{runs_path(day, DATA_DOCS_DIR)}"
    index = f"{final}/index.html"
    site = [path[len(final) + 1:] for path in lake.fs.find(final)] if step is not None else []
    # Only onto a site with a page for each other step's validation (an earlier gate's build may have failed).
    incremental = "index.html" in site and (sum(page.startswith("validations/") for page in site)
                                            == sum(stored["step"] != step for stored in validations))
    with tempfile.TemporaryDirectory(prefix="reki-data-docs-") as site_dir:
        if incremental:
            # GX's index lists the pages of the folder it builds in: the site's pages are stood in for by empty files.
            for page in site:
                if page != "index.html" and not page.startswith("static/"):
                    os.makedirs(os.path.dirname(os.path.join(site_dir, page)), exist_ok=True)
                    open(os.path.join(site_dir, page), "wb").close()
        _render_site(validations, day, site_dir, step if incremental else None)
        if not os.path.exists(os.path.join(site_dir, "index.html")):
            raise RuntimeError(f"Great Expectations wrote no index.html for dt={day} into {site_dir}")
        files = sorted(_site_files(site_dir), key=lambda relative: relative == "index.html")
        if incremental:  # what GX rendered now; the site has its static assets already (GX copies them every time)
            rendered = [f for f in files if not f.startswith("static/") and os.path.getsize(os.path.join(site_dir, f))]
            _upload(lake, site_dir, rendered, final)
        else:
            # Write aside, then swap: readers never see a half-copied site.
            staging = f"{final}.staging-{uuid.uuid4().hex}"
            try:
                _upload(lake, site_dir, files, staging)
            except BaseException:
                if lake.fs.exists(staging):  # e.g. a full disk: no half-copied site left behind
                    lake.fs.rm(staging, recursive=True)
                raise
            lake.replace_folder(staging, final)
    logger.info("GX Data Docs of dt=%s: %d validations%s -> %s", day, len(validations),
                f" (step {step}'s pages and the index)" if incremental else "", lake.uri_of(index))
    return lake.uri_of(index)


def _site_files(site_dir: str) -> list[str]:
    """The site's files GX rendered, relative to `site_dir`, without the skipped static ones."""
    files = []
    for folder, _, names in os.walk(site_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), site_dir).replace(os.sep, "/")
            if not relative.startswith(_SKIPPED_STATIC):
                files.append(relative)
    return files


def _upload(lake: Lake, site_dir: str, files: list[str], target: str) -> None:
    """Copy `files` (relative to the local `site_dir`) under the lake folder `target`, in the order given."""
    for relative in files:
        lake.fs.makedirs(f"{target}/{relative}".rsplit("/", 1)[0], exist_ok=True)
        lake.fs.put_file(os.path.join(site_dir, relative), f"{target}/{relative}")
