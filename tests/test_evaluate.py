"""evaluate.py: the recon / fid / caption-metrics subcommands (as subprocesses where the one-line
errors matter), FID-k blurring both image sets, and the captions / t2i / shapes subcommands on
tiny models. The metrics themselves are tested in test_metrics.py."""

import json
import math
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
import shapes
import evaluate
import metrics
from conftest import save_tiny_vae
from test_metrics import _parity_set, textbook_fid

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
# fid: both image sets blurred before the Inception

@pytest.fixture(scope="module")
def inception():
    return metrics.load_inception("random", 75)  # the network INCEPTION_FAST names


def _features(model, folder, radius):
    """Inception features of the PNGs in `folder` blurred with `radius`, from the files here."""
    paths = [folder / n for n in sorted(os.listdir(folder)) if n.endswith(".png") and n != "broken.png"]
    x = torch.stack([metrics.inception_input(metrics.blur(Image.open(p).convert("RGB"), radius), 75) for p in paths])
    with torch.no_grad():
        return model(x).numpy()


def _expected_fids(model, real, fake, radii):
    """{str(k): textbook FID of the two folders' features at blur radius k}."""
    return {str(r): textbook_fid(_features(model, real, r), _features(model, fake, r)) for r in radii}


def _write_images(folder, indices, blur_radius=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        img = Image.fromarray(shapes.shapes_example(i, "test", 32).image, "RGB")
        metrics.blur(img, blur_radius).save(folder / f"{i:03d}.png")
    return folder


def test_fid_blurs_both_sets(tmp_path, monkeypatch, inception):
    real, fake = _write_images(tmp_path / "real", range(3)), _write_images(tmp_path / "fake", range(3, 7))
    (fake / "broken.png").write_bytes(b"not a png")  # skipped and listed, not fatal
    seen, real_blur = [], metrics.blur
    monkeypatch.setattr(metrics, "blur", lambda img, r: seen.append(r) or real_blur(img, r))
    out = evaluate.main(["fid", str(real), str(fake), "--blur", "0,2", *INCEPTION_FAST,
                         "--json", str(tmp_path / "fid.json")])
    assert sorted(seen) == [0] * 7 + [2] * 7  # every readable image of BOTH sets, at each radius
    assert out["real"]["images"] == 3 and out["generated"]["images"] == 4 and out["generated"]["skipped"] == 1
    monkeypatch.setattr(metrics, "blur", real_blur)
    assert out["fid"] == pytest.approx(_expected_fids(inception, real, fake, (0, 2)), rel=1e-6)
    # the Inception input at radius k is the 8-bit image blurred with radius k, then resized
    ds = evaluate.BlurredImages([str(real / "000.png")], (0, 2), 75)
    views, ok, _ = ds[0]
    img = data.load_image(real / "000.png")
    assert ok and torch.equal(views[1], metrics.inception_input(real_blur(img, 2), 75))
    assert not torch.equal(views[0], views[1])


# -----------------------------------------------------------------------------------------
# recon

@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return {kind: (save_tiny_vae(folder / f"{kind}.pt", kind == "sl"), str(folder / f"{kind}.pt")) for kind in ("sl", "ml")}


def test_recon_cli(vaes, tmp_path, inception):
    out = tmp_path / "recon.json"
    r = run(["recon", "--vae", vaes["sl"][1], "--limit", "5", "--batch-size", "2", *INCEPTION_FAST,
             "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["images"] == 5 and res["skipped"] == 0
    assert math.isfinite(res["psnr"]) and -1 <= res["ssim"] <= 1
    assert res["lpips"] is None and "absent" in r.stdout  # no LPIPS weights given
    # rFID: the 8-bit input images against the 8-bit reconstructions, in the CLI's batches of 2
    x = torch.stack([data.ShapesDataset("test", 5, 32)[i] for i in range(5)])
    unit_8bit = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round() / 255  # noqa: E731
    with torch.no_grad():
        recon = torch.cat([vaes["sl"][0].decode_levels(vaes["sl"][0].encode_levels(b)) for b in x.split(2)])
        feats = [torch.cat([inception(unit_8bit(b)) for b in t.split(2)]).numpy() for t in (x, recon)]
    assert res["rfid"] == pytest.approx(textbook_fid(*feats), rel=1e-6)
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
    ssim = metrics.ssim((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
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

def test_fid_cli_and_identical_sets(tmp_path, inception):
    real, fake = _write_images(tmp_path / "a", range(4)), _write_images(tmp_path / "b", range(4, 8), blur_radius=1)
    r = run(["fid", str(real), str(fake), "--blur", "0,2", *INCEPTION_FAST, "--json", str(tmp_path / "f.json")],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["fid"] == pytest.approx(_expected_fids(inception, real, fake, (0, 2)), rel=1e-6)
    assert "k=0" in r.stdout and "k=2" in r.stdout
    same = evaluate.main(["fid", str(real), str(real), "--blur", "0,2", *INCEPTION_FAST,
                          "--json", str(tmp_path / "same.json")])
    assert set(same["fid"]) == {"0", "2"} and all(abs(v) < 1e-6 for v in same["fid"].values())  # FIDs here: ~0.03-0.1


def test_caption_metrics_cli_formats(tmp_path):
    cands, refs = _parity_set(20)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": k, "caption": v}) for k, v in cands.items()))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"image": k, "captions": v}) for k, v in refs.items()))
    expected = metrics.caption_metrics(cands, refs, java=False)
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
    runtime.save_checkpoint({**ckpt, "kind": "biart"}, tmp_path / "gpt.pt")
    one_line_error(run(["recon", "--vae", str(tmp_path / "gpt.pt")], cwd=tmp_path), "is a 'biart' checkpoint")
    one_line_error(run(["recon"], cwd=tmp_path), "--vae is required")  # a None default, checked by run_recon


def test_errors_in_process(vaes, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        evaluate.main(["fid", str(tmp_path / "none"), str(tmp_path), *INCEPTION_FAST])
    with pytest.raises(ValueError, match="--blur"):
        evaluate.main(["fid", str(tmp_path), str(tmp_path), "--blur", "0,x", *INCEPTION_FAST])
    with pytest.raises(ValueError, match="LPIPS needs both"):
        evaluate.main(["recon", "--vae", vaes["sl"][1], "--lpips-vgg", "vgg.pth"])
    with pytest.raises(ValueError, match="--split"):
        evaluate.main(["recon", "--vae", vaes["sl"][1], "--split", "nope"])
    for sub in ("shapes", "fashion"):
        with pytest.raises(ValueError, match="--caption-edits must be >= 0, got -1"):
            evaluate.main([sub, "--caption-edits", "-1"])
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
        assert action.help.count("(default") <= 1, action.help  # shown once, by runtime.add_flags
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
    examples = [shapes.shapes_example(i, "test", 32) for i in range(5)]
    ids = s2.encode_images([Image.fromarray(e.image) for e in examples])
    exact = []
    for e, cands in zip(examples, s2.caption(ids, 3, rerank="self", temperature=0.5, top_k=8, generator=g)):
        best = max((c for c in cands if c[1] is not None), key=lambda c: c[1], default=cands[0])[0]
        truth = {"objects": e.objects, "relation": e.relation}
        exact.append(shapes.match_attributes(shapes.parse_caption(best), truth)["exact"])
    assert got["i2t"]["self"]["exact"] == sum(exact) / 5


def test_shapes_samples_captions_at_the_caption_temperature(tiny_models):
    import sample
    vae, gpt = tiny_models
    examples = [shapes.shapes_example(i, "test", 32) for i in range(4)]

    def best_captions(**kw):  # by hand, through the library, at one temperature
        s = sample.Sampler(vae, gpt, device="cpu", batch_size=128)
        ids = s.encode_images([Image.fromarray(e.image) for e in examples])
        cands = s.caption(ids, 3, rerank="self", top_k=8, generator=torch.Generator().manual_seed(0), **kw)
        return [c[sample.best_first([sc for _, sc in c])[0]][0] for c in cands]

    def evaluated(**kw):
        s = sample.Sampler(vae, gpt, device="cpu", batch_size=128)
        got = evaluate.shapes_metrics(s, "test", 1, 4, 3, 2, 0.5, 8, 0, directions=("i2t",), **kw)
        return [e["caption"] for e in got["i2t"]["examples"]]
    hot = evaluated(caption_temperature=2.0)
    assert hot == best_captions(temperature=2.0)
    assert evaluated() == best_captions(temperature=0.5) != hot
    assert evaluated(caption_edits=2) == best_captions(temperature=0.5, edits=2) != best_captions(temperature=0.5)


def test_captions_writes_candidates_and_scores_them(tiny_models, tmp_path):
    vae, gpt = tiny_models
    out, cands = tmp_path / "captions.json", tmp_path / "captions.jsonl"
    r = run(["captions", "--vae", vae, "--gpt", gpt, "--limit", "4", "--num-candidates", "2", "--no-java",
             "--out", str(cands), "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert res["images"] == 4 and len(rows) == 4
    refs = {f"test/{i}": shapes.shapes_example(i, "test", 32).captions for i in range(4)}
    want = metrics.caption_metrics({row["image"]: row["caption"] for row in rows}, refs, java=False)
    for k in ("Bleu_4", "ROUGE_L", "CIDEr"):
        assert res["metrics"][k] == pytest.approx(want[k])
    assert res["metrics"]["METEOR"] is None and "absent" in r.stdout


def test_t2i_draws_and_scores_fid(tiny_models, tmp_path, inception):
    vae, gpt = tiny_models
    out = tmp_path / "t2i.json"
    r = run(["t2i", "--vae", vae, "--gpt", gpt, "--limit", "3", "--num-candidates", "2", "--blur", "0,2",
             *INCEPTION_FAST, "--out", str(tmp_path / "t2i"), "--json", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["images"] == 3
    for sub in ("real", "generated"):
        files = sorted(os.listdir(tmp_path / "t2i" / sub))
        assert files == ["000000.png", "000001.png", "000002.png"]
        assert Image.open(tmp_path / "t2i" / sub / files[0]).size == (32, 32)
    # FID-k of the drawn images against the items' own images, both blurred, from the saved files
    real = [shapes.shapes_example(i, "test", 32).image for i in range(3)]
    assert [np.asarray(Image.open(tmp_path / "t2i" / "real" / f"{i:06d}.png")).tolist() for i in range(3)] == \
        [a.tolist() for a in real]
    expected = _expected_fids(inception, tmp_path / "t2i" / "real", tmp_path / "t2i" / "generated", (0, 2))
    assert res["fid"] == pytest.approx(expected, rel=1e-6)
    # without --inception it stops before sampling (the CLI's one-line form: test_one_line_errors)
    with pytest.raises(ValueError, match="t2i needs --inception"):
        evaluate.main(["t2i", "--vae", vae, "--gpt", gpt, "--limit", "3", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


# shapes-tokens

def test_shapes_tokens_recounts(vaes, tmp_path, capsys):
    """The reconstruction accuracy of each split is the analyzer's reading of the tiny AugVAE's
    reconstructions, recounted here; the probes' figures are metrics.bag_of_codes_probe's on the
    same tokens (what that probe measures: tests/test_metrics.py)."""
    model, path = vaes["sl"]
    out = tmp_path / "tokens.json"
    res = evaluate.main(["shapes-tokens", "--vae", path, "--limit", "6", "--probe-size", "12", "--batch-size", "4",
                         "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text())["heldout"] == res["heldout"]
    train = [shapes.shapes_example(i, "train", 32, 1) for i in range(12)]
    with torch.no_grad():
        train_tokens = model.encode(torch.stack([data.to_tensor(Image.fromarray(e.image)) for e in train])).flatten(1)
    for split in ("test", "heldout"):
        ex = [shapes.shapes_example(i, split, 32, 1) for i in range(6)]
        with torch.no_grad():
            tokens = model.encode(torch.stack([data.to_tensor(Image.fromarray(e.image)) for e in ex]))
            recon = data.to_uint8(model.decode(tokens).clamp(-1, 1))
        exact = np.mean([shapes.match_attributes(shapes.analyze_image(r, 1), {"objects": e.objects, "relation": None})
                         ["exact"] for e, r in zip(ex, recon)])
        assert res[split]["recon"]["exact"] == pytest.approx(exact)
        labels = list(shapes.SHAPES)
        want = metrics.bag_of_codes_probe(train_tokens.numpy(), [labels.index(e.objects[0]["shape"]) for e in train],
                                          tokens.flatten(1).numpy(), [labels.index(e.objects[0]["shape"]) for e in ex],
                                          model.cfg.codebook_size)
        assert res[split]["probe"]["shape"] == pytest.approx(want)
    assert "linear probe on the codes" in capsys.readouterr().out


class HalfRightVAE:
    """A stand-in AugVAE-SL for shapes_tokens: decode gives back the encoded images themselves
    for even rows of a batch and a blank image for odd rows, so the analyzer reads exactly the
    even examples right."""

    class cfg:
        image_size, codebook_size = 64, 16

    def encode(self, x):
        self.x = x
        return torch.arange(x.size(0) * 4).view(-1, 2, 2) % 16

    def decode(self, t):
        out = self.x.clone()
        out[1::2] = 1.0  # white: no object
        return out


def test_shapes_tokens_pairs_each_reconstruction_with_its_example():
    tokens, recon, examples = evaluate.shapes_tokens(HalfRightVAE(), "heldout", 10, 4, "cpu")
    assert recon["exact"] == 0.5 and len(examples) == 10 and tokens.shape == (10, 4)
    assert [e.objects for e in examples] == [shapes.shapes_example(i, "heldout", 64, 1).objects for i in range(10)]
