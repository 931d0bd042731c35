"""Run train_gpt.main under torchrun, then save this rank's final model state to
OUT/rank{RANK}.pt so the test can compare ranks bit for bit."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402

model = train_gpt.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
