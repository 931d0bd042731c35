"""Fault injection with real processes and files: a full disk and an unwritable output
folder while checkpointing, a NaN/inf loss, a torchrun rank whose data shard is all corrupt
images, extreme images and captions, pickles that would run code on load, newer and wrong
checkpoints. Kill -9 and resume, and most wrong-file and bad-image cases, are tested in the
scripts' own test files (test_train_vae.py, test_train_gpt.py, test_prepare.py, test_sample.py)."""

import io
import json
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import augvae
import data
import runtime
import prepare
import tokenizer
import train_gpt
import train_vae
from conftest import save_tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# the tiny sizes of test_train_vae.py and test_train_gpt.py: a few seconds per run
TINY_VAE = ["--image-size", "32", "--batch-size", "4", "--train-size", "64", "--val-size", "8",
            "--grid-images", "4", "--log-every", "1"]
TINY_GPT = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batch-size", "4", "--eval-images", "8",
            "--log-every", "1", "--lr", "3e-3"]
# tqdm redraws on stderr: everything else there is a message
PROGRESS = re.compile(r"^\s*(AugVAE-ML|AugVAE-SL|BiART|encode|sampling):")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def script(name: str, args: list, cwd=ROOT, file_limit: int = 0, code: str = "", timeout: float = 240):
    """Run a script as a user would. `file_limit`: a disk that is full once a file reaches this
    many bytes (RLIMIT_FSIZE; CPython ignores SIGXFSZ, so the write fails with EFBIG).
    `code`: Python run first in the same process (a fault to inject), then the script as __main__."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    path = os.path.join(ROOT, name)
    cmd = [sys.executable, path, *args]
    if code:
        prog = (f"import runpy, sys\nsys.path.insert(0, {ROOT!r})\n{code}\n"
                f"sys.argv = [{path!r}, *sys.argv[1:]]\nrunpy.run_path({path!r}, run_name='__main__')\n")
        cmd = [sys.executable, "-c", prog, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV,
                          preexec_fn=limit if file_limit else None)


RUN_MANY = """
import contextlib, io, json, os, runpy, sys, traceback
sys.path.insert(0, ROOT)
results = []
for name, args, cwd, watch in json.loads(sys.argv[1]):
    os.chdir(cwd)
    sys.argv = [os.path.join(ROOT, name), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # what the interpreter would print and exit with
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "watched_exists": bool(watch) and os.path.exists(watch)})
print(json.dumps(results))
"""


def run_many(runs: list, watch: str = "") -> list:
    """Runs [(script, args, cwd)] that must stop at once, in ONE fresh interpreter: each executes
    the script's __main__ block (runpy) with its own argv, cwd and captured stdout and stderr, as
    `python script args` would; a dozen interpreter starts would cost more than the rest of this
    file. `watch`: a path whose existence is recorded after each run. -> [SimpleNamespace]."""
    spec = json.dumps([[name, [str(a) for a in args], str(cwd), watch] for name, args, cwd in runs])
    r = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + RUN_MANY, spec], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return [types.SimpleNamespace(**x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


def error_line(r, name: str) -> str:
    """The run failed with exit status 2 and exactly one message on stderr: '<name>: error: ...'."""
    lines = [l for l in re.split(r"[\r\n]+", r.stderr) if l.strip() and not PROGRESS.match(l)]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{name}: error: "), r.stderr[-3000:]
    return lines[0]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_finite(state: dict, where: str):
    for k, v in state.items():
        if isinstance(v, dict):
            assert_finite(v, f"{where}.{k}")
        elif torch.is_tensor(v) and v.is_floating_point():
            assert torch.isfinite(v).all(), f"{where}.{k}"


def temp_files(folder) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".tmp" in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny pipeline, built in this process: an AugVAE-SL, prepare.py's tokens of 32 shapes,
    a BPE learned from their captions, and 2-step runs of train_vae.py (ML) and train_gpt.py,
    each leaving OUT/ckpt.pt at step 2."""
    folder = tmp_path_factory.mktemp("world")
    w = {"vae": str(folder / "sl.pt"), "tokens": str(folder / "tokens"), "bpe": str(folder / "bpe.txt.gz")}
    w["vae_model"] = save_tiny_vae(w["vae"])
    prepare.main(["--vae", w["vae"], "--out", w["tokens"], "--train-size", "32", "--val-size", "8",
                  "--test-size", "0", "--heldout-size", "0"])
    with open(os.path.join(w["tokens"], "train.jsonl")) as f:
        captions = [c for line in f for c in json.loads(line)["captions"]]
    tokenizer.write_merges(w["bpe"], tokenizer.train_bpe(captions, 600))
    w["train_vae.py"] = str(folder / "vae_run")
    train_vae.main(["--ml", *TINY_VAE, "--max-steps", "2", "--ckpt-every", "2", "--eval-every", "100",
                    "--device", "cpu", "--out", w["train_vae.py"]])
    w["train_gpt.py"] = str(folder / "gpt_run")
    train_gpt.main(["--tokens", w["tokens"], "--bpe", w["bpe"], *TINY_GPT, "--max-steps", "2", "--ckpt-every", "2",
                    "--eval-every", "100", "--device", "cpu", "--out", w["train_gpt.py"]])
    w["gpt"] = os.path.join(w["train_gpt.py"], "ckpt.pt")
    return w


def gpt_data(world) -> list:
    return ["--tokens", world["tokens"], "--bpe", world["bpe"], *TINY_GPT]


# -----------------------------------------------------------------------------------------
# a full disk and an unwritable output folder

@pytest.mark.parametrize("name", ["train_vae.py", "train_gpt.py"])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(name, world, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(world[name], out)
    path = out / "ckpt.pt"
    before = runtime.sha256_file(path)
    # resume from step 2 towards 6, a checkpoint every 2 steps: the write at step 4 fills the disk
    r = script(name, ["--resume", "--out", str(out), "--max-steps", "6", "--ckpt-every", "2"],
               file_limit=os.path.getsize(path) // 2)
    assert error_line(r, name) == f"{name}: error: could not write checkpoint {path}: File too large"
    assert runtime.sha256_file(path) == before  # the step-2 checkpoint, byte for byte
    c = ckpt(path)
    assert c["step"] == 2 and c["kind"] == ("augvae" if name == "train_vae.py" else "biart")
    assert temp_files(out) == []  # the half-written temp file is gone
    assert "saved checkpoint step 4" not in (out / "log.txt").read_text()


def test_prepare_full_disk_names_the_chunk_and_a_rerun_finishes(world, tmp_path):
    out = tmp_path / "tokens"
    args = ["--vae", world["vae"], "--out", str(out), "--train-size", "24", "--val-size", "4", "--test-size", "0",
            "--heldout-size", "0", "--chunk-size", "12"]
    r = script("prepare.py", args, file_limit=8000)  # plan.json fits, a chunk of 12 images does not
    chunk = out / "parts" / "train-000000.npz"
    assert error_line(r, "prepare.py") == f"prepare.py: error: could not write {chunk}: File too large"
    assert temp_files(out) == [] and not chunk.exists()
    prepare.main(args)  # room again: the same command finishes the job
    assert np.load(out / "train.npy").shape == (24, 16) and np.load(out / "val.npy").shape == (4, 16)


def test_unwritable_output_folder_is_a_one_line_error(world, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be\n")
    out = blocker / "out"  # cannot be created, even by root
    runs = [("train_vae.py", ["--ml", *TINY_VAE, "--max-steps", "2"]),
            ("train_gpt.py", [*gpt_data(world), "--max-steps", "2"]),
            ("prepare.py", ["--vae", world["vae"], "--train-size", "4", "--val-size", "4"]),
            ("sample.py", ["--vae", world["vae"], "--gpt", world["gpt"], "--text", "A red circle."])]
    results = run_many([(name, [*args, "--out", out], tmp_path) for name, args in runs])
    for (name, _), r in zip(runs, results):
        assert str(out) in error_line(r, name), name
        assert "step 1" not in r.stdout, name  # stopped before any training step
    assert os.listdir(tmp_path) == ["a_file"]


# -----------------------------------------------------------------------------------------
# a NaN / inf loss

INJECT = {  # run before the script, in its process: the fault starts at training step GOOD + 1
    "train_vae.py": """
import augvae
GOOD, calls, forward = 3, 0, augvae.AugVAE.forward
def faulty(self, x):  # an infinite pixel in the batch
    global calls
    calls += self.training
    if self.training and calls > GOOD:
        x = x.clone()
        x[0, 0, 0, 0] = float("inf")
    return forward(self, x)
augvae.AugVAE.forward = faulty
""",
    "train_gpt.py": """
import biart
GOOD, calls, forward = 3, 0, biart.BiART.forward
def faulty(self, *args, **kwargs):  # the loss overflows
    global calls
    logits, loss, parts = forward(self, *args, **kwargs)
    calls += self.training
    if self.training and calls > GOOD:
        loss = loss * float("nan")
    return logits, loss, parts
biart.BiART.forward = faulty
"""}


@pytest.mark.parametrize("name", ["train_vae.py", "train_gpt.py"])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(name, world, tmp_path):
    out = tmp_path / "run"
    args = ["--ml", *TINY_VAE] if name == "train_vae.py" else gpt_data(world)
    r = script(name, [*args, "--max-steps", "6", "--ckpt-every", "2", "--eval-every", "100", "--out", str(out)],
               code=INJECT[name])
    path = out / "ckpt.pt"
    # steps 1..3 ran, the 4th forward went non-finite; the checkpoint of step 2 is the last good one
    assert re.fullmatch(rf"{name}: error: loss is (nan|inf) at step 3: stopping; the last good checkpoint "
                        rf"is kept at {re.escape(str(path))} \(step 2\)", error_line(r, name)), r.stderr[-2000:]
    c = ckpt(path)
    assert c["step"] == 2
    assert_finite(c["model"], "model")
    assert_finite(c["optimizer"]["state"], "optimizer")
    assert temp_files(out) == []
    assert "saved checkpoint step 2" in (out / "log.txt").read_text()
    # the kept checkpoint is a good one: without the fault the run resumes from it and finishes
    main = train_vae.main if name == "train_vae.py" else train_gpt.main
    main(["--resume", "--out", str(out), "--max-steps", "4"])
    c = ckpt(path)
    assert c["step"] == 4
    assert_finite(c["model"], "model")


def test_nan_loss_on_one_ddp_rank_stops_every_rank_and_keeps_the_checkpoint(world, tmp_path):
    """2-process torchrun (gloo) where only rank 1's loss goes NaN at step 3: the run ends (no
    hang), every rank reports the same one line, and rank 0's checkpoint of step 2 is kept."""
    launcher = tmp_path / "nan_on_rank1.py"
    path = os.path.join(ROOT, "train_gpt.py")
    launcher.write_text(f"import os, runpy, sys\nsys.path.insert(0, {ROOT!r})\n"
                        f"if os.environ['RANK'] == '1':\n" + "".join(f"    {l}\n" for l in INJECT["train_gpt.py"].splitlines())
                        + f"sys.argv = [{path!r}, *sys.argv[1:]]\nrunpy.run_path({path!r}, run_name='__main__')\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "2", str(launcher),  # time for both ranks to report before torchrun stops them
           *gpt_data(world), "--max-steps", "6", "--ckpt-every", "2", "--eval-every", "100", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode != 0
    path = out / "ckpt.pt"
    message = (f"train_gpt.py: error: loss is nan at step 3 on rank 1: stopping; the last good checkpoint "
               f"is kept at {path} (step 2)")
    assert r.stderr.count(message) == 2, r.stderr[-3000:]  # both ranks (rank 0's progress bar may share the line)
    assert "train_gpt.py\", line" not in r.stderr, r.stderr[-3000:]  # the message, not a traceback (torchrun
    # adds its own report of the failed ranks, with the launcher's traceback)
    c = ckpt(path)
    assert c["step"] == 2
    assert_finite(c["model"], "model")
    assert temp_files(out) == []


# -----------------------------------------------------------------------------------------
# torchrun: one rank's shard holds only corrupt images

def corrupt_bytes(kind: str) -> bytes:
    if kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()[: len(buf.getvalue()) // 2]
    return {"text": b"not an image\n", "empty": b""}[kind]


def test_ddp_rank_whose_shard_is_all_corrupt_images_completes(tmp_path):
    n, batch, procs, steps = 16, 2, 2, 4  # 4 steps = one epoch: each rank reads its 8 images once
    sampler = iter(runtime.MicroBatches(n, batch, rank=1, world=procs, seed=0, start=0))
    rank1 = sorted({i for _ in range(steps) for i in next(sampler)})  # train_vae.py's order for rank 1
    assert len(rank1) == n // procs
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    kinds = ("truncated", "text", "empty")
    bad = []
    for i in range(n):
        if i in rank1:
            name = f"train/{i:02d}.jpg" if i % 3 == 0 else f"train/{i:02d}.png"
            (root / name).write_bytes(corrupt_bytes(kinds[i % 3]))
            bad.append(name)
        else:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"train/{i:02d}.png")
    for i in range(4):  # validation: rank r evaluates images r, r + 2
        if i % 2:
            (root / f"val/{i}.png").write_bytes(corrupt_bytes(kinds[i // 2]))
            bad.append(f"val/{i}.png")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"val/{i}.png")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           os.path.join(ROOT, "tests", "ddp_train.py"), "train_vae", "--ml", "--data", str(root), "--image-size", "32",
           "--batch-size", str(batch), "--grid-images", "2", "--max-steps", str(steps), "--eval-every", "2",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    warned = sorted(set(re.findall(r"cannot load image \S*?/images/(\S+?):", r.stderr)))
    assert warned == sorted(bad)  # rank 1 read every one of its corrupt files (rank 0 none)
    s0, s1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in s0:  # both ranks took part in every step: identical weights and codebooks
        assert torch.equal(s0[k], s1[k]), k
    assert int(s0["quantizer.updates"]) == augvae.preset("small").num_levels * steps  # every level, every step
    saved = ckpt(out / "ckpt.pt")
    assert saved["step"] == steps and all(torch.equal(saved["model"][k], s0[k]) for k in s0)
    assert_finite(saved["model"], "model")


# -----------------------------------------------------------------------------------------
# extreme images and captions

LONG_CAPTION = " ".join(["a large red circle in the top left corner of the picture."] * 200)[:10_000]
EMOJI_CAPTION = "\U0001F534\U0001F7E6\U0001F53A\u2B50\U0001F680"


@pytest.fixture(scope="module")
def extreme_images(tmp_path_factory):
    """train/ with a 1x1 image and a 50-megapixel one (a single-colour JPEG: fast to write and
    read) beside two ordinary images; val/ with a 1x1 one and two ordinary ones."""
    root = tmp_path_factory.mktemp("extreme")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split).mkdir()
        Image.new("RGB", (1, 1), (30, 160, 60)).save(root / split / "tiny.png")
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / f"n{k}.png")
    Image.new("RGB", (7100, 7100), (210, 35, 40)).save(root / "train" / "huge.jpg", quality=75)
    return root


def test_tiny_and_huge_images_are_used_by_every_script(world, extreme_images, tmp_path):
    tiny, huge = extreme_images / "train" / "tiny.png", extreme_images / "train" / "huge.jpg"
    assert Image.open(huge).size == (7100, 7100)
    # sample.py: each is captioned (one process for the folder: nothing may be skipped)
    out = tmp_path / "sample"
    r = script("sample.py", ["--vae", world["vae"], "--gpt", world["gpt"], "--images", str(tiny.parent),
                             "--num-candidates", "2", "--out", str(out)])
    assert r.returncode == 0 and "skipped" not in r.stderr, r.stderr[-2000:]
    rows = {row["input"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for image in (tiny, huge):
        assert rows[str(image)]["candidates"] and "error" not in rows[str(image)]
    # train_vae.py on the folder: both are read (nothing skipped) in its one training step
    out = tmp_path / "vae"
    r = script("train_vae.py", ["--ml", *TINY_VAE, "--data", str(extreme_images), "--max-steps", "1",
                                "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unreadable" not in r.stderr + (out / "log.txt").read_text()
    assert_finite(ckpt(out / "ckpt.pt")["model"], "model")


@pytest.fixture(scope="module")
def odd_captions(world, extreme_images, tmp_path_factory):
    """prepare.py (jsonl source) on the extreme images with empty, 10,000-character and
    pure-emoji captions. -> (tokens folder, meta)."""
    folder = tmp_path_factory.mktemp("odd")
    train = [{"image": "train/tiny.png", "caption": LONG_CAPTION},
             {"image": "train/huge.jpg", "caption": EMOJI_CAPTION},
             {"image": "train/n0.png", "caption": ["", "  ", "A small green square."]},
             {"image": "train/n1.png", "caption": "A large blue circle at the top."},
             {"image": "val/n0.png", "caption": ""}]  # no caption at all: skipped
    (folder / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in train))
    (folder / "val.jsonl").write_text(json.dumps({"image": "val/n1.png", "caption": "A red circle."}) + "\n")
    out = folder / "tokens"
    meta = prepare.main(["--vae", world["vae"], "--source", "jsonl", "--captions", str(folder / "train.jsonl"),
                         "--val-captions", str(folder / "val.jsonl"), "--image-root", str(extreme_images),
                         "--out", str(out)])
    return out, meta


def test_prepare_keeps_extreme_images_and_captions(world, extreme_images, odd_captions):
    out, meta = odd_captions
    assert meta["skipped"] == {"train": [["val/n0.png", f"{extreme_images / 'val/n0.png'}: no caption"]]}
    lines = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    assert [l["image"] for l in lines] == ["train/tiny.png", "train/huge.jpg", "train/n0.png", "train/n1.png"]
    assert lines[0]["captions"] == [LONG_CAPTION] and len(LONG_CAPTION) == 10_000  # stored whole
    assert lines[1]["captions"] == [EMOJI_CAPTION]
    assert lines[2]["captions"] == ["A small green square."]  # the empty ones are dropped
    views = [data.to_tensor(data.center_crop_resize(data.load_image(extreme_images / l["image"]), 32))
             for l in lines[:2]]
    tokens = world["vae_model"].encode(torch.stack(views)).reshape(2, -1).numpy()
    assert np.array_equal(np.load(out / "train.npy")[:2], tokens)


def test_train_gpt_long_caption_needs_truncate_emoji_trains(world, odd_captions, tmp_path):
    tokens, _ = odd_captions
    args = ["--tokens", str(tokens), "--bpe", world["bpe"], *TINY_GPT, "--max-steps", "1"]
    r = script("train_gpt.py", [*args, "--out", str(tmp_path / "strict")], cwd=tmp_path)
    line = error_line(r, "train_gpt.py")
    assert f"train image 0: caption {LONG_CAPTION[:77] + '...'!r} has" in line and "pass --truncate" in line
    out = tmp_path / "cut"
    r = script("train_gpt.py", [*args, "--truncate", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 caption(s) truncated to text_len" in (out / "log.txt").read_text()
    assert tokenizer.Tokenizer(world["bpe"]).encode(EMOJI_CAPTION)  # bytes, not nothing
    c = ckpt(out / "ckpt.pt")
    assert c["step"] == 1
    assert_finite(c["model"], "model")


# -----------------------------------------------------------------------------------------
# wrong files

class RunsCode:
    """Unpickling this calls open(marker, 'w'): a file that would run code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A checkpoint-shaped file whose unpickling creates `marker`, also as a run's ckpt.pt.
    -> (file, run folder, marker)."""
    folder = tmp_path_factory.mktemp("evil")
    marker, path = folder / "code_ran", folder / "evil.pt"
    torch.save({"kind": "augvae", "format_version": 1, "config": {}, "model": {}, "x": RunsCode(marker)}, path)
    opened = torch.load(path, weights_only=False)["x"]  # the unsafe load does run it
    opened.close()
    assert marker.exists()
    marker.unlink()
    run = folder / "run"
    run.mkdir()
    shutil.copy(path, run / "ckpt.pt")
    raw = folder / "evil.pkl"  # the same as a plain (non-zip) pickle
    raw.write_bytes(pickle.dumps({"x": RunsCode(marker)}, protocol=2))
    for f in (path, raw):
        with pytest.raises(runtime.CheckpointError, match="not a loadable weights file"):
            runtime.load_weights(f)
    assert not marker.exists()
    return str(path), str(run), marker


def test_pickle_that_runs_code_is_refused_by_every_script(world, evil, tmp_path):
    path, run, marker = evil
    in_run = os.path.join(run, "ckpt.pt")
    runs = [("train_vae.py", ["--sl", "--init", path], path),
            ("train_vae.py", ["--resume", "--out", run], in_run),
            ("train_vae.py", ["--ml", *TINY_VAE, "--lpips-vgg", path, "--lpips-heads", path], path),
            ("prepare.py", ["--vae", path], path),
            ("train_gpt.py", [*gpt_data(world), "--init", path], path),
            ("train_gpt.py", ["--resume", "--out", run], in_run),
            ("sample.py", ["--vae", world["vae"], "--gpt", path, "--text", "A red circle."], path),
            ("sample.py", ["--vae", path, "--gpt", world["gpt"], "--text", "A red circle."], path)]
    results = run_many([(name, args + ([] if "--out" in args else ["--out", tmp_path / "out"]), tmp_path)
                        for name, args, _ in runs], watch=str(marker))
    for (name, args, loaded), r in zip(runs, results):
        assert f"{loaded}: not a loadable weights file" in error_line(r, name), (name, args)
        assert not r.watched_exists, (name, args)  # the code never ran
    assert not marker.exists()


def test_newer_or_wrong_checkpoint_is_a_one_line_error(world, tmp_path):
    newer = {}
    for which in ("gpt", "vae"):
        c = ckpt(world[which])
        c["format_version"] = runtime.CHECKPOINT_FORMAT + 1
        newer[which] = tmp_path / f"newer_{which}.pt"
        torch.save(c, newer[which])
    text = ["--text", "A red circle.", "--out", tmp_path / "out"]
    runs = [("sample.py", ["--vae", world["vae"], "--gpt", newer["gpt"], *text],
             f"{newer['gpt']}: checkpoint format {runtime.CHECKPOINT_FORMAT + 1} is newer than this code"),
            ("sample.py", ["--vae", newer["vae"], "--gpt", world["gpt"], *text],
             f"{newer['vae']}: checkpoint format {runtime.CHECKPOINT_FORMAT + 1} is newer than this code"),
            ("train_vae.py", ["--resume", "--out", world["train_gpt.py"]],  # a BiART run's folder
             f"{world['gpt']}: is a 'biart' checkpoint, expected 'augvae'")]
    for (name, args, message), r in zip(runs, run_many([(n, a, tmp_path) for n, a, _ in runs])):
        assert message in error_line(r, name), (name, args)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------------------
# corrupt state: a cut-short checkpoint, a damaged token folder

def cut(path, keep: str) -> None:
    """Cut a file short as a copy or a write that did not finish would: to half its size or to 0 bytes."""
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2] if keep == "half" else b"")


def snapshot(folder) -> dict:
    """Every file in `folder`: (bytes, modification time): to show a failed run touched none of them."""
    return {os.path.relpath(os.path.join(d, f), folder): (runtime.sha256_file(os.path.join(d, f)),
                                                          os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def cut_message(path, keep: str) -> str:
    return f"could not read checkpoint {path}: " + ("the file is empty (0 bytes)" if keep == "empty"
                                                    else "the file is truncated (")


MAINS = {"train_vae.py": train_vae.main, "train_gpt.py": train_gpt.main}


@pytest.mark.parametrize("keep", ["half", "empty"])
@pytest.mark.parametrize("name, how", [("train_vae.py", "resume"), ("train_vae.py", "init"),
                                       ("train_gpt.py", "resume"), ("train_gpt.py", "init")])
def test_cut_short_checkpoint_is_named_and_the_run_folder_is_untouched(name, how, keep, world, tmp_path):
    """--resume from a cut-short OUT/ckpt.pt, or --init from one, into a folder holding a good
    run (ckpt.pt, and best.pt for train_vae.py): a CheckpointError naming the file and what is
    wrong with it, and not one file of the folder rewritten, the cut ckpt.pt included."""
    run = tmp_path / "run"
    shutil.copytree(world[name], run)
    if how == "resume":
        path = run / "ckpt.pt"
        args = ["--resume", "--out", str(run)]
    else:
        path = tmp_path / "init.pt"
        shutil.copy(run / "ckpt.pt", path)  # train_vae.py's is an ML one, as --sl --init needs
        data_args = ["--sl", *TINY_VAE] if name == "train_vae.py" else gpt_data(world)
        args = [*data_args, "--init", str(path), "--max-steps", "2", "--device", "cpu", "--out", str(run)]
    cut(path, keep)
    assert name == "train_gpt.py" or (run / "best.pt").exists()
    before = snapshot(run)
    with pytest.raises(runtime.CheckpointError) as e:
        MAINS[name](args)
    assert str(e.value).startswith(cut_message(path, keep)), str(e.value)
    assert snapshot(run) == before


def test_resume_from_weights_without_training_state_is_refused(world, tmp_path):
    """A best.pt (weights only) copied over ckpt.pt, then --resume: one error naming the file and
    saying --init is the way to start from weights, the folder untouched (was: KeyError 'train')."""
    run = tmp_path / "run"
    shutil.copytree(world["train_vae.py"], run)
    shutil.copy(run / "best.pt", run / "ckpt.pt")
    before = snapshot(run)
    with pytest.raises(runtime.CheckpointError, match=r"ckpt.pt holds no training state .*use --init"):
        train_vae.main(["--resume", "--out", str(run)])
    assert snapshot(run) == before


@pytest.fixture
def resumable(world, tmp_path):
    """A copy of the tokens folder to damage and of the BiART run that used it, resumed with
    --tokens COPY. -> (tokens copy, run folder, argv)."""
    tokens, run = tmp_path / "tokens", tmp_path / "run"
    shutil.copytree(world["tokens"], tokens)
    shutil.copytree(world["train_gpt.py"], run)
    return tokens, run, ["--resume", "--out", str(run), "--tokens", str(tokens), "--max-steps", "4"]


def with_id(path, value: int, index=(5, 3)) -> None:
    a = np.load(path)
    a[index] = value
    np.save(path, a)


DAMAGE = {  # how the tokens folder is damaged -> (file, start of the message)
    "train.npy half": ("train.npy", "could not read {path}: the file is truncated ("),
    "val.npy empty": ("val.npy", "could not read {path}: the file is empty (0 bytes)"),
    "meta.json half": ("meta.json", "could not read {path}: not valid JSON ("),
    "meta.json invalid": ("meta.json", "{path}: not a prepare.py meta.json ('codebook_size' is '512', expected a "
                                       "positive integer)"),
    "train.jsonl half": ("train.jsonl", "could not read {path}:"),
    "train.npy id": ("train.npy", "{path}: image 5 holds token id 512, outside the codebook [0, 512)"),
    "val.npy id": ("val.npy", "{path}: image 5 holds token id 65535, outside the codebook [0, 512)"),
    "train_crops.npy id": ("train_crops.npy", "{path}: image 5 holds token id 513, outside the codebook [0, 512)"),
}


def damage(tokens, case: str) -> str:
    path = str(tokens / DAMAGE[case][0])
    if case.endswith(("half", "empty")):
        cut(path, case.split()[1])
    elif case == "meta.json invalid":
        meta = json.loads((tokens / "meta.json").read_text())
        meta["codebook_size"] = str(meta["codebook_size"])
        (tokens / "meta.json").write_text(json.dumps(meta))
    elif case == "train_crops.npy id":  # the tiny folder has no crops: one crop per image, its centre view
        crops = np.load(tokens / "train.npy")[:, None, :].copy()
        crops[5, 0, 3] = 513
        np.save(path, crops)
    else:
        with_id(path, 512 if case.startswith("train") else 65535)
    return path


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_token_folder_is_named_and_the_run_folder_is_untouched(case, resumable):
    """A resumed train_gpt.py over a token folder with a cut-short array, meta.json or .jsonl, or a
    token id outside the codebook: a ValueError naming the file, before anything is written."""
    tokens, run, args = resumable
    path = damage(tokens, case)
    before = snapshot(run)
    with pytest.raises(ValueError) as e:
        train_gpt.main(args)
    assert str(e.value).startswith(DAMAGE[case][1].format(path=path)), str(e.value)
    assert snapshot(run) == before


def test_corrupt_state_is_one_line_on_the_command_line(world, tmp_path):
    """As the user sees it: `NAME: error: <the message>` alone on stderr, exit status 2, no
    traceback, and the run folder as it was."""
    gpt_run, vae_run, tokens = tmp_path / "gpt_run", tmp_path / "vae_run", tmp_path / "tokens"
    shutil.copytree(world["train_gpt.py"], gpt_run)
    shutil.copytree(world["train_vae.py"], vae_run)
    shutil.copytree(world["tokens"], tokens)
    half_gpt, empty_vae = tmp_path / "half_gpt.pt", tmp_path / "empty_vae.pt"
    shutil.copy(world["gpt"], half_gpt)
    cut(half_gpt, "half")
    empty_vae.write_bytes(b"")
    cut(gpt_run / "ckpt.pt", "half")
    with_id(tokens / "train.npy", 600)
    text = ["--text", "A red circle.", "--out", tmp_path / "out"]
    runs = [("train_gpt.py", ["--resume", "--out", gpt_run], cut_message(gpt_run / "ckpt.pt", "half")),
            ("train_vae.py", ["--sl", "--init", empty_vae, "--out", vae_run], cut_message(empty_vae, "empty")),
            ("sample.py", ["--vae", world["vae"], "--gpt", half_gpt, *text], cut_message(half_gpt, "half")),
            ("sample.py", ["--vae", empty_vae, "--gpt", world["gpt"], *text], cut_message(empty_vae, "empty")),
            ("train_gpt.py", [*gpt_data(world), "--tokens", tokens, "--out", gpt_run],
             f"{tokens / 'train.npy'}: image 5 holds token id 600, outside the codebook [0, 512)")]
    before = {folder: snapshot(folder) for folder in (gpt_run, vae_run)}
    for (name, args, message), r in zip(runs, run_many([(n, a, tmp_path) for n, a, _ in runs])):
        assert error_line(r, name).startswith(f"{name}: error: {message}"), (name, args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr + r.stdout, (name, args)
    assert {folder: snapshot(folder) for folder in before} == before
    assert not (tmp_path / "out").exists()
