import os
import sys

# tests import the top-level modules (augvae, data, ...) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """In-process work shares 2 cores with subprocesses: 1 thread, like OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_when_logged():
    """Start `cmd`, wait until `log` (a path) contains `marker`, then kill -9 it: a real kill
    in the middle of training, right after a checkpoint was announced."""
    def run(cmd: list, log, marker: str, env: dict, cwd: str, timeout: float = 120):
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if log.exists() and marker in log.read_text():
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
    return run
