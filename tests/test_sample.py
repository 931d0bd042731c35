"""sample.py as a user runs it: the CLI as a subprocess on checkpoints trained here (a tiny
AugVAE-SL, prepare.py, a BPE and a short train_gpt.py run), real image files of every kind,
both directions, reranking, seeds, batch mode, and bad input."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import biart
import data
import sample
import shapes
import tokenizer
from conftest import cli, save_tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def trained(tiny_models):
    return tiny_models


def models(trained):
    vae, gpt = trained
    return ["--vae", vae, "--gpt", gpt]


def results(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- real image files of every kind ---------------------------------------------------------

def scene(size=(96, 60)):
    """An asymmetric RGB test picture (a shapes image stretched to a non-square size)."""
    return Image.fromarray(shapes.shapes_example(3, "test", 64).image).resize(size)


def write_image_kinds(folder):
    """JPEG, PNG, WebP; grayscale, RGBA, palette, CMYK, 16-bit; an EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = scene()
    rgb.save(folder / "a.jpg", quality=90)
    rgb.save(folder / "b.png")
    rgb.save(folder / "c.webp")
    rgb.convert("L").save(folder / "d_gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "e_rgba.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "f_palette.png")
    rgb.convert("CMYK").save(folder / "g_cmyk.jpg")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(folder / "h_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are the upright picture rotated 90 degrees ccw
    rgb.transpose(Image.ROTATE_90).save(folder / "i_exif.jpg", exif=exif.tobytes(), quality=95)
    return sorted(os.listdir(folder))


def write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    scene().save(buf, format="JPEG")
    (folder / "x_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "y_text.png").write_text("not an image at all\n")
    (folder / "z_empty.png").write_bytes(b"")
    return ["x_truncated.jpg", "y_text.png", "z_empty.png"]


def test_caption_every_image_kind_and_skip_bad_files(trained, tmp_path):
    good = write_image_kinds(tmp_path / "photos")
    bad = write_bad_files(tmp_path / "photos")
    out = tmp_path / "out"
    r = run([*models(trained), "--images", str(tmp_path / "photos"), "--num-candidates", "4", "--out", str(out)])
    assert r.returncode == 1, r.stderr  # something was skipped; everything else was done
    rows = {os.path.basename(row["input"]): row for row in results(out)}
    assert sorted(rows) == sorted(good + bad)
    for name in good:
        row = rows[name]
        assert row["direction"] == "i2t" and "error" not in row, row
        assert row["caption"] == row["candidates"][0]["caption"]
        scores = [c["score"] for c in row["candidates"] if c["score"] is not None]
        assert scores == sorted(scores, reverse=True)  # best first
        assert f"{name}: {row['caption']}" in r.stdout
    for name in bad:
        assert "error" in rows[name] and name in rows[name]["error"]
        assert "skipped" in r.stderr and name in r.stderr
    assert "Traceback" not in r.stderr
    assert f"{len(good)} of {len(good) + len(bad)} inputs done" in r.stdout
    assert (out / "i2t_grid.png").exists()


def test_exif_rotation_and_modes_reach_the_same_view(trained, tmp_path):
    vae, gpt = trained
    write_image_kinds(tmp_path)
    s = sample.Sampler(vae, gpt, device="cpu")
    upright = np.asarray(s.view(data.load_image(tmp_path / "a.jpg")), dtype=np.float32)
    rotated = np.asarray(s.view(data.load_image(tmp_path / "i_exif.jpg")), dtype=np.float32)
    assert np.abs(upright - rotated).mean() < 6  # JPEG noise only: the EXIF rotation was applied
    wrong = np.asarray(s.view(data.load_image(tmp_path / "a.jpg").transpose(Image.ROTATE_90)), dtype=np.float32)
    assert np.abs(upright - wrong).mean() > 2 * np.abs(upright - rotated).mean()
    for name in ("d_gray.png", "e_rgba.png", "f_palette.png", "g_cmyk.jpg", "h_16bit.png"):
        v = s.view(data.load_image(tmp_path / name))
        assert v.mode == "RGB" and v.size == (32, 32)


def test_single_bad_image_is_a_one_line_error(trained, tmp_path, capsys):
    bad = write_bad_files(tmp_path)
    for name in [*bad, "missing.jpg"]:
        argv = [*models(trained), "--image", str(tmp_path / name), "--out", str(tmp_path / "out")]
        code, _, err = cli(lambda: sample.main(argv), capsys, "sample.py")
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and name in lines[0], err


# --- text -> image ---------------------------------------------------------------------------

def test_draw_saves_reranked_images_and_grid(trained, tmp_path):
    out = tmp_path / "out"
    r = run([*models(trained), "--text", "A large red circle on the left.", "--num-candidates", "6",
             "--keep", "2", "--out", str(out), "--show-all"])
    assert r.returncode == 0, r.stderr
    (row,) = results(out)
    assert row["direction"] == "t2i" and len(row["outputs"]) == 2 and len(row["candidates"]) == 6
    scores = [c["score"] for c in row["candidates"]]
    assert scores == sorted(scores, reverse=True)
    for p in row["outputs"]:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert (out / "t2i_grid.png").exists()
    assert "scores:" in r.stdout


def test_same_seed_same_output_other_seed_or_guidance_differs(trained, tmp_path):
    def draw(seed, out, *flags):
        r = run([*models(trained), "--text", "A small blue square at the top.", "--num-candidates", "4",
                 "--keep", "4", "--seed", str(seed), "--out", str(out), *flags])
        assert r.returncode == 0, r.stderr
        return [np.asarray(Image.open(p)) for p in results(out)[0]["outputs"]]
    a, b, c = draw(1, tmp_path / "a"), draw(1, tmp_path / "b", "--guidance", "1"), draw(2, tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # --guidance 1 is plain sampling
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    d = draw(1, tmp_path / "d", "--guidance", "3")
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))


def test_caption_temperature_sets_the_image_to_text_direction_alone(trained, tmp_path):
    scene().save(tmp_path / "scene.png")

    def captions(out, *flags):
        rows = sample.main([*models(trained), "--image", str(tmp_path / "scene.png"), "--num-candidates", "8",
                            "--seed", "3", "--out", str(tmp_path / out), *flags])
        return [c["caption"] for c in rows[0]["candidates"]]
    cold = captions("a", "--temperature", "0.3")
    assert captions("b", "--caption-temperature", "0.3", "--temperature", "5") == cold
    assert captions("c", "--temperature", "5") != cold


def test_batch_texts_skip_bad_lines(trained, tmp_path):
    texts = tmp_path / "captions.txt"
    texts.write_text("A small red square.\n\n" + "red " * 200 + "\n\U0001F600\U0001F680\nA large green circle.\n")
    out = tmp_path / "out"
    r = run([*models(trained), "--texts", str(texts), "--num-candidates", "2", "--out", str(out)])
    assert r.returncode == 1, r.stderr
    rows = results(out)
    assert [("error" in row) for row in rows] == [False, True, False, False]  # blank line ignored
    assert "tokens long" in rows[1]["error"]
    assert all(os.path.exists(p) for row in rows if "outputs" in row for p in row["outputs"])


# --- reranking -------------------------------------------------------------------------------

def test_self_rerank_scores_are_the_models_own_likelihoods(trained):
    vae, gpt = trained
    s = sample.Sampler(vae, gpt, device="cpu", batch_size=5)  # 5: forces chunked calls
    ex = shapes.shapes_example(0, "test", 32)
    image = s.encode_images([Image.fromarray(ex.image)])
    text = s.caption_ids(ex.captions[0])[None]
    g = torch.Generator().manual_seed(0)
    (ids, scores), = s.draw(text, 7, rerank="self", generator=g)
    want = s.gpt.score(ids, text, "i2t")  # log p(caption | image), all at once
    assert torch.allclose(scores, want, atol=1e-4)
    (ids_none, none), = s.draw(text, 7, rerank="none", generator=torch.Generator().manual_seed(0))
    assert none is None and torch.equal(ids_none, ids)  # same draws; 'none' keeps their order
    order = sample.best_first(scores.tolist())
    assert scores[order[0]] == scores.max() and order == sorted(order, key=lambda i: -scores[i].item())

    (cands,) = s.caption(image, 6, rerank="self", generator=torch.Generator().manual_seed(0))
    assert len({c for c, _ in cands}) == len(cands)  # deduplicated
    for c, sc in cands:
        assert c.count(".") <= 1 and (not c or c.endswith(".") or "." not in c)  # cut at the full stop
        if sc is not None:
            t = biart.caption_to_model(s.tok.encode(c), s.config, truncate=True)[None]
            want = s.gpt.score(t, image, "t2i") + s.gpt.score(image, t, "i2t")  # log p(image | c) + log p(c | image)
            assert abs(sc - want.item()) < 1e-4


def test_caption_edit_is_the_best_one_token_change(trained, monkeypatch):
    """With every token an alternative, one edit round must give the best caption among the
    caption and all its one-token changes (never end-of-text), found here by brute force."""
    vae, gpt = trained
    s = sample.Sampler(vae, gpt, device="cpu", batch_size=64)
    c = s.config
    ex = shapes.shapes_example(1, "test", 32)
    image = s.encode_images([Image.fromarray(ex.image)])
    text = s.caption_ids("a small red square")[None]
    pair = lambda t: s.gpt.score(t, image, "t2i") + s.gpt.score(image, t, "i2t")
    score = float(pair(text)[0])
    places = int((text[0] != c.pad_id).sum()) - 1
    variants = [text.clone() for _ in range(places) for _ in range(c.text_vocab)]
    for k, v in enumerate(variants):
        v[0, k // c.text_vocab] = c.text_offset + k % c.text_vocab
    keep = [v for v in variants if not torch.equal(v, text) and c.eot_id not in v[0, :places]]
    assert len(keep) == places * (c.text_vocab - 2)
    brute = torch.cat([pair(torch.cat(keep[i:i + 256])) for i in range(0, len(keep), 256)])
    monkeypatch.setattr(sample, "EDIT_ALTERNATIVES", c.text_vocab - 2)
    edited, edited_score = s._edit(text, image, score)
    assert brute.max() > score  # an untrained-for caption: some change scores higher
    assert torch.equal(edited, keep[int(brute.argmax())]) and abs(edited_score - float(brute.max())) < 1e-3

    monkeypatch.setattr(sample, "EDIT_ALTERNATIVES", 2)  # the default: the two likeliest tokens at each place
    edited, edited_score = s._edit(text, image, score)
    changed = (edited != text).nonzero()[:, 1].tolist()
    assert len(changed) == 1 and edited_score > score
    j = changed[0]
    logits = s.gpt.text_logits(image, text)[0, j]
    logits[[int(text[0, j]) - c.text_offset, c.eot_id - c.text_offset]] = -float("inf")
    assert int(edited[0, j]) - c.text_offset in logits.topk(2).indices.tolist()


def test_caption_edits_add_the_edited_best_as_a_candidate(trained):
    vae, gpt = trained
    s = sample.Sampler(vae, gpt, device="cpu")
    image = s.encode_images([Image.fromarray(shapes.shapes_example(2, "test", 32).image)])
    (plain,) = s.caption(image, 6, generator=torch.Generator().manual_seed(0))
    (edited,) = s.caption(image, 6, generator=torch.Generator().manual_seed(0), edits=3)
    assert edited[:len(plain)] == plain and len(edited) == len(plain) + 1  # the same samples, then the edit
    caption, score = edited[-1]
    t = biart.caption_to_model(s.tok.encode(caption), s.config, truncate=True)[None]
    assert abs(score - float(s.gpt.score(t, image, "t2i") + s.gpt.score(image, t, "i2t"))) < 1e-4
    assert score > max(sc for _, sc in plain if sc is not None)


class TinyClip(torch.nn.Module):
    """A CLIP-shaped TorchScript model: encode_image, encode_text, input_resolution. Every image
    embeds to one fixed direction (its pixels pass through with weight 0), so a caption's CLIP
    score can be computed in the test from the token embeddings alone."""

    def __init__(self):
        super().__init__()
        self.register_buffer("input_resolution", torch.tensor(16))
        self.register_buffer("direction", torch.randn(8))
        self.visual = torch.nn.Linear(3 * 16 * 16, 8)
        self.token_embedding = torch.nn.Embedding(49408, 8)

    @torch.jit.export
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return 0 * self.visual(x.flatten(1)) + self.direction

    @torch.jit.export
    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(t).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x) @ self.encode_text(t).t()


def test_clip_rerank_with_a_torchscript_file(trained, tmp_path):
    torch.manual_seed(0)
    clip_path = tmp_path / "clip.pt"
    torch.jit.save(torch.jit.script(TinyClip()), str(clip_path))
    write_image_kinds(tmp_path / "p")
    out = tmp_path / "out"
    r = run([*models(trained), "--image", str(tmp_path / "p" / "b.png"), "--rerank", "clip",
             "--clip-model", str(clip_path), "--num-candidates", "4", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    clip, tok = TinyClip(), tokenizer.Tokenizer()
    clip.load_state_dict(torch.jit.load(str(clip_path)).state_dict())
    cands = results(out)[0]["candidates"]
    for c in cands:  # 100 x cosine of the embeddings; text: [SOT] ids [EOT], zero-padded to 77
        ids = [tok.sot_id] + tok.encode(c["caption"]) + [tok.eot_id]
        text = clip.token_embedding(torch.tensor(ids + [0] * (77 - len(ids)))).sum(0)
        want = 100 * torch.nn.functional.cosine_similarity(text, clip.direction, dim=0).item()
        assert abs(c["score"] - want) < 1e-3, (c, want)
    scores = [c["score"] for c in cands]
    assert len(set(scores)) > 1 and scores == sorted(scores, reverse=True)
    r = run([*models(trained), "--text", "A red circle.", "--rerank", "clip", "--clip-model", str(clip_path),
             "--num-candidates", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    r = run([*models(trained), "--text", "A red circle.", "--rerank", "clip", "--out", str(out)])
    assert r.returncode == 2 and "--clip-model" in r.stderr


# --- wrong files and flags -------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("other") / "vae256.pt"
    save_tiny_vae(path, codebook_size=256)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("vae_as_gpt", "is a 'augvae' checkpoint, expected 'biart'"),
    ("gpt_as_vae", "is a 'biart' checkpoint, expected 'augvae'"),
    ("other_codebook", "not the VAE its tokens came from"),
    ("empty_caption", "the caption is empty"),
    ("long_caption", "tokens long"),
    ("no_input", "nothing to do"),
    ("bad_rerank", "--rerank must be one of"),
    ("bad_guidance", "--guidance must be >= 0"),
    ("bad_caption_temperature", "--caption-temperature must be > 0"),
    ("bad_caption_edits", "--caption-edits must be >= 0"),
    ("edits_without_self", "--caption-edits needs --rerank self"),
    ("missing_gpt", "no such file"),
])
def test_bad_input_gives_one_line_error(case, message, trained, other_vae, tmp_path, capsys):
    vae, gpt = trained
    args = {
        "vae_as_gpt": ["--vae", vae, "--gpt", vae, "--text", "a red circle."],
        "gpt_as_vae": ["--vae", gpt, "--gpt", gpt, "--text", "a red circle."],
        "other_codebook": ["--vae", other_vae, "--gpt", gpt, "--text", "a red circle."],
        "empty_caption": [*models(trained), "--text", "   "],
        "long_caption": [*models(trained), "--text", "x" * 10000],
        "no_input": models(trained),
        "bad_rerank": [*models(trained), "--text", "a red circle.", "--rerank", "best"],
        "bad_guidance": [*models(trained), "--text", "a red circle.", "--guidance", "nan"],
        "bad_caption_temperature": [*models(trained), "--text", "a red circle.", "--caption-temperature", "0"],
        "bad_caption_edits": [*models(trained), "--text", "a red circle.", "--caption-edits", "-1"],
        "edits_without_self": [*models(trained), "--text", "a red circle.", "--caption-edits", "1", "--rerank", "none"],
        "missing_gpt": ["--vae", vae, "--gpt", str(tmp_path / "nope.pt"), "--text", "a red circle."],
    }[case]
    code, _, err = cli(lambda: sample.main([*args, "--out", str(tmp_path / "out")]), capsys, "sample.py")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and message in lines[0], err


def test_help_explains_every_flag():
    r = run(["--help"])
    assert r.returncode == 0
    for k in sample.FLAGS:
        assert "--" + k.replace("_", "-") in r.stdout
