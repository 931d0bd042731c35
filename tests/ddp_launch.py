"""Two-process torchrun (gloo on CPU) for the DDP tests: the command line, the launchers'
`--then` (several runs, one after another, in one launch), and kill -9 of a whole launch."""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(launcher: str, args: list, procs: int = 2) -> list:
    """The command that runs tests/`launcher` (ddp_train.py TRAINER) on `procs` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            os.path.join(ROOT, "tests", launcher), *args]


def runs(argv: list) -> list:
    """A launcher's arguments -> the runs' argument lists (separated by `--then`)."""
    out = [[]]
    for a in argv:
        out.append([]) if a == "--then" else out[-1].append(a)
    return out


def fresh_rendezvous(run: int) -> None:
    """In a rank, before run `run` (> 0) of a launch: its init_process_group keys the rendezvous
    under a prefix of its own in torchrun's store (the agent's, up for the whole launch). With
    the keys the run before left there (the same names: destroy_process_group starts the group
    count again) a second run's init hung, now and then, for good."""
    import torch.distributed as dist
    init = getattr(dist.init_process_group, "original", dist.init_process_group)

    def init_process_group(backend=None, **kw):
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        return init(backend, store=dist.PrefixStore(f"run{run}/", store), rank=int(os.environ["RANK"]),
                    world_size=int(os.environ["WORLD_SIZE"]), **kw)
    init_process_group.original = init
    dist.init_process_group = init_process_group


def launch(launcher: str, args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(launcher, args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def descendants(pid: int) -> list:
    """Every live process below `pid` (torchrun starts its ranks in sessions of their own, so
    a kill of its process group would not reach them)."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


def kill_when_logged(cmd: list, log, marker: str, stderr_path=None, env: dict | None = None, cwd: str = ROOT,
                     timeout: float = 300) -> None:
    """Start `cmd`, wait until `log` (a path) contains `marker`, then SIGKILL it and every process
    below it at once: a machine that dies in the middle of training, right after a checkpoint was
    announced. It waits for the marker, not for a clock; a run that ends (or outlasts `timeout`)
    without logging it fails the test. stderr goes to a file (a full pipe would stall the ranks)."""
    import tempfile
    import pytest
    if stderr_path is None:
        stderr_path = os.path.join(tempfile.mkdtemp(), "stderr.txt")
    with open(stderr_path, "wb") as err:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, env=env or ENV)
    deadline = time.time() + timeout
    try:
        while not (log.exists() and marker in log.read_text()):
            if p.poll() is not None or time.time() > deadline:
                tail = open(stderr_path, errors="replace").read()[-1500:]
                pytest.fail(f"{marker!r} never logged (exit {p.poll()}): {tail}")
            time.sleep(0.01)
    finally:
        for pid in [*descendants(p.pid), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


def kill_launch_when_logged(launcher: str, args: list, log, marker: str, stderr_path, timeout: float = 300) -> None:
    """kill_when_logged for a two-process torchrun of tests/`launcher` (torchrun and its ranks)."""
    kill_when_logged(torchrun(launcher, args), log, marker, stderr_path, timeout=timeout)


def assert_resume_matches(trainer: str, full, cut, steps: int, log_name: str) -> tuple:
    """Resume the killed two-process run in `cut` and check it ends bitwise where the
    uninterrupted one in `full` did: both ranks' final weights and buffers, the checkpoint's
    step, model, AdamW moments and every rank's RNG state. -> the two checkpoints."""
    import torch
    r = launch("ddp_train.py", [trainer, "--resume", "--out", str(cut)])
    assert r.returncode == 0, r.stderr[-3000:]
    want = torch.load(full / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(cut / f"rank{rank}.pt")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rank
    a, b = (torch.load(p / "ckpt.pt", map_location="cpu", weights_only=True) for p in (full, cut))
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))
    assert f"resuming {log_name} in {cut}" in (cut / "log.txt").read_text()
    return a, b
