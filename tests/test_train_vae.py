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
import train_vae
from conftest import cli, kill_points
from ddp_launch import assert_resume_matches, kill_launch_when_logged, launch

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


DDP_SL = [*TINY, "--grad-accum", "2", "--max-steps", "5", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One two-process launch, three runs in turn: 2 ML steps (ml/); 5 SL steps fine-tuned from
    them with --grad-accum 2 (sl/); the same SL run in cut/, killed with SIGKILL (torchrun and
    both ranks) right after its step-1 checkpoint. SL marks every code dead, and the ML steps
    leave the quantizer's step count at 2, so the first restart comes at its 10th step: SL
    micro-step 8, in step 4, after the kill and, in cut/, after the resume."""
    work = tmp_path_factory.mktemp("vae_ddp")
    ml, sl, cut = work / "ml", work / "sl", work / "cut"
    args = ["--ml", *TINY, "--max-steps", "2", "--eval-every", "2", "--out", str(ml),
            "--then", "--sl", "--init", str(ml / "ckpt.pt"), *DDP_SL, "--out", str(sl),
            "--then", "--sl", "--init", str(ml / "ckpt.pt"), *DDP_SL, "--out", str(cut)]
    kill_launch_when_logged("ddp_train.py", ["train_vae", *args], cut / "log.txt", "saved checkpoint step 1 to ",
                            work / "stderr.txt")
    return ml, sl, cut


def test_two_process_ddp_ml_keeps_ranks_identical(ddp_runs):
    ml = ddp_runs[0]
    s0, s1 = torch.load(ml / "rank0.pt"), torch.load(ml / "rank1.pt")
    assert_same_state(s0, s1)  # weights AND the EMA codebook statistics
    levels = augvae.preset("small").num_levels
    assert int(s0["quantizer.updates"]) == levels * 2  # one EMA update per level per step, 2 steps
    saved = ckpt(ml / "ckpt.pt")
    assert_same_state(saved["model"], s0)
    assert "2 process(es)" in (ml / "log.txt").read_text()


def test_two_process_ddp_sl_with_grad_accum_and_a_dead_code_restart_keeps_ranks_identical(ddp_runs):
    """SL under DDP with --grad-accum 2: every parameter and buffer bitwise equal on both ranks,
    after a restart_dead in which rank 0 drew the new codes (from its own batch, with its own
    RNG) and broadcast them."""
    sl = ddp_runs[1]
    s0, s1 = torch.load(sl / "rank0.pt"), torch.load(sl / "rank1.pt")
    assert_same_state(s0, s1)
    cfg = augvae.AugVAEConfig.from_dict(ckpt(sl / "ckpt.pt")["config"])
    assert cfg.single_level and cfg.restart_every == 10
    # 2 ML + 5 x 2 SL micro-steps: the 10th restarted every dead code (ml_to_sl marks them all
    # dead), so none is left unused for restart_after updates; unrestarted, most would be
    assert int(s0["quantizer.steps"]) == 12
    assert int((s0["quantizer.unused"] >= cfg.restart_after).sum()) == 0
    assert_same_state(ckpt(sl / "ckpt.pt")["model"], s0)
    log = (sl / "log.txt").read_text()
    assert "2 process(es)" in log and "batch 16" in log  # 4 per micro-step x 2 micro-steps x 2 ranks


def test_two_process_ddp_kill_and_resume_equals_uninterrupted_run(ddp_runs):
    """The SL run killed -9 after its step-1 checkpoint and resumed in two processes ends
    bitwise where the uninterrupted two-process run did, on both ranks: each rank restores
    its own RNG state, which draws the restart's codes (rank 0) after the resume."""
    _, sl, cut = ddp_runs
    killed_at = ckpt(cut / "ckpt.pt")["step"]  # loads: the file was never half-written
    assert 1 <= killed_at < 4, "the kill came after the dead-code restart (step 4): make the gap longer"
    assert_resume_matches("train_vae", sl, cut, 5, "AugVAE-SL")


def test_image_folder_with_a_corrupt_file_is_skipped(tmp_path):
    folder = tmp_path / "imgs" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "run"
    r = run(["--ml", *TINY, "--data", str(tmp_path / "imgs"), "--val-fraction", "0.25", "--max-steps", "3",
             "--workers", "1", "--out", str(out)])  # what the worker skips reaches the log
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [l for l in r.stderr.splitlines() if "skipping unreadable image" in l]
    assert len(warned) == 1 and "broken.jpg" in warned[0], r.stderr[-2000:]  # warned once, not fatal
    assert ckpt(out / "ckpt.pt")["step"] == 3
    log = (out / "log.txt").read_text()  # named when first met, then the totals by kind
    assert log.count("skipped ") == 1 and f"skipped {folder / 'broken.jpg'}: cannot load image" in log
    assert log.rstrip().splitlines()[-2] == "images: 1 skipped: undecodable image 1"


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
    (["--ml", "--recolour", "--data", "fashion-mnist"], "--recolour draws the built-in shapes"),
    (["--ml", "--shuffle-buffer", "0"], "--shuffle-buffer must be >= 1"),
    (["--ml", "--data", "nowhere/*.tar"], "error: nowhere/*.tar matches no file"),
    (["--ml", "--data", "nowhere/{0..1}.tar"], "--data: shard nowhere/0.tar: no such file (and 1 more)"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths as a user in that folder types them
    code, _, err = cli(lambda: train_vae.main([*args, "--max-steps", "1"]), capsys, "train_vae.py")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_vae.py: error: ") and message in lines[0], err
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_bad_input_from_the_shell(tmp_path):
    r = run(["--sl", "--max-steps", "1"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("train_vae.py: error: --sl needs --init"), r.stderr


def test_wrong_checkpoints_are_refused(ml_run, tmp_path, capsys, monkeypatch):
    sl = tmp_path / "sl"
    r = run(["--sl", "--init", str(ml_run / "ckpt.pt"), *TINY, "--max-steps", "1", "--out", str(sl)])
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other.pt"
    torch.save({"kind": "biart", "config": {}, "model": {}}, other)
    newer = tmp_path / "newer.pt"
    c = ckpt(ml_run / "ckpt.pt")
    c["format_version"] = 99
    torch.save(c, newer)
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "augvae", "config": {}, "model": {}, "x": data.ShapesDataset}, evil)  # a pickled class
    monkeypatch.chdir(tmp_path)
    for path, message in ((sl / "ckpt.pt", "already a single-level"), (other, "'biart' checkpoint, expected 'augvae'"),
                          (newer, "newer"), (evil, "not a loadable weights file")):
        code, _, err = cli(lambda: train_vae.main(["--sl", "--init", str(path), "--max-steps", "1"]), capsys,
                           "train_vae.py")
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (path, err)
    assert not (tmp_path / "out").exists()


# --- tar shards (img2dataset's webdataset output), streamed ----------------------------------

@pytest.fixture(scope="module")
def vae_shards(tmp_path_factory):
    """Four shards of 12 shapes each (32 px), one with a corrupt image, plus a cut-short fifth
    (its first members whole)."""
    from conftest import png_bytes, write_tar
    folder = tmp_path_factory.mktemp("vae_shards")
    shapes = data.ShapesDataset("train", 48, 32)
    for s in range(4):
        members = []
        for i in range(12):
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", png_bytes(shapes.example(12 * s + i).image)), (f"{key}.txt", b"a shape")]
        if s == 2:
            members.append(("corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg"))
        write_tar(folder / f"{s:05d}.tar", members)
    whole = (folder / "00000.tar").read_bytes()
    (folder / "00004.tar").write_bytes(whole[:3000])
    return folder


def test_tar_shards_stream_and_resume_at_the_shard_level(vae_shards, tmp_path):
    out = tmp_path / "run"
    spec = str(vae_shards / "{00000..00004}.tar")
    args = ["--ml", *TINY, "--data", spec, "--val-fraction", "0.2", "--shuffle-buffer", "8", "--eval-every", "3",
            "--ckpt-every", "3", "--out", str(out)]
    r = run([*args, "--max-steps", "12"])
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "log.txt").read_text()
    held = sum(data.held_out(f"{s:05d}{i:04d}", 0.2, 0) for s in range(4) for i in range(12))
    assert held > 8 and "data: 5 tar shard(s), 8 validation images held out" in log  # --val-size 8
    assert not data.held_out("corrupt", 0.2, 0)  # a training sample, met in the first epoch
    assert "skipped 00002.tar/corrupt: cannot load image" in log and "truncated" in log
    assert "images: 2 skipped: undecodable image 1, unreadable shard 1" in log
    first = ckpt(out / "ckpt.pt")
    epoch, shard = first["rng"][0]["data"]  # 12 steps x 4 images: into the second epoch of ~37 images
    assert first["step"] == 12 and epoch == 1 and 0 <= shard < 5
    r = run(["--resume", "--out", str(out), "--max-steps", "15"])
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert f"resuming at shard {shard} of epoch {epoch}" in log
    assert ckpt(out / "ckpt.pt")["step"] == 15


def test_tar_shards_under_ddp_each_rank_reads_its_own(vae_shards, tmp_path):
    out = tmp_path / "ddp"
    spec = str(vae_shards / "0000[0-3].tar")
    r = launch("ddp_train.py", ["train_vae", "--ml", *TINY, "--data", spec, "--val-fraction", "0.2",
                                "--max-steps", "4", "--eval-every", "4", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(out / f"rank{k}.pt") for k in (0, 1))
    assert_same_state(a, b)  # DDP kept the ranks together on different shards
    c = ckpt(out / "ckpt.pt")
    assert len(c["rng"]) == 2 and all("data" in s for s in c["rng"])
    ds = data.ShardImages(data.list_shards(spec), 32, 0, 2, 0, 0.2, 8)
    other = data.ShardImages(data.list_shards(spec), 32, 1, 2, 0, 0.2, 8)
    assert not set(ds.mine(0)) & set(other.mine(0))
