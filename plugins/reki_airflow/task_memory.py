"""A listener that measures each task's peak memory: the resident set of the task's process tree (the task and
every subprocess it starts, an extraction shard's included), sampled while it runs.

The figure goes to the task's log and, for a task that succeeded, to its XCom `peak_rss_mib`, where an operator or
the scale benchmark (`bench/scale.py`) reads it through the REST API. Registered by `plugin.py`; the hooks run in
the task's own process.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

XCOM_KEY = "peak_rss_mib"
# A sample lists every process on the host (psutil builds the tree from /proc): at 10 a second that was about 8% of
# a DAG run's Python CPU. Twice a second still sees the children that matter (servers, shards, Python workers).
SAMPLE_INTERVAL_S = 0.5

log = logging.getLogger(__name__)
_sampler = None  # one task per process: the task runner's


@hookimpl
def on_task_instance_running(previous_state, task_instance) -> None:
    from reki_core.process_memory import ProcessTreePeak

    global _sampler
    _sampler = ProcessTreePeak(interval_s=SAMPLE_INTERVAL_S).start()


def _stop() -> float | None:
    global _sampler
    if _sampler is None:
        return None
    peak, _sampler = round(_sampler.stop(), 1), None
    log.info("peak RSS of the task's process tree: %.1f MiB", peak)
    return peak


@hookimpl
def on_task_instance_success(previous_state, task_instance) -> None:
    peak = _stop()
    if peak is not None:
        task_instance.xcom_push(key=XCOM_KEY, value=peak)


@hookimpl
def on_task_instance_failed(previous_state, task_instance, error) -> None:
    _stop()
