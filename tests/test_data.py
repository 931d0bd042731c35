"""Tests for data.py: real-image loading, tensors, grids, crops, image folders."""

import io
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402


def truth_of(e):
    return {"objects": e.objects, "relation": e.relation}


# -----------------------------------------------------------------------------
# real images: loading


def rgb_array(h=20, w=40):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 1] = 120
    a[:4, :4] = (255, 0, 0)  # a red marker top left
    return a


def test_load_image_exif_orientation(tmp_path):
    im = Image.fromarray(rgb_array())
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    im.save(tmp_path / "o.jpg", quality=95, exif=exif.tobytes())
    out = data.load_image(tmp_path / "o.jpg")
    assert out.mode == "RGB" and out.size == (20, 40)  # (w, h): rotated
    a = np.asarray(out).astype(int)
    assert a[1, -2, 0] > 200 and a[1, -2, 1] < 80  # the marker moved to the top right
    assert a[1, 1, 0] < 80


def test_load_image_modes(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert np.asarray(data.load_image(tmp_path / "g.png"))[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:4, :, 3] = 255  # top half opaque blue, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = np.asarray(data.load_image(tmp_path / "a.png"))
    assert a[0, 0].tolist() == [0, 0, 255] and a[7, 7].tolist() == [255, 255, 255]
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert np.asarray(data.load_image(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    p.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        a = np.asarray(data.load_image(tmp_path / name))
        assert a[0, 0].tolist() == [255, 255, 255] and a[1, 1].tolist() == [0, 0, 255], name
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = np.asarray(data.load_image(tmp_path / "c.jpg"))[8, 8].tolist()
    assert r > 230 and g < 30 and b < 30
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    assert np.asarray(data.load_image(tmp_path / "b.png"))[0, 0].tolist() == [255, 255, 255]
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    f.save(tmp_path / "f.tif")
    assert np.asarray(data.load_image(tmp_path / "f.tif"))[0, 0].tolist() == [128, 128, 128]


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.zeros((4, 4), np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32896, 257
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(data.load_image(tmp_path / "g16.png"))
    assert out[0, :3, 0].tolist() == [255, 128, 1] and out[1, 1].tolist() == [0, 0, 0]
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([65535, 32896], ">u2").tobytes())
    assert np.asarray(data._to_rgb(big_endian))[0, :, 0].tolist() == [255, 128]


def test_load_image_errors(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    cases = {"cut.jpg": "truncated", "zero.png": "empty", "text.png": "", "missing.png": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(data.ImageError) as info:
            data.load_image(tmp_path / name)
        msg = str(info.value)
        assert str(tmp_path / name) in msg and "\n" not in msg and reason in msg, msg
        assert isinstance(info.value, ValueError)
    with pytest.raises(data.ImageError):
        data.load_image(tmp_path)  # a folder


def test_load_image_size_limits(tmp_path, monkeypatch):
    Image.new("1", (8200, 6100), 1).save(tmp_path / "50mp.png")  # a 50 MP image must load
    out = data.load_image(tmp_path / "50mp.png")
    assert out.size == (8200, 6100) and out.mode == "RGB"
    del out
    Image.new("1", (10000, 10000)).save(tmp_path / "bomb.png")  # 100 MP: over PIL's bomb threshold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(data.ImageError, match="too large"):
            data.load_image(tmp_path / "bomb.png")
    assert not caught  # refused cleanly, no DecompressionBombWarning leaking out
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    with pytest.raises(data.ImageError, match="MAX_PIXELS"):
        data.load_image(tmp_path / "small.png")


# -----------------------------------------------------------------------------
# real images: tensors, grids, crops


def test_tensor_round_trip_and_grid(tmp_path):
    img = Image.fromarray(rgb_array())
    x = data.to_tensor(img)
    assert x.shape == (3, 20, 40) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(data.to_uint8(x), rgb_array())
    batch = torch.stack([x, x * 3])  # out of range values are clamped
    u = data.to_uint8(batch)
    assert u.shape == (2, 20, 40, 3) and u[1].max() == 255 and u[1].min() == 0
    with pytest.raises(ValueError):
        data.to_tensor(img.convert("L"))
    rows = [torch.zeros(3, 3, 8, 8) - 1, torch.ones(2, 3, 8, 8)]
    path = tmp_path / "sub" / "grid.png"
    data.save_grid(rows, path, pad=2)
    g = np.asarray(Image.open(path))
    assert g.shape == (2 + 2 * 10, 2 + 3 * 10, 3)
    assert g[2, 2].tolist() == [0, 0, 0] and g[12, 2].tolist() == [255, 255, 255]
    assert sorted(os.listdir(tmp_path / "sub")) == ["grid.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        data.save_grid([torch.zeros(3, 8, 8)], path)


def test_crops():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255  # white centre third
    img = Image.fromarray(a)
    c = data.center_crop_resize(img, 32)
    assert c.size == (32, 32) and np.asarray(c).mean() > 250  # the centre square is all white
    for rng_a, rng_b, rng_c in ((random.Random(1), random.Random(1), random.Random(2)),
                                (torch.Generator().manual_seed(1), torch.Generator().manual_seed(1),
                                 torch.Generator().manual_seed(2))):
        r1 = [np.asarray(data.random_crop_resize(img, 24, rng_a)) for _ in range(5)]
        r2 = [np.asarray(data.random_crop_resize(img, 24, rng_b)) for _ in range(5)]
        r3 = [np.asarray(data.random_crop_resize(img, 24, rng_c)) for _ in range(5)]
        assert all(x.shape == (24, 24, 3) for x in r1)
        assert all(np.array_equal(x, y) for x, y in zip(r1, r2))
        assert not all(np.array_equal(x, y) for x, y in zip(r1, r3))
    # on a square image the crop covers 75-100% of the area: a centred dot always survives
    sq = np.zeros((200, 200, 3), np.uint8)
    sq[95:105, 95:105] = 255
    rng = random.Random(0)
    for _ in range(20):
        assert np.asarray(data.random_crop_resize(Image.fromarray(sq), 50, rng)).max() > 100
    with pytest.raises(ValueError):
        data.random_crop_resize(img, 24, random.Random(0), min_area=0)
    with pytest.raises(TypeError):
        data.random_crop_resize(img, 24, 123)


def test_split_indices():
    tr, va = data.split_indices(100, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90 and sorted(tr + va) == list(range(100))
    assert (tr, va) == data.split_indices(100, 0.1, seed=0)
    assert va != data.split_indices(100, 0.1, seed=1)[1]
    assert data.split_indices(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError):
        data.split_indices(10, 1.0, 0)


# -----------------------------------------------------------------------------
# real images: ImageFolder


def make_tree(root):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls)
        for j in range(3):
            a = rng.integers(0, 255, (40 + 10 * j, 60, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{j}.{'png' if j % 2 else 'JPG'}")
    (root / "dog" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("ignored")
    os.makedirs(root / ".hidden")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".hidden" / "x.png")


def test_image_folder_skips_bad_files(tmp_path):
    make_tree(tmp_path)
    ds = data.ImageFolder(tmp_path, 32, train=True, seed=0)
    rel = [os.path.relpath(f, tmp_path) for f in ds.files]
    assert rel == ["cat/0.JPG", "cat/1.png", "cat/2.JPG", "dog/0.JPG", "dog/1.png", "dog/2.JPG",
                   "dog/broken.jpeg"]
    bad = rel.index("dog/broken.jpeg")
    with pytest.warns(UserWarning, match="broken.jpeg"):
        x = ds[bad]  # replaced by the next readable file (wraps around to cat/0)
    assert x.shape == (3, 32, 32) and ds.bad_files and ds.bad_files[0][0].endswith("broken.jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file only
        ds[bad]
        xs = [ds[i] for i in range(len(ds) - 1)]
    assert len(ds.bad_files) == 1 and all(t.shape == (3, 32, 32) for t in xs)
    assert torch.equal(ds[2], ds[2])  # reproducible within an epoch
    before = ds[2]
    ds.set_epoch(1)
    assert not torch.equal(ds[2], before)  # a new crop next epoch
    val = data.ImageFolder(tmp_path, 32, train=False)
    assert torch.equal(val[0], data.to_tensor(data.center_crop_resize(data.load_image(val.files[0]), 32)))
    with pytest.warns(UserWarning):
        bad_found = val.scan(progress=False)
    assert [os.path.basename(p) for p, _ in bad_found] == ["broken.jpeg"] and len(val) == 6


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope", 32, train=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolder(tmp_path / "empty", 32, train=False)
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.png").write_bytes(b"")
    (tmp_path / "allbad" / "b.png").write_text("nope")
    ds = data.ImageFolder(tmp_path / "allbad", 32, train=False)
    with pytest.warns(UserWarning), pytest.raises(data.ImageError, match="no readable image"):
        ds[0]


# -----------------------------------------------------------------------------
# train_vae.py's stream of tar shards: ShardImages, ShardBatches, shard_validation

def solid_shards(folder, shards: int = 4, per_shard: int = 3) -> list:
    """Shards whose images are solid colours: shard s holds grey level 40 * (s + 1) (its images
    tell which shard they came from), keys s000i, a caption each."""
    import conftest
    paths = []
    for s in range(shards):
        pixels = np.full((20, 24, 3), 40 * (s + 1), np.uint8)
        members = []
        for i in range(per_shard):
            members += [(f"{s}{i:04d}.png", conftest.png_bytes(pixels)), (f"{s}{i:04d}.txt", b"grey")]
        path = folder / f"{s:05d}.tar"
        conftest.write_tar(path, members)
        paths.append(str(path))
    return paths


def shard_of(x: torch.Tensor) -> int:
    return int(round(float((x.mean() + 1) * 127.5) / 40)) - 1


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resume_position_never_skips_an_unread_shard(workers, tmp_path):
    """After every batch, every shard before position() in this rank's order has been delivered
    whole (a resume skips nothing unread); with one worker it lags at most one shard (the
    last image of a shard comes before the reader knows the shard has ended)."""
    paths = solid_shards(tmp_path)
    ds = data.ShardImages(paths, 16, rank=0, world=1, seed=3, val_fraction=0.0, buffer=1)
    order = [paths.index(p) for p in ds.mine(0)]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]  # a shuffled order (seed 3)
    batches = data.ShardBatches(ds, batch_size=1, workers=workers, device=torch.device("cpu"))
    seen, positions = [], []
    for _ in range(12):  # one epoch
        x, skipped = next(batches)
        assert x.shape == (1, 3, 16, 16) and list(skipped) == [""]
        seen.append(shard_of(x[0]))
        epoch, first = batches.position()
        assert epoch == 0 and 0 <= first < 4
        assert all(seen.count(s) == 3 for s in order[:first]), (seen, first)  # read through
        whole = next(k for k in range(5) if k == 4 or seen.count(order[k]) < 3)  # shards read through
        assert workers or first >= whole - 1, (seen, first)  # one worker: at most the last one again
        positions.append(first)
    assert sorted(seen) == sorted(order * 3) and positions == sorted(positions) and positions[-1] >= 2
    x, _ = next(batches)
    assert batches.position()[0] == 1 or workers  # the next epoch began


def test_shard_stream_starts_at_its_position_and_splits_ranks(tmp_path):
    paths = solid_shards(tmp_path)
    ds = data.ShardImages(paths, 16, rank=0, world=1, seed=3, val_fraction=0.0, buffer=1, start=(0, 2))
    it = iter(ds)
    first = [shard_of(next(it)[0]) for _ in range(6)]
    mine = [paths.index(p) for p in ds.mine(0)]
    assert first == [mine[2]] * 3 + [mine[3]] * 3
    x, epoch, worker, done, skipped = next(it)
    assert epoch == 1 and shard_of(x) == [paths.index(p) for p in ds.mine(1)][0]
    ranks = [data.ShardImages(paths, 16, rank=r, world=2, seed=3, val_fraction=0.0, buffer=1) for r in (0, 1)]
    for epoch in (0, 1):  # each epoch the two ranks read every shard once between them
        assert sorted(ranks[0].mine(epoch) + ranks[1].mine(epoch)) == sorted(paths)
        assert len(ranks[0].mine(epoch)) == 2
    with pytest.raises(ValueError, match="2 shard"):
        data.ShardImages(paths[:2], 16, rank=0, world=3, seed=0, val_fraction=0.0, buffer=1)


def test_shard_stream_skips_bad_members_and_holds_out_validation(tmp_path):
    import conftest
    rng = np.random.default_rng(0)
    good = [(f"k{i:03d}", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(40)]
    members = [(f"{k}.png", conftest.png_bytes(p)) for k, p in good]  # no captions: the VAE needs none
    members += [("bad.jpg", conftest.png_bytes(good[0][1])[:60]), ("odd.xyz", b"?")]
    conftest.write_tar(tmp_path / "a.tar", members)
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[:len(whole) // 2])  # cut short
    paths = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    val = data.shard_validation(paths[:1], 16, 100, 0.25, seed=0)
    held = [k for k, _ in good if data.held_out(k, 0.25, 0)]
    assert 4 <= len(held) < 20 and len(val) == len(held)
    want = [data.to_tensor(data.center_crop_resize(Image.fromarray(p), 16)) for k, p in good if k in held]
    assert all(torch.equal(a, b) for a, b in zip(val, want))
    ds = data.ShardImages(paths, 16, rank=0, world=1, seed=0, val_fraction=0.25, buffer=4)
    ds.mine = lambda epoch: paths  # a then b
    items, lines = [], ""
    for item in ds:
        if item[1] > 0:
            break
        items.append(item[0])
        lines += item[4]
    # a's training images (none held out) plus b's whole members before the cut, each once
    b_keys = []
    try:
        for s in data.shard_samples(paths[1]):
            b_keys.append(s["key"])
    except data.ShardError:
        pass
    assert len(items) == (40 - len(held)) + len([k for k in b_keys if not data.held_out(k, 0.25, 0)])
    reasons = [l.split("\t", 1) for l in lines.splitlines()]
    names = [n for n, _ in reasons]
    assert names[:2] == ["a.tar/bad", "a.tar/odd"] and names[2] == paths[1], reasons
    assert "image file is truncated" in reasons[0][1] or "cannot load image" in reasons[0][1]
    assert reasons[1][1] == "unknown extension" and "truncated" in reasons[2][1]
    kinds = data.Skipped(lambda msg: None)
    kinds.add([lines, lines])  # each name counted once
    assert kinds.kinds == {"undecodable image": 1, "unknown extension": 1, "unreadable shard": 1}
