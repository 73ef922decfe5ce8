"""A benchmark killed with SIGTERM stops the ``lmpatch`` run it started instead of orphaning it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

PARENT = """
import sys
sys.path.insert(0, {bench!r})
from mass_editing import run_child
child = "import os, time; open({pidfile!r}, 'w').write(str(os.getpid())); time.sleep(120)"
run_child([sys.executable, "-c", child])
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_sigterm_to_a_benchmark_stops_its_child_run(tmp_path):
    pidfile, errors = tmp_path / "child.pid", tmp_path / "stderr"
    with errors.open("w") as err:  # a file, not a pipe: an orphaned child would hold a pipe open
        parent = subprocess.Popen([sys.executable, "-c", PARENT.format(bench=str(BENCHMARKS), pidfile=str(pidfile))],
                                  stderr=err)
    try:
        assert _wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60), "the child never started"
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        # the parent fails with the child's exit code instead of pretending the run finished
        assert parent.returncode != 0
        assert _wait_for(lambda: not _alive(child), 10), "the child run outlived its killed benchmark"
        assert "CalledProcessError" in errors.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
        if pidfile.exists() and pidfile.read_text() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
