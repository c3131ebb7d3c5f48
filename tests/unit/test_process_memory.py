"""The process-tree peak sampler and the task-memory listener that reports it (bench/scale.py reads its XCom)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from reki_core.process_memory import ProcessTreePeak, tree_rss_mib

# A child that holds ~200 MiB (touched, so resident) for a second.
HOLD = "b = bytearray(200 * 2**20); [b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; import time; time.sleep(1.5)"


def test_the_peak_includes_a_child_process():
    before = tree_rss_mib(os.getpid())
    with ProcessTreePeak(interval_s=0.05) as peak:
        subprocess.run([sys.executable, "-c", HOLD], check=True)
    assert peak.peak_mib > before + 150, (before, peak.peak_mib)


def test_the_peak_is_never_below_the_process_own_maximum():
    import resource

    sampler = ProcessTreePeak(interval_s=10.0).start()  # samples once: the exact maximum still counts
    peak = sampler.stop()
    assert peak >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - 0.01


def test_a_gone_process_has_no_memory():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.1)
    assert tree_rss_mib(proc.pid) == 0.0


class _RecordingTaskInstance:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def test_the_listener_pushes_the_peak_of_a_successful_task():
    from reki_airflow import task_memory

    ti = _RecordingTaskInstance()
    before = tree_rss_mib(os.getpid())
    task_memory.on_task_instance_running(previous_state=None, task_instance=ti)
    subprocess.run([sys.executable, "-c", HOLD], check=True)
    task_memory.on_task_instance_success(previous_state=None, task_instance=ti)
    assert ti.pushed[task_memory.XCOM_KEY] > before + 150


def test_the_listener_pushes_nothing_for_a_failed_task():
    from reki_airflow import task_memory

    ti = _RecordingTaskInstance()
    task_memory.on_task_instance_running(previous_state=None, task_instance=ti)
    task_memory.on_task_instance_failed(previous_state=None, task_instance=ti, error=RuntimeError("boom"))
    assert ti.pushed == {}
    task_memory.on_task_instance_success(previous_state=None, task_instance=ti)  # no sampler left: nothing pushed
    assert ti.pushed == {}


def test_the_plugin_registers_the_listener():
    from reki_airflow import task_memory
    from reki_airflow.plugin import RekiPlugin

    assert task_memory in RekiPlugin.listeners
