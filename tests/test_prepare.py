"""prepare.py: every source on a tiny fixture in its real format, tokens equal AugVAE.encode,
idempotence, kill -9 and rerun, a two-process torchrun equal to one process, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import runtime
import shapes
import prepare
from conftest import cli, save_tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SHAPES = ["--train-size", "10", "--val-size", "4", "--test-size", "0", "--heldout-size", "3",
          "--chunk-size", "4", "--batch-size", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(args, timeout=120, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "sl.pt"
    return save_tiny_vae(path), str(path)


def outputs(folder, split):
    arrays = {"tokens": np.load(folder / f"{split}.npy")}
    if (folder / f"{split}_crops.npy").exists():
        arrays["crops"] = np.load(folder / f"{split}_crops.npy")
    arrays["lines"] = (folder / f"{split}.jsonl").read_text()
    return arrays


def assert_same_outputs(a, b, splits):
    for split in splits:
        x, y = outputs(a, split), outputs(b, split)
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]) if k != "lines" else x[k] == y[k], (split, k)


def encode(model, images):
    return model.encode(torch.stack(images)).reshape(len(images), -1).numpy()


@pytest.fixture(scope="module")
def shapes_out(vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "shapes"
    meta = prepare.main(["--vae", vae[1], "--out", str(out), "--crops", "2", *SHAPES])
    return out, meta


def test_shapes_tokens_equal_augvae_encode(vae, shapes_out):
    model, path = vae
    out, meta = shapes_out
    tokens, crops = np.load(out / "train.npy", mmap_mode="r"), np.load(out / "train_crops.npy")
    assert tokens.dtype == np.uint16 and tokens.shape == (10, 16)  # 32 px -> 4x4 grid, row-major
    assert crops.dtype == np.uint16 and crops.shape == (10, 2, 16)
    assert np.load(out / "val.npy").shape == (4, 16) and not (out / "val_crops.npy").exists()
    assert np.load(out / "heldout.npy").shape == (3, 16) and not (out / "test.npy").exists()
    assert not (out / "parts").exists()
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["vae_sha256"] == runtime.sha256_file(path) and meta["vae"] == os.path.abspath(path)
    assert (meta["codebook_size"], meta["grid"], meta["image_len"], meta["image_size"]) == (512, 4, 16, 32)
    assert meta["splits"]["train"] == {"images": 10, "skipped": 0, "captions": 50, "crops_per_image": 2}
    assert meta["source"] == "shapes" and meta["skipped"] == {}

    examples = [shapes.shapes_example(i, "train", 32) for i in range(10)]
    expect = encode(model, [data.from_uint8(e.image) for e in examples])
    assert np.array_equal(tokens, expect)
    held = [data.from_uint8(shapes.shapes_example(i, "heldout", 32).image) for i in range(3)]
    assert np.array_equal(np.load(out / "heldout.npy"), encode(model, held))
    lines = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    assert [l["captions"] for l in lines] == [e.captions for e in examples]
    # crop k of image i: the documented draw, from the scene rendered at twice the size
    rng = random.Random("0/train/7")
    big = Image.fromarray(shapes.shapes_example(7, "train", 64).image)
    views = [data.to_tensor(data.random_crop_resize(big, 32, rng)) for _ in range(2)]
    assert np.array_equal(crops[7], encode(model, views))
    assert not np.array_equal(crops[:, 0], tokens)
    assert len(np.unique(tokens)) > 40  # the fixture's VAE tells images apart


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six readable images of odd sizes and modes, one corrupt file, one missing."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(40, 48), (64, 32), (33, 33), (50, 70), (32, 32), (90, 40)]):
        name = f"a/{i}.png" if i % 2 else f"a/{i}.jpg"
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        (img.convert("L") if i == 3 else img).save(root / name)
        names.append(name)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root, names


def write_source(kind, root, names):
    """The fixture in the source's real format; returns the prepare flags and the expected
    {split: [(name, captions)]} (broken.jpg and gone.png must be skipped)."""
    extra = ["a/broken.jpg", "a/gone.png"]
    caps = {n: [f"A picture number {k}.", f"Image {k} of the set."] for k, n in enumerate(names + extra)}
    if kind == "coco":
        splits = ["train", "restval", "val", "test", "train", "val", "train", "test"]
        images = [{"filepath": os.path.dirname(n), "filename": os.path.basename(n), "split": s,
                   "sentences": [{"raw": c, "tokens": c.split()} for c in caps[n]]}
                  for n, s in zip(names + extra, splits)]
        (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
        by = {"train": [], "val": [], "test": []}
        for n, s in zip(names + extra, splits):
            by[{"restval": "train"}.get(s, s)].append(n)
        return ["--captions", str(root / "dataset_coco.json")], by, caps
    if kind == "cc":  # one caption per line; validation from its own file
        train, val = names[:4] + extra, names[4:]
        for fname, part in (("train.tsv", train), ("val.tsv", val)):
            (root / fname).write_text("".join(f"{caps[n][0]}\t{n}\n" for n in part))
        caps = {n: c[:1] for n, c in caps.items()}
        return ["--captions", str(root / "train.tsv"), "--val-captions", str(root / "val.tsv")], \
            {"train": train, "val": val}, caps
    # jsonl: a string or a list; validation held out by --val-fraction
    lines = [json.dumps({"image": n, "caption": caps[n] if k % 2 else caps[n][0]})
             for k, n in enumerate(names + extra)]
    caps = {n: caps[n] if k % 2 else caps[n][:1] for k, n in enumerate(names + extra)}
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    train_idx, val_idx = data.split_indices(len(lines), 0.25, 0)
    every = names + extra
    return ["--captions", str(root / "captions.jsonl"), "--val-fraction", "0.25"], \
        {"train": [every[i] for i in train_idx], "val": [every[i] for i in val_idx]}, caps


@pytest.mark.parametrize("kind", ["coco", "cc", "jsonl"])
def test_file_sources_skip_unreadable_images(kind, vae, image_folder, tmp_path):
    model, path = vae
    root, names = image_folder
    flags, by_split, caps = write_source(kind, tmp_path, names)
    out = tmp_path / "tok"
    meta = prepare.main(["--vae", path, "--source", kind, *flags, "--image-root", str(root), "--out", str(out),
                         "--chunk-size", "3", "--batch-size", "2"])
    skipped = [name for s in meta["skipped"].values() for name, _ in s]
    assert sorted(skipped) == ["a/broken.jpg", "a/gone.png"]
    reasons = " ".join(r for s in meta["skipped"].values() for _, r in s)
    assert "no such file" in reasons and "broken.jpg" in reasons
    log = (out / "log.txt").read_text()
    assert "skipped a/broken.jpg" in log and "skipped a/gone.png" in log
    for split, expected in by_split.items():
        kept = [n for n in expected if n in names]
        tokens = np.load(out / f"{split}.npy")
        lines = [json.loads(l) for l in (out / f"{split}.jsonl").read_text().splitlines()]
        assert [l["image"] for l in lines] == kept
        assert [l["captions"] for l in lines] == [caps[n] for n in kept]
        assert meta["splits"][split]["images"] == len(kept) == len(tokens)
        views = [data.to_tensor(data.center_crop_resize(data.load_image(root / n), 32)) for n in kept]
        assert np.array_equal(tokens, encode(model, views)), split


def test_rerun_is_a_no_op_and_other_settings_need_force(vae, shapes_out, tmp_path):
    out, _ = shapes_out
    stamp = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    r = run(["--vae", vae[1], "--out", str(out), "--crops", "2", *SHAPES])
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    assert stamp == {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    r = run(["--vae", vae[1], "--out", str(out), "--crops", "1", *SHAPES])
    assert r.returncode == 2 and "other settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    copy = tmp_path / "copy"
    assert prepare.main(["--vae", vae[1], "--out", str(copy), *SHAPES]) is not None  # no crops
    assert not (copy / "train_crops.npy").exists()
    assert prepare.main(["--vae", vae[1], "--out", str(copy), "--crops", "2", "--force", *SHAPES]) is not None
    assert_same_outputs(out, copy, ["train", "val", "heldout"])


def test_kill_and_rerun_equals_uninterrupted(vae, tmp_path):
    args = ["--vae", vae[1], "--train-size", "200", "--val-size", "6", "--test-size", "0", "--heldout-size", "0",
            "--chunk-size", "2", "--batch-size", "2"]
    full = tmp_path / "full"
    prepare.main([*args, "--out", str(full)])
    cut = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), *args, "--out", str(cut)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    parts = cut / "parts"
    while not (parts.is_dir() and len([f for f in os.listdir(parts) if f.endswith(".npz")]) >= 5):
        assert p.poll() is None, f"prepare ended (exit {p.returncode}) before 5 chunks were written"  # no clock
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "meta.json").exists(), "prepare finished before the kill; make it longer"
    done = len([f for f in os.listdir(parts) if f.endswith(".npz")])
    assert 5 <= done < 103
    r = run([*args, "--out", str(cut)])
    assert r.returncode == 0, r.stderr
    assert f"{103 - done} to encode" in (cut / "log.txt").read_text()  # finished chunks are kept
    assert_same_outputs(full, cut, ["train", "val"])
    assert json.loads((full / "meta.json").read_text())["splits"] == json.loads((cut / "meta.json").read_text())["splits"]


def test_two_process_torchrun_equals_one_process(vae, shapes_out, tmp_path):
    out, _ = shapes_out
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "prepare.py"), "--vae", vae[1], "--out", str(two), "--crops", "2", *SHAPES]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_outputs(out, two, ["train", "val", "heldout"])
    assert "2 process(es)" in (two / "log.txt").read_text()
    a, b = json.loads((out / "meta.json").read_text()), json.loads((two / "meta.json").read_text())
    assert a["splits"] == b["splits"] and a["plan"] == b["plan"]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    save_tiny_vae(folder / "ml.pt", single_level=False)
    torch.save({"kind": "biart", "format_version": 1, "config": {}, "model": {}}, folder / "biart.pt")
    (folder / "bad.tsv").write_text("a caption without a path\n")
    return folder


@pytest.mark.parametrize("args, message", [
    ([], "--vae is required"),
    (["--vae", "{bad}/ml.pt"], "multi-level (ML) checkpoint"),
    (["--vae", "{bad}/biart.pt"], "'biart' checkpoint, expected 'augvae'"),
    (["--vae", "{bad}/nowhere.pt"], "no such file"),
    (["--vae", "{sl}", "--source", "flickr"], "--source must be one of"),
    (["--vae", "{sl}", "--source", "cc", "--captions", "{bad}/bad.tsv"], "bad.tsv:1: expected 'caption<TAB>image path'"),
    (["--vae", "{sl}", "--source", "coco", "--captions", "{bad}/none.json"], "no such file"),
])
def test_bad_input_gives_one_line_error(args, message, vae, bad_checkpoints, tmp_path, capsys):
    args = [a.format(bad=bad_checkpoints, sl=vae[1]) for a in args]
    code, _, err = cli(lambda: prepare.main([*args, "--out", str(tmp_path / "o")]), capsys, "prepare.py")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: ") and message in lines[0], err
    assert not (tmp_path / "o" / "meta.json").exists()


def test_bad_input_from_the_shell(tmp_path):
    r = run(["--out", str(tmp_path / "o")], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("prepare.py: error: --vae is required"), r.stderr
