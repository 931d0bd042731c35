"""Fashion-MNIST on a tiny fixture written in the real idx format (gzipped, with the
real magic numbers): the reader and its one-line errors, the images and captions, prepare.py
--source fashion-mnist (the official split kept), train_vae.py --data fashion-mnist (never reads
the test files), and `evaluate.py fashion` end to end on tiny models. The real files are not needed."""

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import augvae
import data
import runtime
import shapes
import evaluate
import metrics
import prepare
import sample
import tokenizer
import train_gpt
import train_vae
from conftest import save_tiny_vae
from test_metrics import textbook_fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
N_TRAIN, N_TEST = 200, 30
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: uint8, 3 dimensions; 0x00000801: uint8, 1

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def fake_fashion(n: int, seed: int) -> tuple:
    """n 28x28 uint8 images, a bright band whose height says the class, on dark noise; labels 0..9."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
    for image, c in zip(images, labels):
        image[2 + 2 * c:8 + 2 * c, 3:25] = 220
    return images, labels


def write_fashion(folder, splits=("train", "test"), gz=True, damage=None):
    """The idx files as LeCun's page specifies them: big-endian magic and sizes, then the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        if split not in splits:
            continue
        images, labels = fake_fashion(n, seed)
        blobs = {"images": struct.pack(">IIII", IMAGES_MAGIC, n, 28, 28) + images.tobytes(),
                 "labels": struct.pack(">II", LABELS_MAGIC, n) + labels.tobytes()}
        if damage and split == "test":
            blobs = damage(blobs, images, labels)
        for kind, name in zip(("images", "labels"), data.FASHION_FILES[split]):
            if kind in blobs:
                blob = blobs[kind]
                (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return folder


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "sl.pt"
    return save_tiny_vae(path), str(path)


@pytest.fixture(scope="module")
def tokens(fashion_root, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "fashion"
    args = ["--vae", vae[1], "--source", "fashion-mnist", "--fashion-root", str(fashion_root), "--out", str(out),
            "--val-fraction", "0.1", "--chunk-size", "64"]
    return out, prepare.main(args), args


HELDOUT = {data.fashion_caption(c, t) for c in range(10) for t in data.FASHION_HELDOUT_TEMPLATES}


# --- the reader ------------------------------------------------------------------------------

def test_reader_reads_the_real_format(fashion_root, tmp_path):
    images, labels = data.read_fashion_mnist(str(fashion_root), "train")
    want_images, want_labels = fake_fashion(N_TRAIN, 0)
    assert images.dtype == np.uint8 and images.shape == (N_TRAIN, 28, 28)
    assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)
    plain = write_fashion(tmp_path / "plain", gz=False)  # uncompressed files read the same
    assert np.array_equal(data.read_fashion_mnist(str(plain), "test")[0], fake_fashion(N_TEST, 1)[0])
    path = tmp_path / "int32-idx"  # another idx type: big-endian int32, 2 dimensions
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 3) + np.arange(6, dtype=">i4").tobytes())
    assert np.array_equal(data.read_idx(path), np.arange(6).reshape(2, 3))


def _set(kind, blob):
    return lambda blobs, images, labels: {**blobs, kind: blob}


DAMAGES = {  # what is wrong with the test files -> a piece of the message
    "bad magic": (_set("images", struct.pack(">IIII", 0x12340803, N_TEST, 28, 28)), "not an idx file"),
    "labels as images": (lambda b, i, l: {**b, "images": b["labels"]}, "has 1 dimension(s), expected 3"),
    "truncated": (lambda b, i, l: {**b, "images": b["images"][:-100]}, "bytes, expected"),
    "fewer labels": (lambda b, i, l: {**b, "labels": struct.pack(">II", LABELS_MAGIC, N_TEST - 1) + l[1:].tobytes()},
                     f"{N_TEST} test images but {N_TEST - 1} labels"),
    "label 12": (lambda b, i, l: {**b, "labels": b["labels"][:-1] + b"\x0c"}, "label 12 outside 0..9"),
    "27 px": (_set("images", struct.pack(">IIII", IMAGES_MAGIC, N_TEST, 27, 27) + bytes(N_TEST * 27 * 27)),
              "are 27x27, expected 28x28"),
    "missing": (lambda b, i, l: {"labels": b["labels"]}, "no t10k-images-idx3-ubyte(.gz) in"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_bad_files_are_one_line_errors(name, tmp_path):
    damage, message = DAMAGES[name]
    root = write_fashion(tmp_path / "bad", damage=damage)
    with pytest.raises(data.ImageError, match=re.escape(message)) as e:
        data.read_fashion_mnist(str(root), "test")
    assert "\n" not in str(e.value) and str(root) in str(e.value)
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(e.value) or name == "missing"
    assert data.read_fashion_mnist(str(root), "train")[0].shape == (N_TRAIN, 28, 28)  # the other split is fine


def test_cut_off_gzip_is_a_one_line_cli_error(tmp_path, vae):
    root = write_fashion(tmp_path / "cut")
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--vae", vae[1], "--source",
                        "fashion-mnist", "--fashion-root", str(root), "--out", str(tmp_path / "tok")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("prepare.py: error: ") and "not a readable idx file" in r.stderr


# --- images and captions ---------------------------------------------------------------------

def test_images_are_inverted_and_padded_with_white():
    pixels, _ = fake_fashion(4, 0)
    img = data.fashion_image(pixels[0])
    a = np.asarray(img)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert (a[:2] == 255).all() and (a[-2:] == 255).all() and (a[:, :2] == 255).all() and (a[:, -2:] == 255).all()
    assert np.array_equal(a[2:30, 2:30, 0], 255 - pixels[0]) and (a == a[..., :1]).all()
    assert data.fashion_image(pixels[0], 64).size == (64, 64)
    for size in (32, 64):  # the evaluation's batch path gives the same pixels
        want = torch.stack([data.to_tensor(data.fashion_image(p, size))[:1] for p in pixels])
        assert torch.equal(metrics.fashion_batch(pixels, size), want)
    with pytest.raises(ValueError, match="28, 28"):
        data.fashion_image(pixels[0][:27])


def test_every_paraphrase_parses_back_and_heldout_ones_stay_out_of_training():
    words = lambda text: set(re.findall(r"[a-z]+", text))  # noqa: E731
    training_words = words(" ".join(data.FASHION_TEMPLATES))
    for t in data.FASHION_HELDOUT_TEMPLATES:
        assert t not in data.FASHION_TEMPLATES and words(t) <= training_words, t  # new sentences, no new words
    clip = tokenizer.Tokenizer()
    for c in range(10):
        for t in data.FASHION_TEMPLATES + data.FASHION_HELDOUT_TEMPLATES:
            caption = data.fashion_caption(c, t)
            decoded = sample.tidy_caption(clip.decode(clip.encode(caption)))  # 'a t - shirt .' as sampled
            for form in (caption, caption.upper(), caption.rstrip("."), decoded):
                assert data.parse_fashion_caption(form) == c, form
    training = {cap for i in range(400) for split in ("train", "test")
                for cap in data.fashion_captions(i % 10, i, split)}
    assert len(training) == 10 * len(data.FASHION_TEMPLATES) and not training & HELDOUT
    caps = data.fashion_captions(9, 5)
    assert caps == data.fashion_captions(9, 5) and len(set(caps)) == shapes.CAPTIONS_PER_IMAGE
    for text, want in [("a shirt and a t-shirt.", None), ("A T-SHIRT", 0), ("a shirt.", 6), ("two sneakers", 7),
                       ("a handbag.", None), ("nothing here.", None), ("an ankle boot beside a boot.", 9),
                       ("Trousers", 1), ("a pair of trousers on a dress.", None)]:
        assert data.parse_fashion_caption(text) == want, text
    with pytest.raises(TypeError):
        data.parse_fashion_caption(None)


# --- prepare.py and train_vae.py -------------------------------------------------------------

def test_prepare_keeps_the_official_split(tokens, fashion_root, vae):
    out, meta, args = tokens
    assert {s: c["images"] for s, c in meta["splits"].items()} == {"train": 180, "val": 20, "test": N_TEST}
    lines = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
             for s in ("train", "val", "test")}
    names = {s: [line["image"] for line in lines[s]] for s in lines}
    assert sorted(names["train"] + names["val"], key=lambda n: int(n[6:])) == [f"train/{i}" for i in range(N_TRAIN)]
    assert names["test"] == [f"test/{i}" for i in range(N_TEST)]  # the test images only here
    _, val_idx = data.split_indices(N_TRAIN, 0.1, 0)
    assert names["val"] == [f"train/{i}" for i in val_idx]  # the slice train_vae.py validates on too
    official = {"train": data.read_fashion_mnist(str(fashion_root), "train"),
                "test": data.read_fashion_mnist(str(fashion_root), "test")}
    for split in lines:
        for line in lines[split]:
            which, i = line["image"].split("/")
            label = int(official[which][1][int(i)])
            assert line["label"] == label and line["class"] == data.FASHION_CLASSES[label]
            assert len(line["captions"]) == 5 and not set(line["captions"]) & HELDOUT
            assert all(data.parse_fashion_caption(c) == label for c in line["captions"])
    x = torch.stack([data.to_tensor(data.fashion_image(p, 32)) for p in official["test"][0]])
    assert np.array_equal(np.load(out / "test.npy"), vae[0].encode(x).reshape(N_TEST, -1).numpy())
    assert prepare.main(args) is None  # a rerun is a no-op


def test_train_vae_reads_only_the_official_training_images(tmp_path):
    root = write_fashion(tmp_path / "train_only", splits=("train",))  # no test files: they are never read
    out = tmp_path / "ml"
    train_vae.main(["--ml", "--preset", "fashion", "--data", "fashion-mnist", "--fashion-root", str(root),
                    "--batch-size", "8", "--val-size", "8", "--max-steps", "2", "--grid-images", "4", "--out", str(out)])
    ckpt = runtime.load_checkpoint(out / "ckpt.pt", "augvae")
    assert ckpt["step"] == 2 and ckpt["config"]["image_size"] == 32 and "val_psnr" in (out / "log.txt").read_text()
    cfg = {"data": "fashion-mnist", "fashion_root": str(root), "val_fraction": 0.1, "seed": 0, "val_size": 100}
    train, val = train_vae.make_datasets(cfg, 32)
    _, val_idx = data.split_indices(N_TRAIN, 0.1, 0)
    assert val.indices == val_idx and len(train) == N_TRAIN - len(val_idx) and not set(train.indices) & set(val_idx)
    assert train[0].shape == (3, 32, 32)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_vae.py"), "--ml", "--data", "fashion-mnist",
                        "--fashion-root", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("train_vae.py: error: no train-images-idx3-ubyte(.gz) in")


# --- evaluate.py fashion -----------------------------------------------------------------------

def test_image_metrics_by_hand():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    real = torch.randn(200, 4, generator=g, dtype=torch.float64).float()
    same = metrics.fashion_image_metrics(labels, real, labels, real, labels)
    assert same["accuracy"] == 1 and same["fd"] == pytest.approx(0, abs=1e-6) and same["diversity"] == pytest.approx(1)
    one_each = real[labels]  # one image per class, repeated: no diversity, far from each class's spread
    collapsed = metrics.fashion_image_metrics((labels + 1) % 10, one_each, labels, real, labels)
    assert collapsed["accuracy"] == 0 and collapsed["diversity"] == 0
    assert collapsed["fd"] == pytest.approx(textbook_fid(real, one_each), rel=1e-9)
    for c, m in enumerate(collapsed["per_class"].values()):  # drawn: one point, no covariance
        r = real[labels == c].double()
        assert m["diversity"] == 0
        assert m["fd"] == pytest.approx(((r.mean(0) - real[c]) ** 2).sum() + r.var(0).sum(), rel=1e-9)  # |dmu|^2 + tr S


@pytest.fixture(scope="module")
def models(tokens, vae, tmp_path_factory):
    """A BPE from the fixture's training captions and 10 steps of a 1-layer BiART."""
    out = tokens[0]
    folder = tmp_path_factory.mktemp("fashion_gpt")
    captions = [c for line in (out / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    bpe = str(folder / "bpe.txt.gz")
    tokenizer.write_merges(bpe, tokenizer.train_bpe(captions, 600))
    train_gpt.main(["--tokens", str(out), "--bpe", bpe, "--out", str(folder / "gpt"), "--n-layer", "1",
                    "--n-embd", "32", "--n-head", "2", "--text-len", "24", "--batch-size", "8", "--eval-images", "8",
                    "--max-steps", "10", "--lr", "3e-3", "--bpe-dropout", "0", "--device", "cpu"])
    return vae[1], str(folder / "gpt" / "ckpt.pt")


def test_evaluate_fashion_end_to_end(models, fashion_root, tmp_path, capsys, monkeypatch):
    vae, gpt = models
    judged, image_metrics = [], metrics.fashion_image_metrics  # the features the drawn images are judged by
    monkeypatch.setattr(metrics, "fashion_image_metrics", lambda *a: judged.append(a) or image_metrics(*a))
    args = ["fashion", "--vae", vae, "--gpt", gpt, "--fashion-root", str(fashion_root), "--classifier",
            str(tmp_path / "clf.pt"), "--classifier-epochs", "2", "--limit", "12", "--per-class", "3",
            "--caption-candidates", "2", "--image-candidates", "2", "--grid-columns", "2",
            "--out", str(tmp_path / "eval"), "--json", str(tmp_path / "fashion.json"), "--device", "cpu"]
    res = evaluate.main(args)
    stdout = capsys.readouterr().out
    assert res == json.loads((tmp_path / "fashion.json").read_text())

    clf = res["classifier"]  # trained here on the training images; its accuracy recomputed by hand
    ckpt = runtime.load_checkpoint(tmp_path / "clf.pt", evaluate.FASHION_CLASSIFIER_KIND)
    model = metrics.FashionClassifier(ckpt["config"]["width"], ckpt["config"]["features"])
    model.load_state_dict(ckpt["model"])
    test_pixels, test_labels = data.read_fashion_mnist(str(fashion_root), "test")
    preds, real_feats = metrics.classify(model, metrics.fashion_batch(test_pixels))
    assert clf["trained_now"] and clf["test_accuracy"] == float((preds.numpy() == test_labels).mean())
    assert clf["void"] == (clf["test_accuracy"] < 0.9) and clf["void"] == ("VOID" in stdout)
    with torch.no_grad():  # the judge on the first 12 test images after AugVAE-SL, as saved 8-bit images
        x = metrics.fashion_batch(test_pixels[:12]).expand(-1, 3, -1, -1)
        sl = augvae.load(vae)
        back = sl.decode(sl.encode(x)).clamp(-1, 1)
        back = ((back + 1) * 127.5).round() / 127.5 - 1
    recon_preds, _ = metrics.classify(model, back)
    assert clf["reconstructions_accuracy"] == float((recon_preds.numpy() == test_labels[:12]).mean())
    assert f"the judge reads {100 * clf['reconstructions_accuracy']:.1f}% of the AugVAE-SL reconstructions" in stdout

    i2t, truth = res["i2t"], np.bincount(test_labels[:12], minlength=10)
    for r in ("none", "self"):
        confusion = np.array(i2t[r]["confusion"])
        assert confusion.shape == (10, 10)
        assert np.array_equal(confusion.sum(1) + np.array(i2t[r]["no_class"]), truth)  # every image counted once
        assert i2t[r]["accuracy"] == confusion.trace() / 12
    assert "confusion matrix" in stdout and "T-shirt/top" in stdout

    t2i = res["t2i"]
    assert t2i["captions"] == sorted(data.fashion_caption(c, t) for c in range(10)
                                     for t in data.FASHION_HELDOUT_TEMPLATES[:3])  # 3 per class, held-out only
    for r, (_, feats, classes, real_judged, real_labels) in zip(("none", "self"), judged):
        m = t2i[r]
        assert list(m["per_class"]) == list(data.FASHION_CLASSES)
        assert m["accuracy"] == pytest.approx(np.mean([p["accuracy"] for p in m["per_class"].values()]))
        # the Frechet distance: the drawn images' features against those of the real test images
        assert torch.allclose(real_judged, real_feats, atol=1e-6) and np.array_equal(real_labels, test_labels)
        assert np.bincount(classes, minlength=10).tolist() == [3] * 10 and m["diversity"] >= 0
        assert m["fd"] == pytest.approx(textbook_fid(real_feats, feats), rel=1e-6)
        for c, p in enumerate(m["per_class"].values()):
            assert p["fd"] == pytest.approx(textbook_fid(real_feats[test_labels == c], feats[classes == c]), rel=1e-6)
        assert all(round(p["accuracy"] * 3) == p["accuracy"] * 3 for p in m["per_class"].values())  # k of 3
    for name in ("t2i_self.png", "t2i_none.png", "real.png"):  # one row per class, 2 columns
        assert Image.open(tmp_path / "eval" / name).size == (2 + 2 * 34, 2 + 10 * 34)
    # --guidance reaches the drawings: the same seed draws other images
    plain = np.asarray(Image.open(tmp_path / "eval" / "t2i_none.png"))
    evaluate.main([*args, "--directions", "t2i", "--guidance", "3", "--out", str(tmp_path / "eval_g3"),
                   "--json", str(tmp_path / "g3.json")])
    assert not np.array_equal(plain, np.asarray(Image.open(tmp_path / "eval_g3" / "t2i_none.png")))

    # the CLI: a second run loads the cached classifier; bad flags are one-line errors
    cli = [sys.executable, os.path.join(ROOT, "evaluate.py")]
    r = subprocess.run([*cli, *args, "--directions", "i2t", "--limit", "3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "loaded; trained on" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "fashion.json").read_text())["classifier"]["test_accuracy"] == clf["test_accuracy"]
    r = subprocess.run([*cli, *args, "--directions", "nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 2 and r.stderr.strip() == "evaluate.py: error: --directions must be i2t, t2i or both, got 'nope'"


def test_recon_reads_the_fashion_test_images(vae, fashion_root, tmp_path):
    res = evaluate.main(["recon", "--vae", vae[1], "--source", "fashion-mnist", "--fashion-root", str(fashion_root),
                         "--limit", "5", "--json", str(tmp_path / "recon.json")])
    assert res["images"] == 5
    # PSNR of the first 5 test images (inverted, padded to 32 px, in [-1, 1]: peak-to-peak 2)
    pixels = fake_fashion(N_TEST, 1)[0][:5]
    x = torch.from_numpy(np.pad(255 - pixels, ((0, 0), (2, 2), (2, 2)), constant_values=255)).float() / 127.5 - 1
    x = x[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        recon = vae[0].decode_levels(vae[0].encode_levels(x)).clamp(-1, 1)
    mse = ((recon - x) ** 2).flatten(1).mean(1).double()
    assert res["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-5)
