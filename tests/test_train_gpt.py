"""train_gpt.py as a user runs it: subprocess CLI runs on prepare.py's output with a small BPE,
kill -9 and resume, two-process DDP, bad input, and a short run that learns both directions."""

import json
import os
import subprocess
import sys

import pytest
import torch

import biart
import runtime
import tokenizer
import train_gpt
from conftest import cli, kill_points
from ddp_launch import assert_resume_matches, kill_launch_when_logged, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# a second or two per run: a 1-layer, 32-wide BiART on 4x4 tokens of 32 px shapes
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batch-size", "4", "--eval-images", "8",
        "--log-every", "1", "--lr", "3e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(args, timeout=240, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def setup(tiny_tokens):
    """prepare.py on 64 shapes (1 crop each) with a tiny AugVAE-SL, and a BPE learned from the
    training captions (conftest.py). -> (tokens dir, bpe path, vae path)."""
    return tiny_tokens


def base(setup):
    tokens, bpe, _ = setup
    return ["--tokens", str(tokens), "--bpe", str(bpe), *TINY]


def eval_lines(log: str) -> list:
    """'eval step N: ...' lines -> [(step, {direction: {'ref', 'gen'}})]."""
    out = []
    for line in log.splitlines():
        if line.startswith("eval step"):
            step = int(line.split()[2].rstrip(":"))
            parts = {}
            for chunk in line.split(" | ")[1:]:
                w = chunk.split()
                parts[w[0]] = {"ref": float(w[w.index("[REF]") + 1]), "gen": float(w[w.index("[GEN]") + 1])}
            out.append((step, parts))
    return out


def test_smoke_checkpoint_and_log(setup, tmp_path):
    tokens, bpe, _ = setup
    out = tmp_path / "gpt"
    r = run([*base(setup), "--max-steps", "4", "--eval-every", "2", "--ckpt-every", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("ckpt.pt", "log.txt", "config.json"):
        assert (out / f).exists(), f
    c = ckpt(out / "ckpt.pt")
    tok = tokenizer.Tokenizer(str(bpe))
    meta = json.loads((tokens / "meta.json").read_text())
    assert c["kind"] == "biart" and c["format_version"] == runtime.CHECKPOINT_FORMAT and c["step"] == 4
    config = biart.BiARTConfig.from_dict(c["config"])
    # the layout follows the data and the tokenizer
    assert (config.image_vocab, config.image_len) == (512, 16)
    assert (config.text_vocab, config.eot_token, config.text_len) == (tok.vocab_size, tok.eot_id, 32)
    assert (config.n_layer, config.n_embd, config.n_head) == (1, 32, 2)
    model = biart.BiART(config)
    model.load_state_dict(c["model"], strict=True)
    assert c["tokenizer"] == {"path": str(bpe), "sha256": runtime.sha256_file(bpe),
                              "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    assert c["tokens_meta"]["vae_sha256"] == meta["vae_sha256"] and c["tokens_meta"]["grid"] == 4
    assert {"optimizer", "scaler", "rng", "best_val", "lr", "data_position", "train"} <= c.keys()
    assert c["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in c["optimizer"]["param_groups"]] == [0.01, 0.0]
    log = (out / "log.txt").read_text()
    assert "alternating t2i / i2t" in log and "64 training images (320 captions, 1 crops each)" in log
    steps = [l for l in log.splitlines() if l.startswith("step ")]
    assert len(steps) == 4 and all("t2i loss" in l for l in steps[0::2]) and all("i2t loss" in l for l in steps[1::2])
    evals = eval_lines(log)
    assert [s for s, _ in evals] == [0, 2, 4] and all(p.keys() == {"t2i", "i2t"} for _, p in evals)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == c["config"] and cfg["tokenizer"]["sha256"] == c["tokenizer"]["sha256"]

    mixed = tmp_path / "mix"
    r = run([*base(setup), "--mix", "--max-steps", "2", "--total-batch", "8", "--out", str(mixed)])
    assert r.returncode == 0, r.stderr[-2000:]
    log = (mixed / "log.txt").read_text()
    assert "both directions per batch" in log and "accumulation 2" in log and "step 2 mix loss" in log

    shared = tmp_path / "share"  # three text->image steps in four
    r = run([*base(setup), "--t2i-share", "0.75", "--max-steps", "8", "--eval-every", "8", "--out", str(shared)])
    assert r.returncode == 0, r.stderr[-2000:]
    log = (shared / "log.txt").read_text()
    assert "one direction per step, text->image share 0.75" in log
    steps = [l.split()[2] for l in log.splitlines() if l.startswith("step ")]
    assert steps == ["t2i", "t2i", "t2i", "i2t"] * 2


def kill_args(setup):
    return [*base(setup), "--max-steps", "80", "--eval-every", "5", "--ckpt-every", "5", "--plateau-patience", "1",
            "--dropout", "0.1", "--warmup-steps", "3", "--total-batch", "8", "--lr", "5e-2",
            "--warmdown-steps", "30", "--positions", "canonical", "--ref-weight", "0.5"]


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """80 uninterrupted steps that halve the lr at a plateau and end in a 30-step warmdown."""
    out = tmp_path_factory.mktemp("gpt_full") / "full"
    r = run([*kill_args(setup), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("where", ["warmdown", "plateau"])
def test_kill_and_resume_equals_uninterrupted_run(setup, full_run, where, tmp_path, kill_when_logged):
    """kill -9 right after a checkpoint inside the warmdown, or right after the checkpoint that
    follows a plateau halving; the resumed run ends bitwise where the uninterrupted one did."""
    text = (full_run / "log.txt").read_text()
    lrs = {int(l.split()[1]): float(l.split(" lr ")[1].split()[0]) for l in text.splitlines() if l.startswith("step ")}
    assert lrs[80] < lrs[50] / 20  # the warmdown: towards --min-lr over the last 30 steps
    assert biart.BiARTConfig.from_dict(ckpt(full_run / "ckpt.pt")["config"]).positions == "canonical"
    at = kill_points(text, 80 - 30)[where]

    cut = tmp_path / "cut"
    kill_when_logged([sys.executable, os.path.join(ROOT, "train_gpt.py"), *kill_args(setup), "--out", str(cut)],
                     cut / "log.txt", f"saved checkpoint step {at} to ", ENV, ROOT)
    log = cut / "log.txt"
    killed_at = ckpt(cut / "ckpt.pt")["step"]  # loads: the file was never half-written
    assert at <= killed_at < 80, "the run finished before the kill; make it longer"

    r = run(["--resume", "--out", str(cut)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = ckpt(full_run / "ckpt.pt"), ckpt(cut / "ckpt.pt")
    assert a["step"] == b["step"] == 80
    assert_same_state(a["model"], b["model"])  # bitwise
    assert a["lr"] == b["lr"] and a["best_val"] == b["best_val"] and a["bad_evals"] == b["bad_evals"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert "resuming" in log.read_text()
    # the resumed run logs the same losses as the uninterrupted one from the kill on
    tail = [l.split(" lr ")[0] for l in text.splitlines() if l.startswith("step 7")]
    assert tail and all(t in log.read_text() for t in tail)


def ddp_args(setup, out):
    """--total-batch 16 on 2 ranks of --batch-size 4: 2 micro-steps per optimizer step; dropout
    draws from each rank's own RNG."""
    return [*base(setup), "--dropout", "0.1", "--max-steps", "16", "--eval-every", "8", "--ckpt-every", "2",
            "--total-batch", "16", "--out", str(out)]


@pytest.fixture(scope="module")
def ddp_runs(setup, tmp_path_factory):
    """One two-process launch, two runs in turn: 16 uninterrupted steps (full/), then the same
    run in cut/, killed with SIGKILL (torchrun and both ranks) right after its step-2 checkpoint."""
    work = tmp_path_factory.mktemp("gpt_ddp")
    full, cut = work / "full", work / "cut"
    kill_launch_when_logged("ddp_train.py", ["train_gpt", *ddp_args(setup, full), "--then", *ddp_args(setup, cut)],
                            cut / "log.txt", "saved checkpoint step 2 to ", work / "stderr.txt")
    return full, cut


def test_two_process_ddp_with_grad_accum_keeps_ranks_identical(ddp_runs):
    full = ddp_runs[0]
    s0, s1 = torch.load(full / "rank0.pt"), torch.load(full / "rank1.pt")
    assert_same_state(s0, s1)  # every parameter and buffer, bitwise
    saved = ckpt(full / "ckpt.pt")
    assert_same_state(saved["model"], s0)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    log = (full / "log.txt").read_text()
    assert "2 process(es)" in log and "batch 16 (accumulation 2)" in log


def test_two_process_ddp_kill_and_resume_equals_uninterrupted_run(ddp_runs):
    """The run killed -9 after its step-2 checkpoint and resumed in two processes ends bitwise
    where the uninterrupted two-process run did, on both ranks: each rank restores its own
    RNG state (its dropout masks from then on)."""
    full, cut = ddp_runs
    killed_at = ckpt(cut / "ckpt.pt")["step"]  # loads: the file was never half-written
    assert 2 <= killed_at < 16, "the run finished before the kill; make it longer"
    a, b = assert_resume_matches("train_gpt", full, cut, 16, "BiART")
    assert a["lr"] == b["lr"] and a["best_val"] == b["best_val"]


def test_both_directions_learn(setup, tmp_path):
    out = tmp_path / "learn"
    r = run([*base(setup), "--max-steps", "60", "--eval-every", "60", "--warmup-steps", "5", "--log-every", "20",
             "--lr", "1e-2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    (s0, start), (s1, end) = eval_lines((out / "log.txt").read_text())
    assert (s0, s1) == (0, 60)
    for d in ("t2i", "i2t"):
        assert end[d]["gen"] < start[d]["gen"] - 1.0, (d, start[d], end[d])
        assert end[d]["ref"] < start[d]["ref"] - 1.0, (d, start[d], end[d])


@pytest.fixture(scope="module")
def wrong_files(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrong")
    _, _, vae = setup
    resumed = folder / "vae_run"  # an output folder whose ckpt.pt is an AugVAE checkpoint
    resumed.mkdir()
    (resumed / "ckpt.pt").write_bytes(vae.read_bytes())
    return folder


@pytest.mark.parametrize("args, message", [
    (["--tokens", "no/such/folder"], "no such folder"),
    (["--init", "{vae}"], "is a 'augvae' checkpoint, expected 'biart'"),
    (["--resume", "--out", "{wrong}/vae_run"], "is a 'augvae' checkpoint, expected 'biart'"),
    (["--resume", "--out", "{wrong}/nothing"], "no checkpoint at"),
    (["--text-len", "8"], "more than text_len 8; raise --text-len or pass --truncate"),
    (["--total-batch", "6"], "not a multiple of --batch-size 4"),
    (["--dtype", "float8"], "--dtype"),
    (["--preset", "huge"], "unknown preset"),
    (["--positions", "absolute"], "BiARTConfig.positions: bad value 'absolute'"),
    (["--warmdown-steps", "-5"], "--warmdown-steps must be >= 0"),
    (["--ref-weight", "-1"], "--ref-weight must be >= 0, got -1"),
    (["--t2i-share", "1"], "--t2i-share must be between 0 and 1"),
    (["--mix", "--t2i-share", "0.1"], "leaves one direction no row of --batch-size 4"),
    (["--lr", "1e30", "--grad-clip", "0", "--ckpt-every", "1"], "at step 1: stopping; the last good checkpoint"),
])
def test_bad_input_gives_one_line_error(args, message, setup, wrong_files, tmp_path, capsys, monkeypatch):
    _, _, vae = setup
    args = [a.format(vae=vae, wrong=wrong_files) for a in args]
    monkeypatch.chdir(tmp_path)  # relative paths as a user in that folder types them
    code, _, err = cli(lambda: train_gpt.main([*base(setup), "--max-steps", "3", "--out", str(tmp_path / "o"), *args]),
                       capsys, "train_gpt.py")
    assert code == 2
    lines = err.strip().splitlines()
    if "last good" in message:  # stops mid-run: the progress bar came before the one-line error
        lines = [l for l in lines if "error" in l]
        assert lines and err.strip().endswith(lines[-1])
    assert len(lines) == 1 and lines[0].startswith("train_gpt.py: error: ") and message in lines[0], err[-2000:]
    if "last good" in message:  # a NaN or infinite loss: the step-1 checkpoint is kept
        assert ckpt(tmp_path / "o" / "ckpt.pt")["step"] == 1
    else:
        assert not (tmp_path / "o").exists()  # refused before anything was written


def test_bad_input_from_the_shell(setup, tmp_path):
    r = run([*base(setup), "--preset", "huge", "--out", str(tmp_path / "o")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("train_gpt.py: error: unknown preset"), r.stderr


def test_truncate_cuts_long_captions(setup, tmp_path):
    out = tmp_path / "cut"
    r = run([*base(setup), "--text-len", "8", "--truncate", "--max-steps", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "caption(s) truncated to text_len" in (out / "log.txt").read_text()


def test_t2i_share_spreads_directions_over_steps_and_batch_rows():
    import train_gpt
    assert [train_gpt.step_direction(s, 0.5) for s in range(4)] == ["t2i", "i2t", "t2i", "i2t"]  # the paper's
    assert [train_gpt.step_direction(s, 2 / 3) for s in range(6)] == ["t2i", "t2i", "i2t"] * 2
    assert sum(train_gpt.step_direction(s, 0.7) == "t2i" for s in range(1000)) == 700
    c = biart.BiARTConfig(n_layer=1, n_head=1, n_embd=8, text_len=4, image_len=4, image_vocab=8, text_vocab=10)
    text = torch.stack([biart.caption_to_model([1, 2], c)] * 4)
    image = torch.randint(0, 8, (4, 4))
    idx, seg, targets = train_gpt.batch_sequences(text, image, "mix", c, t2i_share=0.75)
    assert idx[:, 0].tolist() == [c.soc_id] * 3 + [c.soi_id]  # three rows text->image, one image->text
