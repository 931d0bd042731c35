"""train_vae.py as a user runs it: subprocess CLI runs, kill -9 and resume, two-process DDP."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import augvae
import data
import runtime
from conftest import kill_points

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a few seconds per run: 32 px shapes, batch 4, the small preset
TINY = ["--image-size", "32", "--batch-size", "4", "--train-size", "64", "--val-size", "8",
        "--grid-images", "4", "--log-every", "1"]


def run(args, timeout=240, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_vae.py"), *args], cwd=kw.get("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout, env=env)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "ml"
    r = run(["--ml", *TINY, "--max-steps", "6", "--eval-every", "3", "--ckpt-every", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_ml_then_sl_smoke(ml_run, tmp_path):
    for f in ("ckpt.pt", "best.pt", "log.txt", "config.json", "recon_000003.png", "recon_000006.png"):
        assert (ml_run / f).exists(), f
    c = ckpt(ml_run / "ckpt.pt")
    assert c["kind"] == "augvae" and c["step"] == 6 and not c["config"]["single_level"]
    log = (ml_run / "log.txt").read_text()
    assert "LPIPS is off" in log and "val_psnr" in log and "codebook usage" in log
    grid = Image.open(ml_run / "recon_000006.png")
    assert grid.height > 2 * 32 and grid.width >= 4 * 32  # inputs above, reconstructions below

    sl_out = tmp_path / "sl"
    best = ckpt(ml_run / "best.pt")  # the best validation loss, a model-only checkpoint
    assert best["kind"] == "augvae" and best["step"] in (3, 6) and "optimizer" not in best
    r = run(["--sl", "--init", str(ml_run / "best.pt"), *TINY, "--max-steps", "3", "--out", str(sl_out)])
    assert r.returncode == 0, r.stderr[-2000:]
    s = ckpt(sl_out / "ckpt.pt")
    assert s["config"]["single_level"] and s["step"] == 3
    model = augvae.AugVAE(augvae.AugVAEConfig.from_dict(s["config"]))
    model.load_state_dict(s["model"])
    # the encoders came from the ML run (then fine-tuned 3 steps: close, not equal)
    ml_w, sl_w = best["model"]["enc.0.conv_in.weight"], s["model"]["enc.0.conv_in.weight"]
    assert not torch.equal(ml_w, sl_w) and torch.allclose(ml_w, sl_w, atol=0.05)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.eval().encode(x).shape == (2, 4, 4)  # 32 px / 8


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """40 uninterrupted ML steps that halve the lr at a plateau and end in a 12-step warmdown."""
    out = tmp_path_factory.mktemp("vae_full") / "full"
    r = run([*KILL_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


KILL_ARGS = ["--ml", *TINY, "--max-steps", "40", "--eval-every", "4", "--ckpt-every", "4", "--plateau-patience", "1",
             "--warmdown-steps", "12", "--lr", "1e-2"]


@pytest.mark.parametrize("where", ["warmdown", "plateau"])
def test_kill_and_resume_equals_uninterrupted_run(full_run, where, tmp_path, kill_when_logged):
    """kill -9 right after a checkpoint inside the warmdown, or right after the checkpoint that
    follows a plateau halving; the resumed run ends bitwise where the uninterrupted one did
    (both cases resumed with the wrong base rate when it was read back from the optimizer)."""
    text = (full_run / "log.txt").read_text()
    lrs = {int(l.split()[1]): float(l.split(" lr ")[1].split()[0]) for l in text.splitlines() if l.startswith("step ")}
    assert lrs[40] < 0.2 * lrs[28]  # the warmdown: towards --min-lr over the last 12 steps
    at = kill_points(text, 40 - 12)[where]
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    kill_when_logged([sys.executable, os.path.join(ROOT, "train_vae.py"), *KILL_ARGS, "--out", str(cut)],
                     cut / "log.txt", f"saved checkpoint step {at} to ", env, ROOT)
    killed_at = ckpt(cut / "ckpt.pt")["step"]  # loads: the file was never half-written
    assert at <= killed_at < 40, "the run finished before the kill; make it longer"

    r = run(["--resume", "--out", str(cut)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = ckpt(full_run / "ckpt.pt"), ckpt(cut / "ckpt.pt")
    assert a["step"] == b["step"] == 40
    assert_same_state(a["model"], b["model"])  # bitwise, codebook buffers included
    assert a["lr"] == b["lr"] and a["best_val"] == b["best_val"] and a["bad_evals"] == b["bad_evals"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert "resuming" in (cut / "log.txt").read_text()


def test_resume_of_a_checkpoint_older_than_a_setting(ml_run, tmp_path):
    """A checkpoint written before a flag existed resumes with that flag's default."""
    out = tmp_path / "old"
    out.mkdir()
    c = ckpt(ml_run / "ckpt.pt")
    del c["train"]["warmdown_steps"]
    runtime.save_checkpoint(c, out / "ckpt.pt")
    r = run(["--resume", "--out", str(out), "--max-steps", "7"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ckpt(out / "ckpt.pt")["step"] == 7


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "ddp_train_vae.py"),
           "--ml", *TINY, "--max-steps", "4", "--eval-every", "2", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_state(s0, s1)  # weights AND the EMA codebook statistics
    levels = augvae.preset("small").num_levels
    assert int(s0["quantizer.updates"]) == levels * 4  # one EMA update per level per step, 4 steps
    saved = ckpt(out / "ckpt.pt")
    assert_same_state(saved["model"], s0)
    assert "2 process(es)" in (out / "log.txt").read_text()


def test_image_folder_with_a_corrupt_file_is_skipped(tmp_path):
    folder = tmp_path / "imgs" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "run"
    r = run(["--ml", *TINY, "--data", str(tmp_path / "imgs"), "--val-fraction", "0.25", "--max-steps", "3",
             "--workers", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.jpg" in r.stderr  # warned, not fatal
    assert (out / "ckpt.pt").exists()


def test_bf16_autocast_on_cpu_and_codebook_size(tmp_path):
    out = tmp_path / "bf16"
    r = run(["--ml", *TINY, "--max-steps", "3", "--eval-every", "3", "--dtype", "bfloat16", "--codebook-size", "64",
             "--device", "cpu", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    c = ckpt(out / "ckpt.pt")
    assert c["config"]["codebook_size"] == 64 and c["train"]["dtype"] == "bfloat16"
    # autocast computes in bf16 but keeps the weights, the codebook and its EMA statistics fp32
    assert all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in c["model"].values())
    assert c["model"]["quantizer.embed"].shape == (64, augvae.preset("small").z_channels)
    steps = [l for l in (out / "log.txt").read_text().splitlines() if l.startswith("step ")]
    losses = [float(l.split(" loss ")[1].split()[0]) for l in steps]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("args, message", [
    (["--sl"], "--sl needs --init"),
    (["--sl", "--init", "nowhere.pt"], "nowhere.pt: no such file"),
    ([], "say which stage"),
    (["--ml", "--resume", "--out", "nowhere"], "no checkpoint at"),
    (["--ml", "--data", "no/such/folder"], "no such folder"),
    (["--ml", "--dtype", "float8"], "--dtype"),
    (["--ml", "--preset", "huge"], "unknown AugVAE preset"),
    (["--ml", "--lpips-vgg", "x.pth"], "needs both"),
    (["--ml", "--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device"),
    (["--ml", "--codebook-size", "-3"], "codebook_size must be >= 1, got -3"),
    (["--ml", "--warmdown-steps", "-1"], "--warmdown-steps must be >= 0, got -1"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    r = run([*args, "--max-steps", "1"], cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_wrong_checkpoints_are_refused(ml_run, tmp_path):
    sl = tmp_path / "sl"
    r = run(["--sl", "--init", str(ml_run / "ckpt.pt"), *TINY, "--max-steps", "1", "--out", str(sl)])
    assert r.returncode == 0, r.stderr
    r = run(["--sl", "--init", str(sl / "ckpt.pt"), "--max-steps", "1"], cwd=tmp_path)
    assert r.returncode == 2 and "already a single-level" in r.stderr
    other = tmp_path / "other.pt"
    torch.save({"kind": "biart", "config": {}, "model": {}}, other)
    r = run(["--sl", "--init", str(other)], cwd=tmp_path)
    assert r.returncode == 2 and "'biart' checkpoint, expected 'augvae'" in r.stderr
    newer = tmp_path / "newer.pt"
    c = ckpt(ml_run / "ckpt.pt")
    c["format_version"] = 99
    torch.save(c, newer)
    r = run(["--sl", "--init", str(newer)], cwd=tmp_path)
    assert r.returncode == 2 and "newer" in r.stderr
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "augvae", "config": {}, "model": {}, "x": data.ShapesDataset}, evil)  # a pickled class
    r = run(["--sl", "--init", str(evil)], cwd=tmp_path)
    assert r.returncode == 2 and "not a loadable weights file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
