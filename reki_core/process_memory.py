"""Peak resident memory of a process tree (a process and every process it starts), sampled while it runs.

Used by the task-memory listener (each Airflow task's peak, in its log and its XCom) and by the benchmarks
(a server's peak). The process's own peak is exact (`ru_maxrss`); a tree's is sampled, so a child that lives
shorter than the interval can be missed.
"""

from __future__ import annotations

import os
import resource
import threading

import psutil

MIB = 2**20


def tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its descendants now (MiB); 0 when the process is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total / MIB


class ProcessTreePeak:
    """Samples `tree_rss_mib(pid)` every `interval_s` on a daemon thread; `peak_mib` is the highest seen."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.2):
        self.pid = pid or os.getpid()
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="process-tree-peak", daemon=True)

    def now_mib(self) -> float:
        return tree_rss_mib(self.pid)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.now_mib())
            self._stop.wait(self.interval_s)

    def start(self) -> "ProcessTreePeak":
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stops sampling; the peak in MiB (for this process, never below its exact `ru_maxrss`)."""
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.now_mib())
        if self.pid == os.getpid():
            self.peak_mib = max(self.peak_mib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return self.peak_mib

    def __enter__(self) -> "ProcessTreePeak":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
