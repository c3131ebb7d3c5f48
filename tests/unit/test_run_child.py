"""`run_child`: how a shard runs in the GPU venv's Python (`llm.engine.python`), as a process group."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from reki_core.llm.runner import run_child

# A stand-in for `python -m reki_core.llm.extract_shard`: it starts a helper process of its own (as vLLM
# starts its engine), reports progress on stderr, then either finishes or hangs.
CHILD = textwrap.dedent("""
    import json, subprocess, sys, time
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(str(helper.pid))
    print("shard 3: 1/2 batches", file=sys.stderr, flush=True)
    if sys.argv[2] == "hang":
        time.sleep(600)
    if sys.argv[2] == "silent":
        sys.exit(0)
    if sys.argv[2] == "fail":
        print("CUDA out of memory", file=sys.stderr, flush=True)
        sys.exit(3)
    print(json.dumps({"shard_id": 3, "calls": 2}))
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a killed child not yet reaped by its dead parent's reaper: a zombie
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _run(tmp_path, mode: str) -> str:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return run_child([sys.executable, str(script), str(tmp_path / "helper.pid"), mode], tmp_path, dict(os.environ),
                     "extraction shard 3")


def test_result_comes_back_progress_is_forwarded_and_nothing_is_left_running(tmp_path, capfd):
    assert json.loads(_run(tmp_path, "ok").strip().splitlines()[-1]) == {"shard_id": 3, "calls": 2}
    assert "shard 3: 1/2 batches" in capfd.readouterr().err
    assert _wait_gone(int((tmp_path / "helper.pid").read_text())), "the child's helper outlived the shard"


def test_a_failed_child_names_the_shard_and_shows_its_last_words(tmp_path):
    with pytest.raises(RuntimeError, match=r"extraction shard 3 failed \(exit 3\)") as err:
        _run(tmp_path, "fail")
    assert "CUDA out of memory" in str(err.value)
    assert _wait_gone(int((tmp_path / "helper.pid").read_text()))


class FakeTaskTimeout(Exception):
    """What Airflow's execution_timeout raises in the task's main thread (from SIGALRM)."""


def test_a_timed_out_task_takes_the_child_and_its_helpers_down(tmp_path):
    def on_alarm(signum, frame):
        raise FakeTaskTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(3)
    try:
        with pytest.raises(FakeTaskTimeout):
            _run(tmp_path, "hang")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert _wait_gone(int((tmp_path / "helper.pid").read_text())), "a timed-out shard left its helper holding the GPU"


def test_a_task_told_to_stop_takes_the_child_down_even_when_its_handler_does_not_raise(tmp_path):
    """Airflow's SIGTERM handler (a task killed from the UI) only calls on_kill and returns; SIGKILL follows
    5 s later, to the task's process group only. The shard's group must be gone before that."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # like Airflow's
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    guard = signal.signal(signal.SIGALRM, _fail_after_waiting)
    signal.alarm(60)  # a child that ignores the stop hangs for 10 min: fail in one instead
    try:
        with pytest.raises(RuntimeError, match=r"exit -9"):  # the child died of the group's SIGKILL
            _run(tmp_path, "hang")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, guard)
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]  # the task's own handler still ran
    assert _wait_gone(int((tmp_path / "helper.pid").read_text()))


def _fail_after_waiting(signum, frame):
    raise AssertionError("SIGTERM did not stop the child")


def test_the_child_dies_with_a_task_killed_outright(tmp_path):
    """SIGKILL (the OOM killer) runs no handler: the kernel kills the child when its parent dies."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent(f"""
        import os, sys
        from reki_core.llm.runner import run_child
        run_child([sys.executable, {str(script)!r}, {str(tmp_path / "helper.pid")!r}, "hang"], {str(tmp_path)!r},
                  dict(os.environ), "shard")
    """))
    proc = subprocess.Popen([sys.executable, str(task)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "helper.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = next(c for c in psutil.Process(proc.pid).children())
        proc.kill()
        proc.wait()
        assert _wait_gone(child.pid), "the shard's child outlived its killed task"
    finally:
        proc.kill()
        try:  # the child's own helper: the kernel's signal reaches the direct child only
            os.kill(int((tmp_path / "helper.pid").read_text()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def test_a_child_that_writes_no_result_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="exited 0 but wrote no result"):
        _run(tmp_path, "silent")
