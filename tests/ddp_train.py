"""Run a trainer's main under torchrun: `ddp_train.py train_vae|train_gpt ARGS`, then save this
rank's final model state to OUT/rank{RANK}.pt so the test can compare ranks bit for bit. Runs
separated by `--then` go one after another in the same processes (torchrun's start-up, most of
a short run's time on 2 cores, is paid once); each writes its own OUT/rank{RANK}.pt. Then the
process ends at once (os._exit: the interpreter's teardown of torch and gloo takes another
second); a run that raises ends as usual, with its traceback and exit status 1.

Each run must have let go of its DistributedDataParallel wrapper by the time it destroys the
process group (runtime.end_training): a wrapper freed after that can hang the rank for good in
gloo's teardown. A live wrapper there fails the run, every time, not one launch in ten."""

import gc
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp_launch import fresh_rendezvous, runs  # noqa: E402

destroy_process_group = torch.distributed.destroy_process_group


def destroy_after_the_wrapper(*args, **kw):
    if any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
        raise RuntimeError("destroy_process_group with a DistributedDataParallel wrapper still alive")
    return destroy_process_group(*args, **kw)


torch.distributed.destroy_process_group = destroy_after_the_wrapper

if sys.argv[1] not in ("train_vae", "train_gpt"):
    sys.exit(f"ddp_train.py: the first argument names the trainer (train_vae or train_gpt), got {sys.argv[1]!r}")
trainer = importlib.import_module(sys.argv[1])
for i, args in enumerate(runs(sys.argv[2:])):
    if i:
        fresh_rendezvous(i)
    model = trainer.main(args)
    out = args[args.index("--out") + 1]
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
