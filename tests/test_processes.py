"""gradalign.processes: stopping this process's children leaves their exit to their owners."""

import multiprocessing
import signal
import subprocess
import sys
import time

import pytest

from gradalign import processes


@pytest.mark.slow
def test_stopped_children_keep_their_exit_status_for_their_owners():
    """psutil.wait_procs reaps the children it waits for: multiprocessing then takes a reaped
    worker for a live one (its ProcessPoolExecutor's thread, the call queue full, waited for
    it forever: study.py hung after its one SIGTERM line) and subprocess reads exit status 0."""
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    worker.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    # settled: every child but these two is multiprocessing's resource tracker, once it ignores
    # SIGTERM (stop_children leaves such children be)
    while len(children := processes.children()) < 3 or not all(
        c.pid in (worker.pid, child.pid) or signal.SIGTERM in processes._ignored(c)
        for c in children
    ):
        time.sleep(0.05)

    assert processes.stop_children(10.0) == []

    worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGTERM
    assert child.wait(timeout=10) == -signal.SIGTERM
