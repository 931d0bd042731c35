"""metrics.py: caption metrics on hand-computed cases and against the COCO toolkit (pycocoevalcap,
when it and java are installed), the input handed to its METEOR and SPICE jars, PTB tokenization
on cases measured with the toolkit's jar, Gaussian statistics by hand, FID against closed forms,
a textbook computation (textbook_fid, also used by test_evaluate.py and test_fashion.py) and
scipy, SSIM, the FID-k blur and the FID Inception's layout."""

import importlib.util
import math
import random
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import shapes
import metrics
from bench import bench_captions

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


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
    assert metrics.ptb_tokenize(caption) == expected.split()


def test_ptb_tokenize_reads_the_next_line_like_the_jar():
    # the jar tokenizes one file: a single letter keeps its period unless the next word, here
    # on the next caption line, is a capitalised sentence start
    assert metrics.ptb_tokenize_lines(["a sign with the letter a.", "A dog runs"])[0][-1] == "a"
    assert metrics.ptb_tokenize_lines(["a sign with the letter a.", "Two dogs run"])[0][-1] == "a."
    assert metrics.ptb_tokenize_lines(["line one\nstill one", "two"]) == [["line", "one", "still", "one"], ["two"]]


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
    got = metrics.bleu([cand], [[ref]])
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[1] == pytest.approx(math.sqrt(0.5)) and got[2] == pytest.approx(0.5)
    # brevity: 2 candidate words against the closest reference length 6 -> exp(1 - 6/2)
    got = metrics.bleu([toks("the cat")], [[toks("the cat is on the mat"), toks("there is a cat on it")]])
    assert got[0] == pytest.approx(math.exp(-2), rel=1e-9)
    # 'closest' takes the shorter reference on a tie: 4 words between lengths 3 and 5 -> no penalty
    got = metrics.bleu([toks("a b c d")], [[toks("a b c"), toks("a b c d e")]])
    assert got[0] == pytest.approx(1.0, rel=1e-9)
    # clipping: 'the the the' matches 'the' at most twice (the reference's count)
    got = metrics.bleu([toks("the the the")], [[toks("the cat the")]])
    assert got[0] == pytest.approx(2 / 3, rel=1e-9)
    # corpus level: counts are summed before dividing (2 + 0) / (2 + 2), not averaged per sentence
    got = metrics.bleu([toks("a b"), toks("c d")], [[toks("a b")], [toks("e f")]])
    assert got[0] == pytest.approx(0.5, rel=1e-9)


def test_rouge_l_by_hand():
    # LCS 3 of candidate 3 and reference 6 words: P = 1, R = 0.5, F = 2.44 * 0.5 / (0.5 + 1.44)
    assert metrics.rouge_l([toks("a b c")], [[toks("a b c d e f")]]) == pytest.approx(1.22 / 1.94, rel=1e-12)
    # the best precision and the best recall are taken over the references separately
    assert metrics.rouge_l([toks("a b c d")], [[toks("a b"), toks("a b c d e f g h")]]) == pytest.approx(1.0)
    # corpus score = mean over candidates; an empty candidate scores 0
    assert metrics.rouge_l([toks("a b c"), []], [[toks("a b c")], [toks("x")]]) == pytest.approx(0.5)


def test_cider_d_by_hand():
    # two images, so idf = log 2 for n-grams in one image's references (and for unseen ones).
    # Image 1 matches its reference in 1- and 2-grams (cosine 1 each, 0 for 3, 4-grams): 10 * 2/4 = 5.
    # Image 2 "c d" vs "c e": unigram cosine 1/2, bigram 0: 10 * 0.5/4 = 1.25.
    got = metrics.cider_d([toks("a b"), toks("c d")], [[toks("a b")], [toks("c e")]])
    assert got == pytest.approx((5 + 1.25) / 2, rel=1e-12)
    # clipping and the length penalty: "a a" vs "a": the candidate's weight 2 log2 is clipped at
    # log2, cosine 1/2 (1 without clipping); one bigram more than the reference -> exp(-1/72)
    got = metrics.cider_d([toks("a a"), toks("b")], [[toks("a")], [toks("b")]])
    assert got == pytest.approx((1.25 * math.exp(-1 / 72) + 2.5) / 2, rel=1e-12)
    # averaged over the references of an image
    got = metrics.cider_d([toks("a b"), toks("c d")], [[toks("a b"), toks("x y")], [toks("c e")]])
    assert got == pytest.approx((5 / 2 + 1.25) / 2, rel=1e-12)


def test_caption_metrics_keys_and_absent_java_metrics(monkeypatch):
    cands = {"1": "A dog.", "2": "Two cats on a mat."}
    refs = {"1": ["A dog runs.", "The dog."], "2": ["Two cats sit on a mat.", "cats"], "3": ["unused"]}
    got = metrics.caption_metrics(cands, refs, java=False)
    assert list(got) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    assert got["METEOR"] is None and got["SPICE"] is None  # absent, never 0
    assert all(0 <= got[k] <= 1 for k in ("Bleu_1", "Bleu_4", "ROUGE_L")) and got["CIDEr"] > 0
    monkeypatch.setattr(metrics, "java_metric_status", lambda: {"METEOR": "no java", "SPICE": "no java"})
    got2 = metrics.caption_metrics(cands, refs, java=True)
    assert got2 == got
    with pytest.raises(ValueError, match="no list of reference captions"):
        metrics.caption_metrics({"9": "a dog"}, refs, java=False)


def _toolkit_missing():
    """Why the COCO toolkit parity check cannot run here, or None."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "needs pycocoevalcap (requirements-dev.txt)"
    if shutil.which("java") is None:
        return "needs java on PATH for the PTB tokenizer jar"
    return None


def _parity_set(n=150, seed=0):
    """Realistic captions: shapes (1 and 2 objects) and COCO-like ones, 5 references per image,
    candidates copied, truncated, swapped, upper-cased, punctuated or empty."""
    rng = random.Random(seed)
    bench = bench_captions(5 * n, seed)
    cands, refs = {}, {}
    for i in range(n):
        if i % 2:
            r = shapes.shapes_example(i, "test", 32, num_objects=1 + i % 4 // 2).captions
        else:
            r = bench[5 * i:5 * i + 5]
        refs[f"img{i}"] = list(r)
        other = bench[(5 * i + 7) % len(bench)]
        cands[f"img{i}"] = rng.choice([
            r[0], other, " ".join(r[1].split()[:rng.randint(1, 6)]), r[2].upper(), "", ".",
            r[3].replace(" a ", " (a) ") + " It's the dog's, isn't it?", f'"{r[4]}" -- said Mr. Smith; etc.'])
    return cands, refs


@pytest.mark.skipif(_toolkit_missing() is not None, reason=str(_toolkit_missing()))
def test_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    cands, refs = _parity_set()
    ptb = PTBTokenizer()
    gts = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = ptb.tokenize({k: [{"caption": cands[k]}] for k in refs})
    ours = metrics.ptb_tokenize_lines([c for v in refs.values() for c in v])
    assert [" ".join(t) for t in ours] == [c for v in gts.values() for c in v]
    assert [" ".join(t) for t in metrics.ptb_tokenize_lines(list(cands.values()))] == [v[0] for v in res.values()]
    expected = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    got = metrics.caption_metrics(cands, refs, java=False)
    for k, v in expected.items():
        assert got[k] == pytest.approx(float(v), abs=1e-9), k


def test_java_metrics_get_the_toolkits_input(monkeypatch):
    # METEOR and SPICE are pycocoevalcap's own jars (METEOR's takes ~20 s to start, so none
    # is made here); our part is what we hand them: the toolkit's format, {id: [PTB-tokenized
    # references]} and {id: [the one tokenized candidate]}, for the scored ids only, and each
    # score under its own name. Stand-ins with the scorers' interface record the input.
    seen = {}

    def scorer(name, score):
        class Scorer:
            def compute_score(self, gts, res):  # the checks pycocoevalcap's Meteor makes itself
                assert gts.keys() == res.keys() and all(len(v) == 1 for v in res.values())
                seen[name] = (gts, res)
                return score, [score] * len(gts)
        module = types.ModuleType(f"pycocoevalcap.{name.lower()}.{name.lower()}")
        setattr(module, name.capitalize(), Scorer)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return Scorer

    scorer("METEOR", 0.25)
    spice = scorer("SPICE", 0.125)
    monkeypatch.setattr(metrics, "java_metric_status", lambda: {"METEOR": None, "SPICE": None})
    cands = {"b": "A Dog's toy.", "a": "Two cats (sleeping)!"}
    refs = {"a": ["Two cats, asleep.", "CATS isn't it"], "c": ["unused"], "b": ["The dog's bone.", "a dog"]}
    got = metrics.caption_metrics(cands, refs, java=True)
    assert (got["METEOR"], got["SPICE"]) == (0.25, 0.125) and type(got["METEOR"]) is float
    gts = {"a": ["two cats asleep", "cats is n't it"], "b": ["the dog 's bone", "a dog"]}
    res = {"a": ["two cats -lrb- sleeping -rrb-"], "b": ["a dog 's toy"]}
    assert seen["METEOR"] == seen["SPICE"] == (gts, res)
    # a failing jar is one clear error that names the way around it
    monkeypatch.setattr(spice, "compute_score", lambda self, g, r: (_ for _ in ()).throw(OSError("java died")))
    with pytest.raises(OSError, match=r"SPICE \(pycocoevalcap, java\) failed: java died; --no-java skips"):
        metrics.caption_metrics(cands, refs, java=True)


# -----------------------------------------------------------------------------------------
# the Frechet distance

def test_gaussian_stats_by_hand():
    # 4 samples of 3 features: mean (2, 3, 4) plus deviations whose products sum to known integers
    dev = np.array([[-1, -3, 1], [1, -1, 1], [-1, 1, -1], [1, 3, -1]])
    f = (np.array([2, 3, 4]) + dev).astype(np.float32)  # exact in float32
    mu, sigma = metrics.gaussian_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.tolist() == [2, 3, 4]
    # sums of products [[4, 4, 0], [4, 20, -8], [0, -8, 4]] over N - 1 = 3 (unbiased), in float64
    np.testing.assert_allclose(sigma, np.array([[4, 4, 0], [4, 20, -8], [0, -8, 4]]) / 3, rtol=1e-15, atol=0)
    with pytest.raises(ValueError):
        metrics.gaussian_stats(f[:1])


def textbook_fid(f1, f2) -> float:
    """FID of two (N, D) feature sets by the textbook formula, independent of metrics.py:
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), the covariances summed by hand over
    N - 1, tr(sqrtm) as the sum of the square roots of the eigenvalues of the product S1 S2
    (np.linalg.eig). Computed in an orthonormal basis of the span of both sets' centred features
    and the mean difference, which holds everything the formula sees (a rotation changes no
    term), so D = 2048 with a few images costs a small eigenproblem."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    q = np.linalg.qr(np.concatenate([x1, x2, (f1.mean(0) - f2.mean(0))[None]]).T)[0]
    p1, p2 = f1 @ q, f2 @ q
    c1, c2 = p1 - p1.mean(0), p2 - p2.mean(0)
    s1, s2 = c1.T @ c1 / (len(p1) - 1), c2.T @ c2 / (len(p2) - 1)
    diff = p1.mean(0) - p2.mean(0)
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * root)


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(1)
    for n, d in ((200, 16), (10, 64)):  # full-rank covariance route, then the low-rank route
        f = rng.random((n, d))
        assert abs(metrics.fid_from_features(f, f)) < 1e-9


def test_frechet_closed_forms():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # a shifted and scaled Gaussian: sigma2 = c^2 sigma1 -> |dmu|^2 + (1 - c)^2 tr(sigma1)
    a = rng.normal(size=(d, d))
    sigma, c = a @ a.T + 0.1 * np.eye(d), 1.7
    got = metrics.frechet_distance(mu1, sigma, mu1 + 0.5, c * c * sigma)
    assert got == pytest.approx(0.25 * d + (1 - c) ** 2 * np.trace(sigma), rel=1e-10)


def test_fid_low_rank_route_equals_covariance_route():
    rng = np.random.default_rng(3)
    f1, f2 = rng.random((20, 64)) ** 2, rng.random((30, 64))
    full = metrics.frechet_distance(*metrics.gaussian_stats(f1), *metrics.gaussian_stats(f2))
    # singular covariances: the covariance route keeps ~1e-8 relative rounding (as scipy's sqrtm
    # does); the low-rank route agreed with a 40-digit computation to 1e-16
    assert metrics.fid_from_features(f1, f2) == pytest.approx(full, rel=1e-6)
    f3 = rng.random((100, 8))  # full rank: the covariance route itself
    assert metrics.fid_from_features(f3, f2[:, :8]) == pytest.approx(
        metrics.frechet_distance(*metrics.gaussian_stats(f3), *metrics.gaussian_stats(f2[:, :8])), rel=1e-12)


def test_frechet_retries_with_eps_when_the_root_fails(monkeypatch):
    calls, real = [], metrics.trace_sqrt_product

    def flaky(s1, s2):
        calls.append(s1.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("did not converge")
        return real(s1, s2)

    monkeypatch.setattr(metrics, "trace_sqrt_product", flaky)
    sigma = np.diag([1.0, 2.0])
    assert metrics.frechet_distance([0, 0], sigma, [0, 0], sigma) == pytest.approx(0, abs=1e-5)
    np.testing.assert_allclose(calls[1] - calls[0], 1e-6 * np.eye(2))


def test_frechet_matches_scipy_sqrtm():
    from scipy import linalg  # a test-only dependency (requirements-dev.txt)

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
        s1 = metrics.gaussian_stats(rng.random((n1, d)) ** 3)
        s2 = metrics.gaussian_stats(rng.random((n2, d)))
        assert metrics.frechet_distance(*s1, *s2) == pytest.approx(pytorch_fid_formula(*s1, *s2), rel=rel)


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
    assert metrics.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    expected = [np.mean([_ssim_by_windows(x[b, c].double().numpy(), y[b, c].double().numpy()) for c in range(3)])
                for b in range(2)]
    assert metrics.ssim(x, y).tolist() == pytest.approx(expected, abs=1e-6)
    assert metrics.ssim(255 * x, 255 * y, data_range=255).tolist() == pytest.approx(expected, abs=1e-6)
    # constant images a and b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.4, 0.01 ** 2
    got = metrics.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    with pytest.raises(ValueError):
        metrics.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_blur_radii():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    assert np.array_equal(np.asarray(metrics.blur(img, 0)), np.asarray(img))  # k = 0: no blur

    def high_frequency(im):  # energy of the differences between neighbouring pixels
        a = np.asarray(im, dtype=np.float64)
        return (np.diff(a, axis=0) ** 2).mean() + (np.diff(a, axis=1) ** 2).mean()

    energy = [high_frequency(metrics.blur(img, k)) for k in metrics.FID_BLUR_RADII]
    assert all(e1 > 2 * e2 for e1, e2 in zip(energy, energy[1:])), energy
    with pytest.raises(ValueError):
        metrics.blur(img, -1)


# -----------------------------------------------------------------------------------------
# the FID Inception

def test_inception_layout_forward_and_strict_load(tmp_path):
    model = metrics.load_inception("random", 75)
    state = model.state_dict()
    # the FID weights file's layout: torchvision's Inception3 names, 1008 classes, no aux head
    assert len(state) == 566 and sum(p.numel() for p in model.parameters()) == 23_850_960
    assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    assert tuple(state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape) == (384,)
    assert tuple(state["fc.weight"].shape) == (1008, 2048) and not any(k.startswith("AuxLogits") for k in state)
    # the FID graph's pools: averages ignore the zero padding (a constant stays constant at the
    # border), and the last block max-pools
    assert torch.equal(metrics._tf_avg_pool(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")
    x = torch.rand(2, 3, 40, 52)
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.std() > 0
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    with torch.no_grad():
        assert torch.equal(metrics.load_inception(str(path), 75)(x), feats)
    # a file from older PyTorch without BatchNorm's num_batches_tracked loads too
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    metrics.load_inception(str(path), 75)
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(runtime.CheckpointError, match="not the FID Inception weights"):
        metrics.load_inception(str(path), 75)
    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth"):
        metrics.load_inception("", 75)


def test_inception_at_299():
    model = metrics.load_inception("random")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
        again = model(metrics.resize_for_inception(x, 299))  # resizing is bilinear, align_corners=False
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    assert torch.equal(feats, again)


def test_inception_matches_pytorch_fid():
    # the forward pass (branch order, pools, padding, the resize to 299) against the reference
    # implementation: the same random weights must give pytorch-fid's pool3 features. The
    # layout (key names and shapes of its weights file) is checked above without it.
    try:
        import pytorch_fid.inception as pfi
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        pytest.skip("needs pytorch-fid and a torchvision built for this torch, which cannot be installed beside "
                    "the pinned CPU torch (PyPI's torchvision fails to import beside torch 2.13.0+cpu); it would "
                    "check that InceptionV3FID gives pytorch-fid's InceptionV3 pool3 features for the same weights")
    ours = metrics.load_inception("random", 75)
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


def test_bag_of_codes_probe_reads_what_the_codes_carry():
    """Codes that name the label (each image uses code 3 * label plus noise codes) are read
    exactly, on new images too; codes that name only a second attribute, which went with the
    label in training and is crossed on the evaluation images (an unseen pairing), are read as
    the label they came with: 0% right, a reader that took the other attribute as its cue."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    noise = lambda n: rng.integers(9, 64, (n, 6))  # noqa: E731
    carried = np.concatenate([3 * labels[:, None].repeat(2, 1), noise(300)], 1)
    assert metrics.bag_of_codes_probe(carried[:200], labels[:200], carried[200:], labels[200:], 64) == 1.0
    other = (labels + 1) % 3  # a second attribute, tied to the label in training ...
    tied = np.concatenate([3 * other[:, None].repeat(2, 1) + 1, noise(300)], 1)
    crossed = np.concatenate([3 * ((labels[200:] + 2) % 3)[:, None].repeat(2, 1) + 1, noise(100)], 1)  # ... not here
    assert metrics.bag_of_codes_probe(tied[:200], labels[:200], tied[200:], labels[200:], 64) == 1.0
    assert metrics.bag_of_codes_probe(tied[:200], labels[:200], crossed, labels[200:], 64) == 0.0
