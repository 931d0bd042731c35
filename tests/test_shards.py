"""img2dataset shards: data.py's readers (braces, globs, folders, truncated tars, samples and
skip reasons, the hash hold-out) and prepare.py --source shards on real tar and `files` shards:
tokens equal --source jsonl of the same images, bad members counted, a failed shard retried by
the rerun, kill -9 and rerun, two processes and DataLoader workers equal one, and train_gpt's
reader (data.TokenCaptions) over the per-shard parts."""

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import biart
import data
import prepare
import shapes
import tokenizer
from conftest import cli, save_tiny_vae, write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TRAIN_SHARDS, TRAIN_PER, VAL_SHARDS, VAL_PER = 3, 4, 2, 3
MANY, MANY_PER = 16, [6] * 15 + [30]  # the kill, torchrun, workers and hold-out tests' shards (rank 1's
# last one larger: rank 0 waits for it)
MANY_FLAGS = ["--crops", "1", "--val-fraction", "0.3", "--seed", "1", "--batch-size", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# -----------------------------------------------------------------------------------------
# fixtures: shapes as tar shards, an img2dataset `files` folder and the same images as jsonl

def encoded(image: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG" if ext == ".jpg" else "PNG", quality=90)
    return buf.getvalue()


def sample_members(key: str, image: bytes, ext: str, caption: str, k: int) -> list:
    """img2dataset's members of one sample; now and then the caption only in the .json, or
    with whitespace around it (both sources strip it)."""
    meta = {"key": key, "url": f"http://example.com/{key}{ext}", "status": "success"}
    if k % 4 == 2:
        return [(key + ext, image), (key + ".json", json.dumps({**meta, "caption": caption}).encode())]
    text = f"  {caption}\n" if k % 4 == 1 else caption
    return [(key + ext, image), (key + ".txt", text.encode()), (key + ".json", json.dumps(meta).encode())]


def make_shard_set(root, prefix: str, split: str, shards: int, per, first_key: int = 0) -> dict:
    """`shards` tar files root/{prefix}-{s:05d}.tar of `per` shapes each (or per[s]; some JPEG,
    some PNG) and the same images under root/img.
    -> {shard basename: [(key, image name, caption, image bytes, extension)]}."""
    (root / "img").mkdir(exist_ok=True)
    out, idx = {}, 0
    for s in range(shards):
        members, rows = [], []
        for i in range(per[s] if isinstance(per, list) else per):
            idx += 1
            e = shapes.shapes_example(idx, split, 32)
            key = f"{first_key + s:05d}{i:04d}"
            ext = ".jpg" if idx % 3 == 1 else ".png"
            content = encoded(e.image, ext)
            (root / "img" / f"{key}{ext}").write_bytes(content)
            members += sample_members(key, content, ext, e.captions[0], idx)
            rows.append((key, f"img/{key}{ext}", e.captions[0], content, ext))
        write_tar(root / f"{prefix}-{s:05d}.tar", members)
        out[f"{prefix}-{s:05d}.tar"] = rows
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    vae = root / "vae.pt"
    model = save_tiny_vae(vae)
    train = make_shard_set(root, "train", "train", TRAIN_SHARDS, TRAIN_PER, 0)
    val = make_shard_set(root, "val", "val", VAL_SHARDS, VAL_PER, 100)
    for split, shards in (("train", train), ("val", val)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"image": name, "caption": cap}) + "\n"
                                                     for rows in shards.values() for _, name, cap, _, _ in rows))
    # img2dataset --output_format files: OUT/00000/KEY.jpg, KEY.txt, KEY.json and, beside the
    # subfolders, each shard's stats and parquet; here the first two training shards
    files = root / "files"
    for s in range(2):
        (files / f"{s:05d}").mkdir(parents=True)
        (files / f"{s:05d}_stats.json").write_text("{}")
        (files / f"{s:05d}.parquet").write_bytes(b"PAR1")
        for key, _, cap, content, ext in train[f"train-{s:05d}.tar"]:
            (files / f"{s:05d}" / f"{key}{ext}").write_bytes(content)
            (files / f"{s:05d}" / f"{key}.txt").write_text(cap)
            (files / f"{s:05d}" / f"{key}.json").write_text(json.dumps({"key": key}))
    many = root / "many"
    many.mkdir()
    many_rows = make_shard_set(many, "m", "train", MANY, MANY_PER, 200)
    return dict(root=root, vae=str(vae), model=model, train=train, val=val, files=files, many=many,
                many_rows=many_rows, train_spec=str(root / "train-{00000..00002}.tar"),
                val_spec=str(root / "val-*.tar"), many_spec=str(many / f"m-{{00000..{MANY - 1:05d}}}.tar"))


def shard_args(w, out, *extra, shards=None, val=True) -> list:
    return ["--vae", w["vae"], "--source", "shards", "--shards", shards or w["train_spec"],
            *(["--val-shards", w["val_spec"], "--val-fraction", "0.5"] if val else []),  # the fraction: unused
            "--out", str(out), "--batch-size", "3", *extra]


@pytest.fixture(scope="module")
def prepared(world):
    """The same images prepared from the tar shards and from jsonl files."""
    root = world["root"]
    shards = root / "tok_shards"
    meta = prepare.main(shard_args(world, shards))
    jsonl = root / "tok_jsonl"
    prepare.main(["--vae", world["vae"], "--source", "jsonl", "--captions", str(root / "train.jsonl"),
                  "--val-captions", str(root / "val.jsonl"), "--out", str(jsonl), "--batch-size", "3"])
    return shards, jsonl, meta


@pytest.fixture(scope="module")
def many_full(world):
    """An uninterrupted one-process prepare of the ten `many` shards, 1 crop, hash hold-out."""
    out = world["root"] / "many_full"
    prepare.main(["--vae", world["vae"], "--source", "shards", "--shards", world["many_spec"], "--out", str(out),
                  *MANY_FLAGS])
    return out


def rows(folder, split: str, suffix: str = "") -> np.ndarray:
    """A split as one array, read the way train_gpt.py does: data.split_parts + data.Rows."""
    stems = data.split_parts(str(folder), split)
    r = data.Rows([np.load(os.path.join(folder, f"{stem}{suffix}.npy"), mmap_mode="r") for stem in stems])
    assert len(r) == r.shape[0] == sum(len(a) for a in r.arrays) and r.dtype == np.uint16
    return np.stack([r[i] for i in range(len(r))])


def lines(folder, split: str) -> list:
    return [json.loads(line) for stem in data.split_parts(str(folder), split)
            for line in open(os.path.join(folder, f"{stem}.jsonl")).read().splitlines()]


def snapshot(out, skip=()) -> dict:
    """Every file prepare leaves in OUT/shards (arrays, lines, done records), as bytes."""
    d = os.path.join(out, prepare.SHARDS_DIR)
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f not in skip}


def assert_same_shards_output(a, b, compare_meta=True):
    """The same files in OUT/shards, byte for byte, and the same meta.json (without
    compare_meta: the same parts and counts, and done records equal but for the shard's path)."""
    x, y = snapshot(a), snapshot(b)
    assert x.keys() == y.keys()
    for name in x:
        if name.endswith(".done.json") and not compare_meta:
            assert {**json.loads(x[name]), "path": ""} == {**json.loads(y[name]), "path": ""}, name
        else:
            assert x[name] == y[name], name
    ma, mb = (json.loads(open(os.path.join(p, "meta.json")).read()) for p in (a, b))
    assert ma["parts"] == mb["parts"] and ma["splits"] == mb["splits"]
    if compare_meta:
        assert ma == mb


# -----------------------------------------------------------------------------------------
# 1. shard specs

def test_expand_braces_and_list_shards(tmp_path, capsys, world):
    assert data.expand_braces("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert data.expand_braces("x{8..11}") == ["x8", "x9", "x10", "x11"]  # no padding asked
    assert data.expand_braces("s{098..101}") == ["s098", "s099", "s100", "s101"]
    assert data.expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert data.expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    with pytest.raises(ValueError, match="backwards"):
        data.expand_braces("{3..1}")

    d = tmp_path / "tars"
    d.mkdir()
    for name in ("c.tar", "a.tar", "b.tar", "a_stats.json", "a.parquet"):
        (d / name).write_bytes(b"")
    tars = [str(d / n) for n in ("a.tar", "b.tar", "c.tar")]
    assert data.list_shards(str(d / "*.tar")) == tars  # a glob: sorted
    assert data.list_shards(str(d)) == tars  # a folder of tar files: those
    assert data.list_shards(str(d / "{c,a}.tar")) == [tars[2], tars[0]]  # braces keep their order
    assert data.list_shards(str(d / "{c,a,c}.tar")) == [tars[2], tars[0]]  # each once
    assert data.list_shards(str(d / "{0..1}.tar")) == [str(d / "0.tar"), str(d / "1.tar")]  # missing ones stay
    files = world["files"]  # img2dataset's files output: its subfolders, not the stats files
    assert data.list_shards(str(files)) == [str(files / "00000"), str(files / "00001")]
    assert data.list_shards(str(files / "00000")) == [str(files / "00000")]  # a folder of samples: itself
    with pytest.raises(ValueError, match="matches no file"):
        data.list_shards(str(d / "*.tgz"))
    with pytest.raises(ValueError, match="matches no file"):
        data.list_shards(str(d / "{a,zz*}.tar"))
    assert data.is_shard_spec("cc3m/{00000..00331}.tar") and data.is_shard_spec("cc3m/*.tar")
    assert data.is_shard_spec("x/00000.tar") and data.is_shard_spec("x/{a,b}")
    assert not data.is_shard_spec("out/tokens") and not data.is_shard_spec("out/{x}")

    for args, message in ((["--shards", str(d / "*.tgz")], "matches no file"), ([], "no shards given")):
        code, _, err = cli(lambda: prepare.main(["--vae", world["vae"], "--source", "shards", *args,
                                                 "--out", str(tmp_path / "o")]), capsys, "prepare.py")
        err_lines = err.strip().splitlines()
        assert code == 2 and len(err_lines) == 1 and message in err_lines[0], err
        assert not (tmp_path / "o" / "meta.json").exists()


# -----------------------------------------------------------------------------------------
# 2. shard_members: whole members before the damage, then ShardError

MEMBERS = [(f"{i:04d}.bin", bytes(np.random.default_rng(i).integers(0, 256, 700 + 300 * i, dtype=np.uint8)))
           for i in range(4)]  # sizes not multiples of 512: each member's data ends in padding


def read_members(path) -> tuple:
    got = []
    try:
        for name, content in data.shard_members(str(path)):
            got.append((name, content))
    except data.ShardError as e:
        return got, str(e)
    return got, None


def data_end(offsets, i) -> int:
    """The end of member i's padded data."""
    return offsets[i] + 512 + -(-len(MEMBERS[i][1]) // 512) * 512


def test_shard_members_truncated_tar(tmp_path):
    whole = tmp_path / "whole.tar"
    offsets = write_tar(whole, MEMBERS)
    raw = whole.read_bytes()
    assert read_members(whole) == (MEMBERS, None)
    end = data_end(offsets, 3)
    assert raw[end:end + 1024] == bytes(1024)
    (tmp_path / "unpadded.tar").write_bytes(raw[:end + 1024])  # end blocks, no 10 KiB record padding
    assert read_members(tmp_path / "unpadded.tar") == (MEMBERS, None)
    cuts = {"inside member 2's data": (offsets[2] + 512 + 300, 2),
            "inside member 2's padding": (offsets[2] + 512 + len(MEMBERS[2][1]) + 5, 3),
            "at member 2's header (a member boundary)": (offsets[2], 2),
            "inside member 2's header": (offsets[2] + 100, 2),
            "right after the last member": (end, 4),
            "inside the end-of-archive blocks": (end + 512, 4),
            "inside member 0's header": (200, 0)}
    for what, (cut, whole_members) in cuts.items():
        path = tmp_path / "cut.tar"
        path.write_bytes(raw[:cut])
        got, error = read_members(path)
        assert error is not None, f"cut {what}: no ShardError"
        assert str(path) in error and "\n" not in error, error
        assert got == MEMBERS[:whole_members], what
    got, error = read_members(tmp_path / "gone.tar")
    assert got == [] and str(tmp_path / "gone.tar") in error and "no such file" in error
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, content in reversed(MEMBERS):
        (folder / name).write_bytes(content)
    (folder / ".hidden").write_bytes(b"x")
    assert read_members(folder) == (MEMBERS, None)  # a folder shard: sorted by name


def test_shard_members_truncated_tar_gz(tmp_path):
    """A .tar.gz cut short must fail like a .tar: tarfile's stream reader does not notice the
    missing gzip end, so a cut whose data ends at or inside a header looks like the end."""
    offsets = write_tar(tmp_path / "whole.tar", MEMBERS)
    raw = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(raw))
    assert read_members(tmp_path / "whole.tar.gz") == (MEMBERS, None)

    def gz_prefix(n: int) -> bytes:  # a gzip stream of raw[:n], cut right after it (no end, no CRC)
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(raw[:n]) + c.flush(zlib.Z_SYNC_FLUSH)
    silent = []
    for what, cut in {"inside member 2's data": offsets[2] + 600, "at member 2's header": offsets[2],
                      "inside member 2's header": offsets[2] + 100, "right after the last member": data_end(offsets, 3),
                      "inside the end-of-archive blocks": data_end(offsets, 3) + 512}.items():
        path = tmp_path / "cut.tar.gz"
        path.write_bytes(gz_prefix(cut))
        got, error = read_members(path)
        assert got == MEMBERS[:2 if "member 2" in what else 4], what
        if error is None:
            silent.append(what)
        else:
            assert str(path) in error and "\n" not in error, error
    # a download of the whole .tar.gz cut short anywhere: never fewer members without an error
    gz = gzip.compress(raw)
    for cut in range(10, len(gz), 3):
        path.write_bytes(gz[:cut])
        got, error = read_members(path)
        assert got == MEMBERS[:len(got)]
        if error is None and len(got) < len(MEMBERS):
            silent.append(f"at byte {cut} of {len(gz)} (gzip.compress; {len(got)} of {len(MEMBERS)} members)")
            break
    assert not silent, f"a .tar.gz cut {', '.join(silent)} reads as whole (no ShardError)"


def test_shard_samples_and_held_out(tmp_path):
    png = encoded(np.zeros((8, 8, 3), np.uint8), ".png")
    write_tar(tmp_path / "s.tar", [
        ("a.png", png), ("a.txt", b" first \n"), ("a.json", b'{"caption": "json one", "alt": "alt one"}'),
        ("b.jpg", b"\xff\xd8 not really"), ("b.json", b'{"caption": "only json"}'),
        ("c.png", png), ("c.txt", b" \t\n"),
        ("d.xyz", b"?"), ("e.txt", b"caption, no image"), ("f.png", png),
        ("dir/g.png", png), ("dir/g.txt", b"g caption"), ("h.JPG", png), ("h.TXT", b"upper")])
    got = list(data.shard_samples(str(tmp_path / "s.tar")))
    assert [(s["key"], s["image_ext"], s["caption"], s["reason"]) for s in got] == [
        ("a", ".png", " first \n", ""), ("b", ".jpg", "only json", ""), ("c", ".png", " \t\n", "empty caption"),
        ("d", None, None, "unknown extension"), ("e", None, None, "no image"), ("f", ".png", None, "no caption"),
        ("dir/g", ".png", "g caption", ""), ("h", ".jpg", "upper", "")]
    assert got[0]["image"] == png and got[1]["image"] == b"\xff\xd8 not really"
    alt = list(data.shard_samples(str(tmp_path / "s.tar"), caption_field="alt"))
    assert (alt[0]["caption"], alt[1]["reason"]) == ("alt one", "no caption")  # the field, not the .txt
    assert all(r in data.SKIP_REASONS for s in got for r in [s["reason"]] if r)

    keys = [f"{i:09d}" for i in range(2000)]
    for seed in (0, 1):
        val = [k for k in keys if data.held_out(k, 0.1, seed)]
        assert 140 < len(val) < 260, len(val)
        assert val == [k for k in keys if data.held_out(k, 0.1, seed)]  # a function of the key
    assert {k for k in keys if data.held_out(k, 0.1, 0)} != {k for k in keys if data.held_out(k, 0.1, 1)}
    assert not any(data.held_out(k, 0.0, 0) for k in keys) and all(data.held_out(k, 1.0, 0) for k in keys)


# -----------------------------------------------------------------------------------------
# 3. shards equal jsonl; a `files` folder equals the tar shards

def test_tokenizer_learns_from_a_shard_folder_what_it_learns_from_the_same_captions(prepared, tmp_path):
    """`tokenizer.py train FOLDER` reads the train split of every shard's part, in order."""
    shards, jsonl, _ = prepared
    merges = {}
    for name, src in (("shards", shards), ("jsonl", jsonl / "train.jsonl")):
        out = tmp_path / f"{name}.txt.gz"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), "train", str(src), "--vocab-size",
                            "530", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{TRAIN_SHARDS * TRAIN_PER} captions" in r.stdout, r.stdout
        merges[name] = gzip.decompress(out.read_bytes())
    assert merges["shards"] == merges["jsonl"]


def test_shard_tokens_and_captions_equal_jsonl(world, prepared):
    shards, jsonl, meta = prepared
    assert meta == json.loads((shards / "meta.json").read_text())
    assert meta["parts"] == {"train": [[f"shards/{j:06d}.train", TRAIN_PER] for j in range(TRAIN_SHARDS)],
                             "val": [[f"shards/{TRAIN_SHARDS + j:06d}.val", VAL_PER] for j in range(VAL_SHARDS)]}
    assert meta["skipped_by_reason"] == {} and meta["failed_shards"] == {}
    assert meta["splits"]["train"]["images"] == TRAIN_SHARDS * TRAIN_PER
    assert (meta["image_len"], meta["codebook_size"], meta["source"]) == (16, 512, "shards")
    assert not (shards / "train.npy").exists() and not (shards / "parts").exists()
    for split in ("train", "val"):
        want = np.load(jsonl / f"{split}.npy")
        got = rows(shards, split)
        assert got.shape == want.shape and np.array_equal(got, want), split
        assert [l["captions"] for l in lines(shards, split)] == [l["captions"] for l in lines(jsonl, split)]
        shard_rows = world[split]
        assert [l["image"] for l in lines(shards, split)] == [f"{s}/{key}" for s, r in shard_rows.items()
                                                                for key, *_ in r]
    assert len(np.unique(rows(shards, "train"), axis=0)) == TRAIN_SHARDS * TRAIN_PER  # images told apart
    assert "shard 5/5 done: " in (shards / "log.txt").read_text()


def test_files_folder_equals_tar_shards(world, prepared, tmp_path):
    shards, _, _ = prepared
    out = tmp_path / "files_tok"
    meta = prepare.main(shard_args(world, out, shards=str(world["files"])))
    assert [p[1] for p in meta["parts"]["train"]] == [TRAIN_PER, TRAIN_PER]
    n = 2 * TRAIN_PER
    assert np.array_equal(rows(out, "train"), rows(shards, "train")[:n])
    assert [l["captions"] for l in lines(out, "train")] == [l["captions"] for l in lines(shards, "train")[:n]]
    assert [l["image"] for l in lines(out, "train")][:2] == [f"00000/{world['train']['train-00000.tar'][i][0]}"
                                                             for i in range(2)]
    assert np.array_equal(rows(out, "val"), rows(shards, "val"))


# -----------------------------------------------------------------------------------------
# 4. bad members are counted, a failed shard is retried by the rerun

def test_bad_members_are_counted_not_fatal(world, prepared, tmp_path):
    shards, _, _ = prepared
    png = world["train"]["train-00000.tar"][0][3]
    jpeg = encoded(shapes.shapes_example(0, "train", 32).image, ".jpg")
    bad = {  # key: (members, reason); even ones go to the first shard, odd ones to the second
        "b01": ([("b01.jpg", jpeg[:len(jpeg) // 2]), ("b01.txt", b"cut short")], "undecodable image"),
        "b02": ([("b02.png", b"\x89PNG not at all"), ("b02.txt", b"garbage")], "undecodable image"),
        "b03": ([("b03.png", png)], "no caption"),
        "b04": ([("b04.png", png), ("b04.json", b'{"key": "b04"}')], "no caption"),
        "b05": ([("b05.png", png), ("b05.json", b"{not json")], "no caption"),
        "b06": ([("b06.png", png), ("b06.txt", b"  \n\t ")], "empty caption"),
        "b07": ([("b07.xyz", b"what is this")], "unknown extension"),
        "b08": ([("b08.txt", b"a caption without its image")], "no image"),
    }
    (tmp_path / "in").mkdir()
    for s in range(2):
        good = world["train"][f"train-{s:05d}.tar"]
        members = []
        for i, (key, _, cap, content, ext) in enumerate(good):
            members += list(bad.values())[2 * i + s][0] + sample_members(key, content, ext, cap, i)
        members += [(good[-1][0] + ".extra.npy", b"an unknown member beside an image")] * (s == 0)
        write_tar(tmp_path / "in" / f"train-{s:05d}.tar", members)
    out = tmp_path / "tok"
    meta = prepare.main(shard_args(world, out, shards=str(tmp_path / "in" / "train-{00000..00001}.tar")))
    assert meta["skipped_by_reason"] == {"undecodable image": 2, "no caption": 3, "empty caption": 1,
                                         "unknown extension": 1, "no image": 1}
    assert meta["failed_shards"] == {}
    assert meta["parts"]["train"] == [[f"shards/{s:06d}.train", TRAIN_PER] for s in range(2)]
    for s in range(2):  # every good sample encoded, as in the clean shards
        for ext in (".npy", ".jsonl"):
            name = f"{s:06d}.train{ext}"
            assert (out / "shards" / name).read_bytes() == (shards / "shards" / name).read_bytes(), name
    listed = {}
    for s in range(2):
        done = json.loads((out / "shards" / f"{s:06d}.done.json").read_text())
        assert done["rows"] == {"train": TRAIN_PER} and sum(done["skipped"].values()) == 4
        listed.update({name: detail for name, detail in done["members"]})
    assert listed.keys() == {f"train-{int(k[1:]) % 2 ^ 1:05d}.tar/{k}" for k in bad}
    for name, detail in listed.items():
        reason = bad[name.split("/")[1]][1]
        assert detail == reason or (reason == "undecodable image" and name.split("/")[1] in detail), (name, detail)
    log = (out / "log.txt").read_text()
    assert f"train {TRAIN_PER} images, 4 skipped" in log and "undecodable image 2, " in log


def copy_shards(world, folder, names):
    folder.mkdir()
    for n in names:
        shutil.copy(world["root"] / n, folder / n)


def test_truncated_shard_fails_alone_and_the_rerun_retries_it(world, prepared, tmp_path, capsys):
    shards, _, _ = prepared
    folder = tmp_path / "in"
    copy_shards(world, folder, [f"train-{s:05d}.tar" for s in range(TRAIN_SHARDS)])
    whole = (folder / "train-00001.tar").read_bytes()
    with tarfile.open(folder / "train-00001.tar") as tf:
        cut = tf.getmembers()[4].offset_data + 50  # inside the second sample's second member
    (folder / "train-00001.tar").write_bytes(whole[:cut])
    out = tmp_path / "tok"
    args = shard_args(world, out, shards=str(folder / "train-{00000..00002}.tar"))
    meta = prepare.main(args)
    bad = str(folder / "train-00001.tar")
    assert list(meta["failed_shards"]) == [bad]
    message = meta["failed_shards"][bad]
    assert bad in message and "truncated" in message and "\n" not in message
    assert meta["parts"]["train"] == [["shards/000000.train", TRAIN_PER], ["shards/000002.train", TRAIN_PER]]
    assert [p[0] for p in meta["parts"]["val"]] == ["shards/000003.val", "shards/000004.val"]
    assert meta["splits"]["train"]["images"] == 2 * TRAIN_PER
    assert (out / "shards" / "000001.failed.json").exists() and not (out / "shards" / "000001.train.npy").exists()
    for stem in ("000000.train", "000002.train", "000003.val", "000004.val"):
        for ext in (".npy", ".jsonl"):
            assert (out / "shards" / (stem + ext)).read_bytes() == (shards / "shards" / (stem + ext)).read_bytes()
    log = (out / "log.txt").read_text()
    assert f"failed: {message}" in log and "1 shard(s) failed" in log and "shard 2/5 done" not in log

    (folder / "train-00001.tar").write_bytes(whole)  # fetched again
    stamps = {f: os.stat(out / "shards" / f).st_mtime_ns for f in os.listdir(out / "shards")}
    meta = prepare.main(args)
    new_log = (out / "log.txt").read_text()[len(log):]
    assert "1 to encode on rank 0" in new_log and "shard 2/5 done" in new_log
    assert sum("done: " in line for line in new_log.splitlines()) == 1, new_log
    assert all(os.stat(out / "shards" / f).st_mtime_ns == t for f, t in stamps.items() if not f.startswith("000001"))
    assert meta["failed_shards"] == {} and not (out / "shards" / "000001.failed.json").exists()
    assert meta == json.loads((out / "meta.json").read_text())
    assert_same_shards_output(shards, out, compare_meta=False)
    for split in ("train", "val"):
        assert np.array_equal(rows(out, split), rows(shards, split))
    capsys.readouterr()
    assert prepare.main(args) is None and "already prepared" in capsys.readouterr().out  # now a no-op


def test_missing_shard_in_a_range_fails_alone(world, prepared, tmp_path):
    shards, _, _ = prepared
    folder = tmp_path / "in"
    copy_shards(world, folder, ["train-00000.tar", "train-00002.tar"])
    out = tmp_path / "tok"
    meta = prepare.main(shard_args(world, out, shards=str(folder / "train-{00000..00002}.tar"), val=False))
    gone = str(folder / "train-00001.tar")
    assert list(meta["failed_shards"]) == [gone] and "no such file" in meta["failed_shards"][gone]
    assert [p[0] for parts in meta["parts"].values() for p in parts if p[0].startswith("shards/000001")] == []
    assert sum(r for parts in meta["parts"].values() for _, r in parts) == 2 * TRAIN_PER
    assert f"failed: {meta['failed_shards'][gone]}" in (out / "log.txt").read_text()


# -----------------------------------------------------------------------------------------
# 5. kill -9 and rerun; 6. two processes and workers equal one; 7. the hash hold-out

def many_cmd(world, out) -> list:
    return ["--vae", world["vae"], "--source", "shards", "--shards", world["many_spec"], "--out", str(out), *MANY_FLAGS]


def test_kill_and_rerun_equals_uninterrupted(world, many_full, tmp_path, kill_when_logged):
    cut = tmp_path / "cut"
    kill_when_logged([sys.executable, os.path.join(ROOT, "prepare.py"), *many_cmd(world, cut)],
                     cut / "log.txt", "shard 2/", ENV, ROOT)
    assert not (cut / "meta.json").exists(), "prepare finished before the kill; give it more shards"
    done = [f for f in os.listdir(cut / "shards") if f.endswith(".done.json")]
    assert 2 <= len(done) < MANY
    for f in done:  # a shard recorded done has its arrays and lines, whole
        for split, n in json.loads((cut / "shards" / f).read_text())["rows"].items():
            stem = cut / "shards" / f.replace("done.json", split)
            assert len(np.load(f"{stem}.npy")) == n and len(open(f"{stem}.jsonl").read().splitlines()) == n
    done = len(done)
    before = (cut / "log.txt").read_text()
    assert prepare.main(many_cmd(world, cut)) is not None
    assert f"{MANY - done} to encode on rank 0" in (cut / "log.txt").read_text()[len(before):]
    assert_same_shards_output(many_full, cut)
    assert not [f for f in os.listdir(cut / "shards") if ".tmp" in f] and not (cut / "parts").exists()


def test_two_processes_and_workers_equal_one_process(world, many_full, tmp_path):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "prepare.py"), *many_cmd(world, two)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in (two / "log.txt").read_text()
    assert_same_shards_output(many_full, two)
    workers = tmp_path / "workers"
    prepare.main([*many_cmd(world, workers), "--workers", "2"])
    assert_same_shards_output(many_full, workers)


def test_val_fraction_holds_out_by_key(world, many_full):
    meta = json.loads((many_full / "meta.json").read_text())
    order = [(s, key) for s, r in world["many_rows"].items() for key, *_ in r]
    want_val = [f"{s}/{k}" for s, k in order if data.held_out(k, 0.3, 1)]
    want_train = [f"{s}/{k}" for s, k in order if not data.held_out(k, 0.3, 1)]
    assert 0.15 * len(order) < len(want_val) < 0.45 * len(order)
    assert want_val != [f"{s}/{k}" for s, k in order if data.held_out(k, 0.3, 0)]  # --seed matters
    assert [l["image"] for l in lines(many_full, "val")] == want_val
    assert [l["image"] for l in lines(many_full, "train")] == want_train
    assert meta["splits"]["val"]["images"] == len(want_val) and meta["splits"]["train"]["images"] == len(want_train)
    # each line names its own sample, and the val rows are the centre views of exactly those images
    captions = {f"{s}/{key}": cap for s, r in world["many_rows"].items() for key, _, cap, *_ in r}
    for split in ("train", "val"):
        got = lines(many_full, split)
        assert [l["captions"] for l in got] == [[captions[l["image"]]] for l in got]
    crops = rows(many_full, "train", "_crops")
    assert crops.shape == (len(want_train), 1, 16) and not np.array_equal(crops[:, 0], rows(many_full, "train"))
    assert not any(os.path.exists(many_full / f"{stem}_crops.npy") for stem in data.split_parts(str(many_full), "val"))
    model = world["model"]
    by_name = {f"{s}/{key}": content for s, r in world["many_rows"].items() for key, _, _, content, _ in r}
    names = [l["image"] for l in lines(many_full, "val")]
    views = torch.stack([data.to_tensor(data.center_crop_resize(data.load_image(n, by_name[n]), 32)) for n in names])
    with torch.no_grad():
        assert np.array_equal(rows(many_full, "val"), model.encode(views).reshape(len(names), -1).numpy())


# -----------------------------------------------------------------------------------------
# 8. train_gpt's reader over the parts

def pairs(folder, split, train, tok, config, epochs=(0,)) -> list:
    ds = data.TokenCaptions(str(folder), split, tok, config, train=train, bpe_dropout=0.2 if train else 0.0,
                            seed=0, truncate=False)
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out += [(t.tolist(), im.tolist()) for t, im in (ds[i] for i in range(len(ds)))]
    return out


def test_token_captions_over_shard_parts(world, prepared, many_full, tmp_path):
    shards, jsonl, _ = prepared
    tok = tokenizer.Tokenizer()  # CLIP's BPE
    config = biart.BiARTConfig(n_layer=1, n_head=2, n_embd=32, text_len=24, image_len=16, image_vocab=512,
                               text_vocab=tok.vocab_size, eot_token=tok.eot_id)
    for split, train in (("train", True), ("val", False)):
        got = pairs(shards, split, train, tok, config)
        assert got == pairs(jsonl, split, train, tok, config) and len(got) == len(lines(jsonl, split))
    # with crops: the per-shard parts read like one merged file of the same rows
    merged = tmp_path / "merged"
    merged.mkdir()
    meta = json.loads((many_full / "meta.json").read_text())
    for split in ("train", "val"):
        np.save(merged / f"{split}.npy", rows(many_full, split))
        (merged / f"{split}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines(many_full, split)))
    np.save(merged / "train_crops.npy", rows(many_full, "train", "_crops"))
    (merged / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "parts"}))
    got = pairs(many_full, "train", True, tok, config, epochs=(0, 1, 2))
    assert got == pairs(merged, "train", True, tok, config, epochs=(0, 1, 2))
    crops = rows(many_full, "train", "_crops")[:, 0].tolist()
    assert any(im in crops for _, im in got)  # the crops are drawn too
    assert pairs(many_full, "val", False, tok, config) == pairs(merged, "val", False, tok, config)
    # a part whose lines do not match its rows (a damaged copy) is refused, naming it
    damaged = tmp_path / "damaged"
    shutil.copytree(many_full, damaged)
    stem = data.split_parts(str(damaged), "train")[1]
    text = (damaged / f"{stem}.jsonl").read_text().splitlines(keepends=True)
    (damaged / f"{stem}.jsonl").write_text("".join(text[1:]))
    with pytest.raises(ValueError, match=f"{stem}.jsonl has {len(text) - 1} lines for {len(text)} images"):
        data.TokenCaptions(str(damaged), "train", tok, config, train=True, bpe_dropout=0.0, seed=0, truncate=False)


def test_shards_with_no_usable_sample_are_one_line(world, tmp_path, capsys):
    """Every sample skipped: refused like the other sources' "every image was unreadable",
    not a meta.json with no split (which training would refuse much later)."""
    write_tar(tmp_path / "bad.tar", [("a.png", b"\x89PNG not really"), ("a.txt", b"x"), ("b.txt", b"caption only")])
    out = tmp_path / "o"
    code, _, err = cli(lambda: prepare.main(["--vae", world["vae"], "--source", "shards", "--shards",
                                             str(tmp_path / "bad.tar"), "--out", str(out)]), capsys, "prepare.py")
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("prepare.py: error: no usable sample in 1 shard(s): 2 sample(s) skipped"), err
    assert not (out / "meta.json").exists()
