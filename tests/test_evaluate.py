"""evaluate.py: caption metrics on hand-computed cases and against the COCO toolkit (pycocoevalcap,
when it and java are installed), PTB tokenization on cases measured with the toolkit's jar, FID
against closed forms and scipy, SSIM, the FID-k blur, the FID Inception's layout, and the recon /
fid / caption-metrics subcommands (as subprocesses where the one-line errors matter)."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import augvae
import data
import evaluate
import tokenizer
from conftest import save_tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
INCEPTION_FAST = ["--inception", "random", "--inception-size", "75"]  # random weights at 75 px: plumbing only

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(args, cwd, timeout=180):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py") and "error:" in lines[0], result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# -----------------------------------------------------------------------------------------
# PTB tokenization: each expected output is what pycocoevalcap's PTBTokenizer (Stanford CoreNLP
# 3.4.1, -preserveLines -lowerCase, then its punctuation list) gave for the caption

PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ('The dog\'s bone isn\'t here, it\'s "over there" (maybe) [or not].',
     "the dog 's bone is n't here it 's over there -lrb- maybe -rrb- -lsb- or not -rsb-"),
    ("I can't believe they're gonna win; cannot wanna.", "i ca n't believe they 're gon na win can not wan na"),
    ("Mr. Smith went to Washington D.C. at 5 p.m. on Jan. 5th, 2014...",
     "mr. smith went to washington d.c. at 5 p.m. on jan. 5th 2014"),
    ("A black-and-white photo -- of a cat & dog and/or a bird; $5.00 costs 1,000 #1 50% off!",
     "a black-and-white photo of a cat & dog and/or a bird $ 5.00 costs 1,000 # 1 50 % off"),
    ("Two dogs' toys. I'd, you'll, we've... o'clock", "two dogs toys i 'd you 'll we 've o'clock"),
    ("A café with naïve “smart” quotes — em dash – en dash … ellipsis",
     "a café with naïve smart quotes em dash en dash ellipsis"),
    ("  A   man\twith  tabs and spaces.   ", "a man with tabs and spaces"),
    ("Wow!! Really?! ok", "wow !! really ?! ok"),
    ("DON'T stop 'Til it's 3.5mm, St. Louis etc. AT&T", "do n't stop 'til it 's 3.5 mm st. louis etc. at&t"),
    ("", ""),
    ("...", ""),
]


@pytest.mark.parametrize("caption, expected", PTB_CASES)
def test_ptb_tokenize_cases(caption, expected):
    assert evaluate.ptb_tokenize(caption) == expected.split()


def test_ptb_tokenize_reads_the_next_line_like_the_jar():
    # the jar tokenizes one file: a single letter keeps its period unless the next word, here
    # on the next caption line, is a capitalised sentence start
    assert evaluate.ptb_tokenize_lines(["a sign with the letter a.", "A dog runs"])[0][-1] == "a"
    assert evaluate.ptb_tokenize_lines(["a sign with the letter a.", "Two dogs run"])[0][-1] == "a."
    assert evaluate.ptb_tokenize_lines(["line one\nstill one", "two"]) == [["line", "one", "still", "one"], ["two"]]


# -----------------------------------------------------------------------------------------
# BLEU, ROUGE-L, CIDEr-D on inputs small enough to compute by hand

TINY, SMALL = 1e-15, 1e-9  # the toolkit's guards


def toks(text):
    return text.split()


def test_bleu_by_hand():
    cand, ref = toks("the cat sat on the mat"), toks("the cat is on the mat")
    # clipped matches / candidate n-grams: 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3; equal lengths: a brevity penalty of 1, but for the
    # guards ((6 + 1e-15) / (6 + 1e-9) < 1 gives exp(-1.7e-10), as in the toolkit)
    p = [(5 + TINY) / (6 + SMALL), (3 + TINY) / (5 + SMALL), (1 + TINY) / (4 + SMALL), TINY / (3 + SMALL)]
    brevity = math.exp(1 - (6 + SMALL) / (6 + TINY))
    expected = [math.prod(p[:k + 1]) ** (1 / (k + 1)) * brevity for k in range(4)]
    got = evaluate.bleu([cand], [[ref]])
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[1] == pytest.approx(math.sqrt(0.5)) and got[2] == pytest.approx(0.5)
    # brevity: 2 candidate words against the closest reference length 6 -> exp(1 - 6/2)
    got = evaluate.bleu([toks("the cat")], [[toks("the cat is on the mat"), toks("there is a cat on it")]])
    assert got[0] == pytest.approx(math.exp(-2), rel=1e-9)
    # 'closest' takes the shorter reference on a tie: 4 words between lengths 3 and 5 -> no penalty
    got = evaluate.bleu([toks("a b c d")], [[toks("a b c"), toks("a b c d e")]])
    assert got[0] == pytest.approx(1.0, rel=1e-9)
    # clipping: 'the the the' matches 'the' at most twice (the reference's count)
    got = evaluate.bleu([toks("the the the")], [[toks("the cat the")]])
    assert got[0] == pytest.approx(2 / 3, rel=1e-9)
    # corpus level: counts are summed before dividing (2 + 0) / (2 + 2), not averaged per sentence
    got = evaluate.bleu([toks("a b"), toks("c d")], [[toks("a b")], [toks("e f")]])
    assert got[0] == pytest.approx(0.5, rel=1e-9)


def test_rouge_l_by_hand():
    # LCS 3 of candidate 3 and reference 6 words: P = 1, R = 0.5, F = 2.44 * 0.5 / (0.5 + 1.44)
    assert evaluate.rouge_l([toks("a b c")], [[toks("a b c d e f")]]) == pytest.approx(1.22 / 1.94, rel=1e-12)
    # the best precision and the best recall are taken over the references separately
    assert evaluate.rouge_l([toks("a b c d")], [[toks("a b"), toks("a b c d e f g h")]]) == pytest.approx(1.0)
    # corpus score = mean over candidates; an empty candidate scores 0
    assert evaluate.rouge_l([toks("a b c"), []], [[toks("a b c")], [toks("x")]]) == pytest.approx(0.5)


def test_cider_d_by_hand():
    # two images, so idf = log 2 for n-grams in one image's references (and for unseen ones).
    # Image 1 matches its reference in 1- and 2-grams (cosine 1 each, 0 for 3, 4-grams): 10 * 2/4 = 5.
    # Image 2 "c d" vs "c e": unigram cosine 1/2, bigram 0: 10 * 0.5/4 = 1.25.
    got = evaluate.cider_d([toks("a b"), toks("c d")], [[toks("a b")], [toks("c e")]])
    assert got == pytest.approx((5 + 1.25) / 2, rel=1e-12)
    # clipping and the length penalty: "a a" vs "a": the candidate's weight 2 log2 is clipped at
    # log2, cosine 1/2 (1 without clipping); one bigram more than the reference -> exp(-1/72)
    got = evaluate.cider_d([toks("a a"), toks("b")], [[toks("a")], [toks("b")]])
    assert got == pytest.approx((1.25 * math.exp(-1 / 72) + 2.5) / 2, rel=1e-12)
    # averaged over the references of an image
    got = evaluate.cider_d([toks("a b"), toks("c d")], [[toks("a b"), toks("x y")], [toks("c e")]])
    assert got == pytest.approx((5 / 2 + 1.25) / 2, rel=1e-12)


def test_caption_metrics_keys_and_absent_java_metrics(monkeypatch):
    cands = {"1": "A dog.", "2": "Two cats on a mat."}
    refs = {"1": ["A dog runs.", "The dog."], "2": ["Two cats sit on a mat.", "cats"], "3": ["unused"]}
    got = evaluate.caption_metrics(cands, refs, java=False)
    assert list(got) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert got["METEOR"] is None and got["SPICE"] is None  # absent, never 0
    assert all(0 <= got[k] <= 1 for k in ("Bleu_1", "Bleu_4", "ROUGE_L")) and got["CIDEr"] > 0
    monkeypatch.setattr(evaluate, "java_metric_status", lambda: {"METEOR": "no java", "SPICE": "no java"})
    got2 = evaluate.caption_metrics(cands, refs, java=True)
    assert got2 == got
    with pytest.raises(ValueError, match="no list of reference captions"):
        evaluate.caption_metrics({"9": "a dog"}, refs, java=False)


def _toolkit_available():
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def _parity_set(n=150, seed=0):
    """Realistic captions: shapes (1 and 2 objects) and COCO-like ones, 5 references per image,
    candidates copied, truncated, swapped, upper-cased, punctuated or empty."""
    rng = random.Random(seed)
    bench = tokenizer.bench_captions(5 * n, seed)
    cands, refs = {}, {}
    for i in range(n):
        if i % 2:
            r = data.shapes_example(i, "test", 32, num_objects=1 + i % 4 // 2).captions
        else:
            r = bench[5 * i:5 * i + 5]
        refs[f"img{i}"] = list(r)
        other = bench[(5 * i + 7) % len(bench)]
        cands[f"img{i}"] = rng.choice([
            r[0], other, " ".join(r[1].split()[:rng.randint(1, 6)]), r[2].upper(), "", ".",
            r[3].replace(" a ", " (a) ") + " It's the dog's, isn't it?", f'"{r[4]}" -- said Mr. Smith; etc.'])
    return cands, refs


@pytest.mark.skipif(not _toolkit_available(), reason="needs pycocoevalcap and java")
def test_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    cands, refs = _parity_set()
    ptb = PTBTokenizer()
    gts = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = ptb.tokenize({k: [{"caption": cands[k]}] for k in refs})
    ours = evaluate.ptb_tokenize_lines([c for v in refs.values() for c in v])
    assert [" ".join(t) for t in ours] == [c for v in gts.values() for c in v]
    assert [" ".join(t) for t in evaluate.ptb_tokenize_lines(list(cands.values()))] == [v[0] for v in res.values()]
    expected = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = evaluate.caption_metrics(cands, refs, java=False)
    for k, v in expected.items():
        assert got[k] == pytest.approx(float(v), abs=1e-9), k


@pytest.mark.skipif(not (_toolkit_available() and os.environ.get("EVAL_TEST_METEOR")),
                    reason="needs pycocoevalcap and java; METEOR loads for ~20 s, so set EVAL_TEST_METEOR=1")
def test_meteor_matches_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor
    cands, refs = _parity_set(30, seed=1)
    flat = iter(evaluate.ptb_tokenize_lines([c for v in refs.values() for c in v]))  # one file, as the toolkit
    gts = {k: [" ".join(next(flat)) for _ in v] for k, v in refs.items()}
    res = {k: [" ".join(t)] for k, t in zip(refs, evaluate.ptb_tokenize_lines(list(cands.values())))}
    meteor = Meteor()
    expected = meteor.compute_score(gts, res)[0]
    del meteor
    got = evaluate.caption_metrics(cands, refs, java=True)
    assert got["METEOR"] == pytest.approx(expected, abs=1e-9)


# -----------------------------------------------------------------------------------------
# the Frechet distance

def test_gaussian_stats_is_np_cov():
    f = np.random.default_rng(0).random((50, 7), dtype=np.float32)
    mu, sigma = evaluate.gaussian_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        evaluate.gaussian_stats(f[:1])


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    for n, d in ((200, 16), (10, 64)):  # full-rank covariance route, then the low-rank route
        f = rng.random((n, d))
        assert abs(evaluate.fid_from_features(f, f)) < 1e-9


def test_frechet_closed_forms():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # a shifted and scaled Gaussian: sigma2 = c^2 sigma1 -> |dmu|^2 + (1 - c)^2 tr(sigma1)
    a = rng.normal(size=(d, d))
    sigma, c = a @ a.T + 0.1 * np.eye(d), 1.7
    got = evaluate.frechet_distance(mu1, sigma, mu1 + 0.5, c * c * sigma)
    assert got == pytest.approx(0.25 * d + (1 - c) ** 2 * np.trace(sigma), rel=1e-10)


def test_fid_low_rank_route_equals_covariance_route():
    rng = np.random.default_rng(3)
    f1, f2 = rng.random((20, 64)) ** 2, rng.random((30, 64))
    full = evaluate.frechet_distance(*evaluate.gaussian_stats(f1), *evaluate.gaussian_stats(f2))
    # singular covariances: the covariance route keeps ~1e-8 relative rounding (as scipy's sqrtm
    # does); the low-rank route agreed with a 40-digit computation to 1e-16
    assert evaluate.fid_from_features(f1, f2) == pytest.approx(full, rel=1e-6)
    f3 = rng.random((100, 8))  # full rank: the covariance route itself
    assert evaluate.fid_from_features(f3, f2[:, :8]) == pytest.approx(
        evaluate.frechet_distance(*evaluate.gaussian_stats(f3), *evaluate.gaussian_stats(f2[:, :8])), rel=1e-12)


def test_frechet_retries_with_eps_when_the_root_fails(monkeypatch):
    calls, real = [], evaluate.trace_sqrt_product

    def flaky(s1, s2):
        calls.append(s1.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("did not converge")
        return real(s1, s2)

    monkeypatch.setattr(evaluate, "trace_sqrt_product", flaky)
    sigma = np.diag([1.0, 2.0])
    assert evaluate.frechet_distance([0, 0], sigma, [0, 0], sigma) == pytest.approx(0, abs=1e-5)
    np.testing.assert_allclose(calls[1] - calls[0], 1e-6 * np.eye(2))


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")

    def pytorch_fid_formula(mu1, s1, mu2, s2, eps=1e-6):  # pytorch-fid's calculate_frechet_distance
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
        covmean = covmean.real
        diff = mu1 - mu2
        return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)

    rng = np.random.default_rng(4)
    for n1, n2, d, rel in ((400, 300, 32, 1e-10), (40, 50, 96, 1e-6)):  # full rank, then singular
        s1 = evaluate.gaussian_stats(rng.random((n1, d)) ** 3)
        s2 = evaluate.gaussian_stats(rng.random((n2, d)))
        assert evaluate.frechet_distance(*s1, *s2) == pytest.approx(pytorch_fid_formula(*s1, *s2), rel=rel)


# -----------------------------------------------------------------------------------------
# SSIM and the FID-k blur

def _ssim_by_windows(x, y):
    """SSIM by explicit 11x11 windows (one channel of float64 numpy arrays in [0, 1])."""
    t = np.arange(11) - 5
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, vals = 0.01 ** 2, 0.03 ** 2, []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2, (w * a * b).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 14)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert evaluate.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    expected = [np.mean([_ssim_by_windows(x[b, c].double().numpy(), y[b, c].double().numpy()) for c in range(3)])
                for b in range(2)]
    assert evaluate.ssim(x, y).tolist() == pytest.approx(expected, abs=1e-6)
    assert evaluate.ssim(255 * x, 255 * y, data_range=255).tolist() == pytest.approx(expected, abs=1e-6)
    # constant images a and b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.4, 0.01 ** 2
    got = evaluate.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    with pytest.raises(ValueError):
        evaluate.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_blur_radii():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    assert np.array_equal(np.asarray(evaluate.blur(img, 0)), np.asarray(img))  # k = 0: no blur

    def high_frequency(im):  # energy of the differences between neighbouring pixels
        a = np.asarray(im, dtype=np.float64)
        return (np.diff(a, axis=0) ** 2).mean() + (np.diff(a, axis=1) ** 2).mean()

    energy = [high_frequency(evaluate.blur(img, k)) for k in evaluate.FID_BLUR_RADII]
    assert all(e1 > 2 * e2 for e1, e2 in zip(energy, energy[1:])), energy
    with pytest.raises(ValueError):
        evaluate.blur(img, -1)


def _write_images(folder, indices, blur_radius=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        img = Image.fromarray(data.shapes_example(i, "test", 32).image, "RGB")
        evaluate.blur(img, blur_radius).save(folder / f"{i:03d}.png")
    return folder


def test_fid_blurs_both_sets(tmp_path, monkeypatch):
    real, fake = _write_images(tmp_path / "real", range(3)), _write_images(tmp_path / "fake", range(3, 7))
    (fake / "broken.png").write_bytes(b"not a png")  # skipped and listed, not fatal
    seen, real_blur = [], evaluate.blur
    monkeypatch.setattr(evaluate, "blur", lambda img, r: seen.append(r) or real_blur(img, r))
    out = evaluate.main(["fid", str(real), str(fake), "--blur", "0,2", *INCEPTION_FAST,
                         "--json", str(tmp_path / "fid.json")])
    assert sorted(seen) == [0] * 7 + [2] * 7  # every readable image of BOTH sets, at each radius
    assert out["real"]["images"] == 3 and out["generated"]["images"] == 4 and out["generated"]["skipped"] == 1
    assert set(out["fid"]) == {"0", "2"} and all(v > 0 for v in out["fid"].values())
    # the Inception input at radius k is the 8-bit image blurred with radius k, then resized
    ds = evaluate.BlurredImages([str(real / "000.png")], (0, 2), 75)
    views, ok, _ = ds[0]
    img = data.load_image(real / "000.png")
    assert ok and torch.equal(views[1], evaluate.inception_input(real_blur(img, 2), 75))
    assert not torch.equal(views[0], views[1])


# -----------------------------------------------------------------------------------------
# the FID Inception

def test_inception_layout_forward_and_strict_load(tmp_path):
    model = evaluate.load_inception("random", 75)
    state = model.state_dict()
    # the FID weights file's layout: torchvision's Inception3 names, 1008 classes, no aux head
    assert len(state) == 566 and sum(p.numel() for p in model.parameters()) == 23_850_960
    assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    assert tuple(state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape) == (384,)
    assert tuple(state["fc.weight"].shape) == (1008, 2048) and not any(k.startswith("AuxLogits") for k in state)
    # the FID graph's pools: averages ignore the zero padding (a constant stays constant at the
    # border), and the last block max-pools
    assert torch.equal(evaluate._tf_avg_pool(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")
    x = torch.rand(2, 3, 40, 52)
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.std() > 0
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    with torch.no_grad():
        assert torch.equal(evaluate.load_inception(str(path), 75)(x), feats)
    # a file from older PyTorch without BatchNorm's num_batches_tracked loads too
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    evaluate.load_inception(str(path), 75)
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(data.CheckpointError, match="not the FID Inception weights"):
        evaluate.load_inception(str(path), 75)
    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate.load_inception("", 75)


def test_inception_at_299():
    model = evaluate.load_inception("random")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
        again = model(evaluate.resize_for_inception(x, 299))  # resizing is bilinear, align_corners=False
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    assert torch.equal(feats, again)


def test_inception_matches_pytorch_fid():
    try:
        import pytorch_fid.inception as pfi
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        pytest.skip("needs pytorch-fid and torchvision")
    ours = evaluate.load_inception("random", 75)
    state = ours.state_dict()
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: {k2: v.clone() for k2, v in state.items()}
    try:
        theirs = pfi.InceptionV3([3]).eval()
    finally:
        pfi.load_state_dict_from_url = original
    x = torch.rand(2, 3, 60, 80)
    with torch.no_grad():  # pytorch-fid resizes to 299 itself; ours at 299 for the comparison
        ours.input_size = 299
        assert torch.allclose(ours(x), theirs(x)[0].flatten(1), atol=1e-5)


# -----------------------------------------------------------------------------------------
# recon

@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return {kind: (save_tiny_vae(folder / f"{kind}.pt", kind == "sl"), str(folder / f"{kind}.pt")) for kind in ("sl", "ml")}


def test_recon_cli(vaes, tmp_path):
    out = tmp_path / "recon.json"
    r = run(["recon", "--vae", vaes["sl"][1], "--limit", "5", "--batch-size", "2", *INCEPTION_FAST,
             "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["images"] == 5 and res["skipped"] == 0
    assert math.isfinite(res["psnr"]) and -1 <= res["ssim"] <= 1
    assert res["lpips"] is None and "absent" in r.stdout  # no LPIPS weights given
    assert isinstance(res["rfid"], float) and res["rfid"] >= 0
    assert res["codebook_usage"] == res["codes_used"] / 512 and 1 <= res["perplexity"] <= res["codes_used"]


@pytest.mark.parametrize("kind", ["sl", "ml"])
def test_recon_equals_direct_computation(vaes, tmp_path, kind):
    model, path = vaes[kind]
    res = evaluate.main(["recon", "--vae", path, "--limit", "4", "--json", str(tmp_path / "r.json")])
    x = torch.stack([data.ShapesDataset("test", 4, 32)[i] for i in range(4)])
    with torch.no_grad():
        tokens = model.encode_levels(x)
        recon = model.decode_levels(tokens)
    assert res["psnr"] == pytest.approx(augvae.psnr(recon, x).mean().item(), rel=1e-5)
    ssim = evaluate.ssim((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    assert res["ssim"] == pytest.approx(ssim.mean().item(), rel=1e-5)
    assert res["codes_used"] == len(torch.unique(torch.cat([t.flatten() for t in tokens])))
    assert len(res["levels"]) == len(model.cfg.token_levels)  # 1 for SL, every level for ML
    assert res["rfid"] is None and "rfid" in res["absent"]


def test_recon_lpips_from_weight_files(vaes, tmp_path):
    torch.manual_seed(1)
    lpips = augvae.LPIPS()  # random weights saved in the layouts of the two published files
    for lin in lpips.lins:
        lin.weight.data.uniform_(0, 1)
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(lpips.lins)}, tmp_path / "heads.pth")
    res = evaluate.main(["recon", "--vae", vaes["sl"][1], "--limit", "3", "--lpips-vgg", str(tmp_path / "vgg.pth"),
                         "--lpips-heads", str(tmp_path / "heads.pth"), "--json", str(tmp_path / "r.json")])
    x = torch.stack([data.ShapesDataset("test", 3, 32)[i] for i in range(3)])
    with torch.no_grad():
        expected = lpips.eval()(vaes["sl"][0].decode(vaes["sl"][0].encode(x)).clamp(-1, 1), x).mean().item()
    assert res["lpips"] == pytest.approx(expected, rel=1e-5) and "lpips" not in res["absent"]


# -----------------------------------------------------------------------------------------
# fid and caption-metrics from the command line, and the one-line errors

def test_fid_cli_and_identical_sets(tmp_path):
    real, fake = _write_images(tmp_path / "a", range(4)), _write_images(tmp_path / "b", range(4, 8), blur_radius=1)
    r = run(["fid", str(real), str(fake), "--blur", "0,2", *INCEPTION_FAST, "--json", str(tmp_path / "f.json")],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "f.json").read_text())
    assert set(res["fid"]) == {"0", "2"} and all(math.isfinite(v) and v > 0 for v in res["fid"].values())
    assert "k=0" in r.stdout and "k=2" in r.stdout
    same = evaluate.main(["fid", str(real), str(real), "--blur", "0,2", *INCEPTION_FAST,
                          "--json", str(tmp_path / "same.json")])
    assert all(abs(v) < 1e-6 for v in same["fid"].values())


def test_caption_metrics_cli_formats(tmp_path):
    cands, refs = _parity_set(20)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": k, "caption": v}) for k, v in cands.items()))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"image": k, "captions": v}) for k, v in refs.items()))
    expected = evaluate.caption_metrics(cands, refs, java=False)
    got = evaluate.main(["caption-metrics", str(tmp_path / "c.jsonl"), str(tmp_path / "r.jsonl"), "--no-java",
                         "--json", str(tmp_path / "m.json")])
    assert got["metrics"] == expected and got["images"] == 20
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["METEOR"] is None
    # COCO results + COCO annotations, and a Karpathy dataset_coco.json, give the same numbers
    ids = {k: n for n, k in enumerate(cands)}
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": ids[k], "caption": v} for k, v in cands.items()]))
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [
        {"image_id": ids[k], "id": j, "caption": c} for k, v in refs.items() for j, c in enumerate(v)]}))
    got = evaluate.main(["caption-metrics", str(tmp_path / "res.json"), str(tmp_path / "ann.json"), "--no-java",
                         "--json", str(tmp_path / "m2.json")])
    assert got["metrics"] == expected
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"split": "test", "filepath": "val2014", "filename": f"{k}.jpg", "sentences": [{"raw": c} for c in v]}
        for k, v in refs.items()]}))
    (tmp_path / "c2.json").write_text(json.dumps({os.path.join("val2014", f"{k}.jpg"): v for k, v in cands.items()}))
    got = evaluate.main(["caption-metrics", str(tmp_path / "c2.json"), str(tmp_path / "karpathy.json"), "--no-java",
                         "--json", str(tmp_path / "m3.json")])
    assert got["metrics"] == expected
    (tmp_path / "two.jsonl").write_text(json.dumps({"image": "img0", "captions": ["a", "b"]}))
    with pytest.raises(ValueError, match="give one per image"):
        evaluate.main(["caption-metrics", str(tmp_path / "two.jsonl"), str(tmp_path / "r.jsonl"),
                       "--json", str(tmp_path / "m4.json")])


def test_one_line_errors(vaes, tmp_path):
    folder = _write_images(tmp_path / "imgs", range(2))
    one_line_error(run(["fid", str(folder), str(folder)], cwd=tmp_path), "pt_inception-2015-12-05-6726825d.pth")
    ckpt = torch.load(vaes["sl"][1], weights_only=True)
    data.save_checkpoint({**ckpt, "kind": "biart"}, tmp_path / "gpt.pt")
    one_line_error(run(["recon", "--vae", str(tmp_path / "gpt.pt")], cwd=tmp_path), "is a 'biart' checkpoint")


def test_errors_in_process(vaes, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        evaluate.main(["fid", str(tmp_path / "none"), str(tmp_path), *INCEPTION_FAST])
    with pytest.raises(ValueError, match="--blur"):
        evaluate.main(["fid", str(tmp_path), str(tmp_path), "--blur", "0,x", *INCEPTION_FAST])
    with pytest.raises(ValueError, match="LPIPS needs both"):
        evaluate.main(["recon", "--vae", vaes["sl"][1], "--lpips-vgg", "vgg.pth"])
    with pytest.raises(ValueError, match="--split"):
        evaluate.main(["recon", "--vae", vaes["sl"][1], "--split", "nope"])
    with pytest.raises(SystemExit):
        evaluate.main(["nope"])


@pytest.mark.parametrize("name", list(evaluate.SUBCOMMANDS))
def test_help_explains_every_flag(name, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([name, "--help"])
    text = capsys.readouterr().out
    subcommands = evaluate.build_parser()._subparsers._group_actions[0]
    for action in subcommands.choices[name]._actions:
        assert action.help, action.option_strings or action.dest
    assert "--json" in text


# -----------------------------------------------------------------------------------------
# captions, t2i, shapes: BiART sampled through sample.Sampler (tiny models trained in conftest.py)

def test_shapes_accuracy_matches_a_hand_count(tiny_models, tmp_path):
    vae, gpt = tiny_models
    out = tmp_path / "shapes.json"
    r = run(["shapes", "--vae", vae, "--gpt", gpt, "--limit", "5", "--caption-candidates", "3",
             "--image-candidates", "2", "--splits", "test,heldout", "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for split in ("test", "heldout"):
        for d in ("i2t", "t2i"):
            for rerank in ("none", "self"):
                acc = res[split][d][rerank]
                assert set(acc) == {"shape", "colour", "size", "position", "exact"}
                assert all(0 <= v <= 1 and round(v * 5) == v * 5 for v in acc.values())  # k of 5 examples
                assert acc["exact"] <= min(acc[k] for k in ("shape", "colour", "size", "position"))
    assert "image->text" in r.stdout and "text->image" in r.stdout

    # the same numbers by hand, through the library: the caption the reranker picks, parsed back
    import sample
    s = sample.Sampler(vae, gpt, device="cpu", batch_size=128)
    got = evaluate.shapes_metrics(s, "test", 1, 5, 3, 2, 0.5, 8, 0, directions=("i2t",))
    s2 = sample.Sampler(vae, gpt, device="cpu", batch_size=128)
    g = torch.Generator().manual_seed(0)
    examples = [data.shapes_example(i, "test", 32) for i in range(5)]
    ids = s2.encode_images([Image.fromarray(e.image) for e in examples])
    exact = []
    for e, cands in zip(examples, s2.caption(ids, 3, rerank="self", temperature=0.5, top_k=8, generator=g)):
        best = max((c for c in cands if c[1] is not None), key=lambda c: c[1], default=cands[0])[0]
        truth = {"objects": e.objects, "relation": e.relation}
        exact.append(data.match_attributes(data.parse_caption(best), truth)["exact"])
    assert got["i2t"]["self"]["exact"] == sum(exact) / 5


def test_captions_writes_candidates_and_scores_them(tiny_models, tmp_path):
    vae, gpt = tiny_models
    out, cands = tmp_path / "captions.json", tmp_path / "captions.jsonl"
    r = run(["captions", "--vae", vae, "--gpt", gpt, "--limit", "4", "--num-candidates", "2", "--no-java",
             "--out", str(cands), "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert res["images"] == 4 and len(rows) == 4
    refs = {f"test/{i}": data.shapes_example(i, "test", 32).captions for i in range(4)}
    want = evaluate.caption_metrics({row["image"]: row["caption"] for row in rows}, refs, java=False)
    for k in ("Bleu_4", "ROUGE_L", "CIDEr"):
        assert res["metrics"][k] == pytest.approx(want[k])
    assert res["metrics"]["METEOR"] is None and "absent" in r.stdout


def test_t2i_draws_and_scores_fid(tiny_models, tmp_path):
    vae, gpt = tiny_models
    out = tmp_path / "t2i.json"
    r = run(["t2i", "--vae", vae, "--gpt", gpt, "--limit", "3", "--num-candidates", "2", "--blur", "0,2",
             *INCEPTION_FAST, "--out", str(tmp_path / "t2i"), "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["images"] == 3 and set(res["fid"]) == {"0", "2"}
    assert all(v >= 0 for v in res["fid"].values())
    for sub in ("real", "generated"):
        files = sorted(os.listdir(tmp_path / "t2i" / sub))
        assert files == ["000000.png", "000001.png", "000002.png"]
        assert Image.open(tmp_path / "t2i" / sub / files[0]).size == (32, 32)
    r = run(["t2i", "--vae", vae, "--gpt", gpt, "--limit", "3"], cwd=tmp_path)
    assert r.returncode == 2 and "--inception" in r.stderr and len(r.stderr.strip().splitlines()) == 1
