"""Tests for tokenizer.py: CLIP ids, decode, batch layout, BPE-dropout, the trainer, the CLI."""

import gzip
import html
import os
import json
import pickle
import random
import subprocess
import sys

import ftfy
import numpy as np
import pytest
import regex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tokenizer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from conftest import cli  # noqa: E402

# (text, ids) as OpenAI CLIP's simple_tokenizer.py gives them (checked against clip-anytorch 2.6.0)
KNOWN_IDS = [
    ("!", [256]),
    ("a", [320]),
    ("A", [320]),
    ("in", [530]),
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("A photo of a cat.", [320, 1125, 539, 320, 2368, 269]),
    ("Hello, World!", [3306, 267, 1002, 256]),
    ("  many   spaces\there\n", [1346, 9006, 763]),
    ("it's", [585, 568]),
    ("IT'S", [585, 568]),
    ("we'll", [649, 1342]),
    ("don't", [847, 713]),
    ("2023", [273, 271, 273, 274]),  # one word per digit
    ("3.14", [274, 269, 272, 275]),
    ("caf\xe9", [15304]),
    ("na\xefve", [1097, 35689, 563]),
    ("Stra\xdfe", [1894, 127, 253, 324]),
    ("\u6771\u4eac\u30bf\u30ef\u30fc", [48338, 21078, 105, 34941, 2429, 107, 30391]),
    ("\ud55c\uad6d\uc5b4", [15197, 250, 31871, 255, 31625, 368]),
    ("\U0001f600", [7334]),
    ("\U0001f44d\U0001f3fd", [43722]),
    ("&amp;", [261]),  # html entities are unescaped twice
    ("&amp;lt;b&amp;gt;", [283, 321, 285]),
    ("\xc3\xa9t\xc3\xa9", [3459, 39694]),  # mojibake of "ete" with accents, repaired by ftfy
    ("<|startoftext|>", [49406]),  # literal special-token text becomes the special id
    ("<|endoftext|>", [49407]),
    ("a<|endoftext|>b", [320, 49407, 321]),
    ("<|EndOfText|>", [49407]),
    ("x<<|endoftext|>", [343, 24588, 347, 40786, 4160, 91, 285]),
    ("</w>", [34308, 342, 285]),
    ("\x00\x01\x02", []),  # control characters removed by ftfy
    ("\x1b[31mred\x1b[0m", [736]),  # terminal escapes removed by ftfy
    ("\u2019s", [568]),  # curly apostrophe straightened
    ("\ufb01sh", [2759]),  # ligature split
    ("\uff26\uff55\uff4c\uff4c", [1476]),  # fullwidth letters
    ("a\u0301", [22229]),  # NFC composes a + combining acute
    ("\u0130", [328, 16384]),  # dotted capital I lowercases to two code points
    ("\u017f", [129, 379]),
    ("''", [8445]),
    ("", []),
    (" \t\n ", []),
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    """A merges file with the first 40 of CLIP's merges (vocab 554)."""
    path = str(tmp_path_factory.mktemp("bpe") / "tiny.txt.gz")
    with gzip.open(tokenizer.default_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[:41]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_gz(path, text):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return str(path)


# ----- the CLIP vocabulary -----------------------------------------------------------------------

def test_default_file_is_clip(tok):
    assert tokenizer.default_bpe_path() == os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")
    assert os.path.exists(os.path.join(ROOT, "assets", "LICENSE-CLIP.txt"))
    assert tok.vocab_size == 49408 == 512 + tokenizer.CLIP_NUM_MERGES + 2
    assert (tok.sot_id, tok.eot_id) == (49406, 49407)
    assert len(tok.encoder) == len(tok.decoder) == tok.vocab_size


def test_byte_table():
    table = tokenizer.bytes_to_unicode()
    assert list(table) == [*range(33, 127), *range(161, 173), *range(174, 256), *range(0, 33), *range(127, 161), 173]
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)  # space: 33rd non-printable byte


@pytest.mark.parametrize("text,ids", KNOWN_IDS)
def test_known_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_ids_from_the_rules(tok):
    # one character: its byte's place in bytes_to_unicode, + 256 for the </w> variant
    for c in "!az~{":
        assert tok.encode(c) == [256 + ord(c) - ord("!")]
    assert tok.encode("7") == [256 + ord("7") - ord("!")]
    # a whole word that is a merge: 512 + the merge's line index (line 0 is the version comment)
    with gzip.open(tokenizer.default_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:tokenizer.CLIP_NUM_MERGES + 1]
    assert lines[0] == "i n" and tok.encoder["in"] == 512
    made = [line.replace(" ", "") for line in lines]
    for word in ["hello", "photo", "giraffe"]:
        assert tok.encode(word) == [512 + made.index(word + "</w>")]
    assert tok.decode([512]) == "in"  # no </w>: not the end of a word


def test_clean_text_fast_path_matches_full_cleanup():
    """Printable ASCII without '&' skips ftfy; check it equals CLIP's full recipe."""
    def full(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choices(" aZ'.,;:!?<|>/\\()[]{}#%$@*+-=_~`^\"09", k=rng.randint(0, 30)))
        assert tokenizer.clean_text(text) == full(text), text
    for text in ["a &amp; b", "a\tb\n", "caf\u00e9", "\x1b[1mbold", "&amp;amp;", "A  B"]:
        assert tokenizer.clean_text(text) == full(text), text


def test_roundtrip_lowercase_ascii(tok):
    rng = random.Random(0)
    for _ in range(200):
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 12)))
                 for _ in range(rng.randint(1, 15))]
        text = rng.choice([" ", "  ", "\t"]).join(words)
        assert tok.decode(tok.encode(text)) == " ".join(words) + " "


def test_decode_specials_and_invalid_utf8(tok):
    assert tok.decode([320, tok.eot_id, 321]) == "a <|endoftext|>b "
    assert tok.decode([tok.sot_id]) == "<|startoftext|>"
    assert tok.decode(np.array([320, 321])) == "a b "
    assert tok.decode([tok.encoder["\xc3"]]) == "\ufffd"  # a lone UTF-8 lead byte
    assert tok.decode([]) == ""


def test_bad_input_types(tok):
    for bad in [None, b"a cat", 5, ["a"]]:
        with pytest.raises(TypeError, match="expects a str"):
            tok.encode(bad)
    with pytest.raises(TypeError, match="decode"):
        tok.encode(b"x")
    with pytest.raises(TypeError, match="int ids"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="sequence of int ids"):
        tok.decode("320")
    for bad_id in [tok.vocab_size, -1, 10**9]:
        with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
            tok.decode([320, bad_id])


def test_cache_is_bounded(monkeypatch):
    tok = Tokenizer()
    monkeypatch.setattr(tokenizer, "CACHE_SIZE", 10)
    text = " ".join(f"word{c}x{d}" for c in "abcdefgh" for d in "qrstu")  # 40 distinct words
    ids = tok.encode(text)
    assert len(tok.cache) <= 10
    assert ids == tok.encode(text)  # evicted words re-encode identically


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CAPTION) == tok.encode(CAPTION) and clone.vocab_size == tok.vocab_size


# ----- BPE-dropout -------------------------------------------------------------------------------

CAPTION = "A photographer photographing extraordinary skyscrapers in Reykjavik, 2019 \u00e9t\u00e9 \U0001f600"


def test_dropout_zero_is_normal_and_cached():
    tok = Tokenizer()
    ids = tok.encode(CAPTION, dropout=0.0, rng=random.Random(0))
    assert "photographer" in tok.cache
    assert ids == tok.encode(CAPTION) == Tokenizer().encode(CAPTION)


def test_dropout_is_not_cached():
    tok = Tokenizer()
    tok.encode(CAPTION, dropout=0.1, rng=random.Random(0))
    assert tok.cache == {}


def test_dropout_varies_and_is_reproducible(tok):
    normal = tok.encode(CAPTION)
    runs = [tok.encode(CAPTION, dropout=0.1, rng=random.Random(seed)) for seed in range(20)]
    assert len({tuple(r) for r in runs}) > 5
    assert sum(r != normal for r in runs) > 10
    assert all(len(r) >= len(normal) for r in runs)  # dropout only ever splits more
    assert runs == [tok.encode(CAPTION, dropout=0.1, rng=random.Random(seed)) for seed in range(20)]
    rng = random.Random(0)  # one rng over many calls: each call draws anew
    assert len({tuple(tok.encode(CAPTION, dropout=0.1, rng=rng)) for _ in range(10)}) > 1


def test_dropout_ids_valid_and_decode_back(tok):
    rng = random.Random(1)
    texts = [CAPTION, "a <|endoftext|> b", "\u6771\u4eac\u30bf\u30ef\u30fc & caf\u00e9", "hello " * 50]
    for text in texts:
        expected = tok.decode(tok.encode(text))
        for p in [0.1, 0.5, 0.9]:
            ids = tok.encode(text, dropout=p, rng=rng)
            assert all(0 <= i < tok.vocab_size and tok.encoder[tok.decoder[i]] == i for i in ids)
            assert tok.decode(ids) == expected
    ids = tok.encode(CAPTION, dropout=1.0, rng=rng)  # every merge skipped: bytes only
    assert all(i < 512 for i in ids) and tok.decode(ids) == tok.decode(tok.encode(CAPTION))
    assert tok.encode("a <|endoftext|>", dropout=1.0, rng=rng) == [320, tok.eot_id]


def test_dropout_arguments(tok):
    with pytest.raises(TypeError, match="random.Random"):
        tok.encode("a cat", dropout=0.1)
    with pytest.raises(TypeError, match="random.Random"):
        tok.encode("a cat", dropout=0.1, rng=np.random.default_rng(0))
    for p in [-0.1, 1.5]:
        with pytest.raises(ValueError, match="dropout"):
            tok.encode("a cat", dropout=p, rng=random.Random(0))


# ----- merges files and the trainer --------------------------------------------------------------

TINY_CORPUS = [
    "A man riding a wave on top of a surfboard.",
    "A woman is riding a horse on the beach.",
    "Two dogs playing with a frisbee in the park.",
    "A cat sitting on top of a wooden bench.",
    "A plate of food with broccoli and rice.",
    "A red bus parked on the side of the street.",
    "People standing around a table with pizza.",
    "A giraffe standing next to a tall tree.",
] * 5 + ["caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \U0001f600 <|endoftext|>"]


def test_loader_any_length(tiny_bpe):
    tok = Tokenizer(tiny_bpe)
    assert tok.vocab_size == 512 + 40 + 2 and (tok.sot_id, tok.eot_id) == (552, 553)
    clip = Tokenizer()
    for text in ["in the middle", "A photo of a cat."]:
        ids = tok.encode(text)
        assert all(i < tok.vocab_size for i in ids) and tok.decode(ids) == clip.decode(clip.encode(text))
    assert tok.encode("a <|endoftext|>") == [320, 553]


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path / "missing.txt.gz"))
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="not a gzip"):
        Tokenizer(str(plain))
    cases = {
        "i n\nt h\n": "first line",
        "#version: 0.2\ni n\nt h e\n": ":3: expected two",
        "#version: 0.2\ni n\n\nt h\n": ":3: expected two",
        "#version: 0.2\ni n\nth e\n": ":3: .*no earlier line",
        "#version: 0.2\ni n\nt h\ni n\n": ":4: .*already a token",
        "#version: 0.2\ni nt\nin t\n": "no earlier line",
    }
    for n, (text, message) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            Tokenizer(write_gz(tmp_path / f"bad{n}.txt.gz", text))
    empty = Tokenizer(write_gz(tmp_path / "empty.txt.gz", "#version: 0.2\n"))
    assert empty.vocab_size == 514 and empty.encode("ab") == [64, 321]


def test_trainer_tiny_corpus(tmp_path):
    merges = tokenizer.train_bpe(TINY_CORPUS, vocab_size=600)
    assert len(merges) == 600 - 514
    path = str(tmp_path / "bpe.txt.gz")
    tokenizer.write_merges(path, merges)
    tok = Tokenizer(path)
    assert tok.vocab_size == 600 and tok.eot_id == 599
    for caption in TINY_CORPUS[:8]:
        ids = tok.encode(caption)
        assert max(ids) < 600 and len(ids) < len(caption)  # merges did compress the corpus
        assert tok.decode(ids) == tokenizer.Tokenizer().decode(tokenizer.Tokenizer().encode(caption))
    letters = "a man riding a horse on the beach"
    assert tok.decode(tok.encode(letters)) == letters + " "
    assert "<|endoftext|>" not in {a + b for a, b in merges}  # specials are not learned
    with open(path, "rb") as f:
        first = f.read()
    assert first[4:8] == bytes(4)  # gzip header mtime 0: reproducible bytes
    tokenizer.write_merges(path, tokenizer.train_bpe(TINY_CORPUS, vocab_size=600))
    with open(path, "rb") as f:
        assert f.read() == first  # training and writing are deterministic


def test_trainer_limits():
    with pytest.raises(ValueError, match=">= 514"):
        tokenizer.train_bpe(TINY_CORPUS, vocab_size=513)
    with pytest.raises(ValueError, match="at most vocab size"):
        tokenizer.train_bpe(["ab ab ab"], vocab_size=600)
    with pytest.raises(TypeError, match="str"):
        tokenizer.train_bpe(["a cat", None], vocab_size=600)
    assert tokenizer.train_bpe(["ab ab ab"], vocab_size=514) == []


def test_trainer_picks_most_frequent_pair():
    merges = tokenizer.train_bpe(["xyz xyz xyz ab"], vocab_size=516)
    assert merges == [("x", "y"), ("xy", "z</w>")]  # the tie is broken by string order
    # after merging (a, b), the count of (b, d</w>) drops from 6 to 1: (ab, d</w>) = 5 comes next
    corpus = ["abd"] * 5 + ["abz"] * 3 + ["bd"] + ["ee"] * 4
    assert tokenizer.train_bpe(corpus, vocab_size=516) == [("a", "b"), ("ab", "d</w>")]


def test_trainer_skips_special_text():
    merges = tokenizer.train_bpe(["<|endoftext|> cat <|startoftext|>"] * 5 + ["dog"], vocab_size=518)
    assert merges == [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>")]


# ----- command line ------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_encode():
    r = run_cli("encode", "A photo of a cat.")
    assert r.returncode == 0, r.stderr
    assert "cleaned: 'a photo of a cat.'" in r.stdout
    assert "photo</w>" in r.stdout and "[320, 1125, 539, 320, 2368, 269]" in r.stdout
    r = run_cli("encode", "--dropout", "1", "photo")
    assert r.returncode == 0 and "p h o t o</w>" in r.stdout


def test_cli_train_and_bpe_flag(tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(TINY_CORPUS) + "\n\n", encoding="utf-8")
    out = str(tmp_path / "bpe.txt.gz")
    r = run_cli("train", str(corpus), "--vocab-size", "560", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "vocab size 560" in r.stdout and Tokenizer(out).vocab_size == 560
    r = run_cli("encode", "--bpe", out, "a cat")
    assert r.returncode == 0, r.stderr
    ids = Tokenizer(out).encode("a cat")
    assert f"ids ({len(ids)}): {ids}" in r.stdout


def test_train_from_a_prepare_split_file_equals_its_captions_as_lines(tmp_path):
    records = [{"captions": list(TINY_CORPUS[i:i + 3])} for i in range(0, len(TINY_CORPUS), 3)]
    split = tmp_path / "train.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = tmp_path / "captions.txt"
    lines.write_text("".join(c + "\n" for r in records for c in r["captions"]), encoding="utf-8")
    assert [c for r in records for c in r["captions"]] == list(TINY_CORPUS)
    for src in (split, lines):
        r = run_cli("train", str(src), "--vocab-size", "560", "--out", str(tmp_path / f"{src.stem}.txt.gz"))
        assert r.returncode == 0, r.stderr
    assert gzip.decompress((tmp_path / "train.txt.gz").read_bytes()) == \
        gzip.decompress((tmp_path / "captions.txt.gz").read_bytes())
    split.write_text('{"captions": ["a cat"]}\n["a dog"]\n', encoding="utf-8")
    r = run_cli("train", str(split), "--vocab-size", "560", "--out", str(tmp_path / "bad.txt.gz"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "train.jsonl:2: not a prepare.py line" in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["encode", "   "], "empty"),
    (["encode", "--bpe", "/nonexistent/bpe.txt.gz", "a cat"], "No such file"),
    (["train", "/nonexistent/captions.txt", "--vocab-size", "600", "--out", "x.txt.gz"], "No such file"),
    (["train", __file__, "--vocab-size", "100", "--out", "x.txt.gz"], ">= 514"),
    (["encode", "--dropout", "2", "a cat"], "dropout"),
])
def test_cli_bad_input(args, message, capsys):
    code, out, err = cli(lambda: tokenizer.main(args), capsys)
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith(f"tokenizer.py {args[0]}: error: ")


def test_cli_bad_input_from_the_shell():
    r = run_cli("encode", "   ")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == "tokenizer.py encode: error: caption is empty after cleanup"


def test_cli_help(capsys):
    """The CLI is encode and train; the speed of encoding is bench.py's row 5 (tests/test_bench.py)."""
    code, out, _ = cli(lambda: tokenizer.main(["--help"]), capsys)
    assert code == 0 and all(cmd in out for cmd in ["encode", "train"])
    for cmd, flags in [("encode", ["--bpe", "--dropout", "--seed"]), ("train", ["--vocab-size", "--out"])]:
        code, out, _ = cli(lambda: tokenizer.main([cmd, "--help"]), capsys)
        assert code == 0 and all(flag in out for flag in flags)
    code, _, err = cli(lambda: tokenizer.main(["bench"]), capsys)
    assert code == 2 and "invalid choice" in err
