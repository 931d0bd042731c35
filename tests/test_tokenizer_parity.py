"""Parity with OpenAI CLIP's simple_tokenizer.py: same ids and same decoded text on hard strings.

The reference module is loaded by file path only (the `clip` package's __init__ imports torch and
torchvision). It is found via the CLIP_REF_TOKENIZER environment variable (a path to
simple_tokenizer.py), or else in an installed `clip` package, located without importing it:
    pip install --no-deps clip-anytorch==2.6.0
Without either, these tests are skipped.
"""

import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (finds and loads the reference: bench.reference_path, bench.load_reference)
import tokenizer  # noqa: E402

SKIP_REASON = ("OpenAI CLIP's simple_tokenizer.py not found: set CLIP_REF_TOKENIZER=/path/to/simple_tokenizer.py "
               "or run `pip install --no-deps clip-anytorch==2.6.0`")


@pytest.fixture(scope="module")
def pair():
    path = bench.reference_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    return tokenizer.Tokenizer(), bench.load_reference(path)


HARD = [
    "", " ", "\t\n\r", "a", "A photo of a cat.", "  lots   of\t\twhitespace \n here  ",
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "a<|endoftext|>b<|startoftext|>c", "<|ENDOFTEXT|>",
    "<|endoftext|", "<<|endoftext|>>", "<|end of text|>", "</w>", "a</w>b", "<|startoftext|>a cat<|endoftext|>",
    "&amp;", "&amp;amp;", "&amp;amp;amp;lt;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;s", "&#x1F600;", "&#128512;", "&#0;",
    "&#xD800;", "&#1114112;", "&#150;", "&nbsp;", "&amp", "&lt", "&notit;", "&;", "&#;", "&hellip;", "&zwj;", "&#10;",
    "caf\u00c3\u00a9", "\u00c3\u00a9t\u00c3\u00a9", "\u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d", "Ã¢â‚¬â„¢",
    "\u00c3\u0192\u00c2\u00a9", "sch\u00c3\u00b6n", "\xe2\x80\x99", "\u0440\u045f\u0452\u0402",
    "\ud800", "a\udc00b", "\ud83d\ude00", "\x00", "\x01\x02\x03", "\x7f\x80\x81\x85\x9f", "\x1b[31mred\x1b[0m",
    "\x1c\x1d\x1e\x1f", "a\x0bb\x0cc", "\u200b", "\u200d", "\ufeffbom", "\u2028line\u2029para", "\u3000\u00a0\u1680",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u3067\u5199\u771f\u3092\u64ae\u308b", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u05e2\u05d1\u05e8\u05d9\u05ea", "\u0939\u093f\u0928\u094d\u0926\u0940",
    "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22", "\u0395\u039b\u039b\u0397\u039d\u0399\u039a\u0391", "\u0390\u03b0",
    "\U0001f600\U0001f601", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\u2764\ufe0f", "\U0001f44d\U0001f3fd", "\U0001f1fa\U0001f1f8", "\U0001d573\U0001d58a\U0001d594",
    "\U00020000\U0002a6d6", "\U000e0041", "\U0010ffff", "\ue000", "\uffff\ufffe", "\ufffd",
    "it's", "IT'S", "'S", "'s's", "''", "'''", "we'LL", "O'Neil's", "\u2019s", "\u2018quoted\u2019", "\u201cdq\u201d",
    "\u017f", "'\u017f", "\u0130stanbul", "\u01c5emal", "stra\u00dfe", "\u1e9e", "\u01f0", "\ufb01sh", "\ufb03",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48", "a\u0301", "e\u0308\u0301", "\u212b", "\u212a",
    "1,000.50", "\u00bd \u2153", "\u0663\u0664", "\u2460\u2461", "x\u00adx", "\u2014\u2013-", "...!!??",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "\U0001f600" * 40, "\u6771" * 100,
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
]
BLOCKS = [(0x0, 0x7f), (0x80, 0xff), (0x100, 0x2ff), (0x300, 0x36f), (0x370, 0x52f), (0x590, 0x6ff), (0x900, 0xe7f),
          (0x1100, 0x11ff), (0x1e00, 0x1fff), (0x2000, 0x2bff), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3),
          (0xd800, 0xdfff), (0xe000, 0xf8ff), (0xfb00, 0xffff), (0x1d400, 0x1d7ff), (0x1f000, 0x1faff),
          (0x20000, 0x2a6df), (0xe0000, 0xe007f), (0x10fff0, 0x10ffff)]
WHITESPACE = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2000", "\u200b", "\u2028", "\u3000"]


def generated_strings(count: int, seed: int = 0) -> list[str]:
    """Random hard strings: unicode blocks, mojibake, entities, special text, ASCII, long inputs."""
    rng = random.Random(seed)
    parts = HARD[1:]

    def piece():
        r = rng.random()
        if r < 0.3:
            return "".join(chr(rng.randint(*rng.choice(BLOCKS))) for _ in range(rng.randint(1, 8)))
        if r < 0.5:
            return rng.choice(parts)
        if r < 0.6:  # mojibake: UTF-8 bytes read in a legacy code page
            text = rng.choice(parts).encode("utf-8", "surrogatepass")
            return text.decode(rng.choice(["latin-1", "cp1252", "cp437", "mac_roman"]), errors="replace")
        if r < 0.7:
            return "".join(rng.choices(WHITESPACE, k=rng.randint(1, 3)))
        return "".join(chr(rng.randint(0x20, 0x7e)) for _ in range(rng.randint(1, 8)))

    out = []
    for i in range(count):
        if i % 50 == 0:  # long inputs, around a thousand tokens
            out.append(" ".join(piece() for _ in range(rng.randint(150, 300))))
        elif i % 5 == 0:  # printable ASCII: tokenizer.clean_text's fast path
            out.append("".join(chr(rng.randint(0x20, 0x7e)) for _ in range(rng.randint(0, 60))))
        else:
            out.append(rng.choice(["", " ", " ", rng.choice(WHITESPACE)]).join(piece() for _ in range(rng.randint(1, 10))))
    return out


def test_hand_picked_strings(pair):
    ours, ref = pair
    for text in HARD:
        expected = ref.encode(text)
        assert ours.encode(text) == expected, ascii(text)
        assert ours.decode(expected) == ref.decode(expected), ascii(text)


def test_generated_strings(pair):
    ours, ref = pair
    texts = generated_strings(400)
    assert max(len(ref.encode(t)) for t in texts) >= 1000
    for text in texts:
        expected = ref.encode(text)
        assert ours.encode(text) == expected, ascii(text)
        assert ours.decode(expected) == ref.decode(expected), ascii(text)


def test_decode_random_ids(pair):
    ours, ref = pair
    rng = random.Random(0)
    for _ in range(300):  # byte ids often form invalid UTF-8, which both replace with U+FFFD
        ids = [rng.randrange(ours.vocab_size) if rng.random() < 0.5 else rng.randrange(512)
               for _ in range(rng.randint(0, 40))]
        ids += rng.choice([[], [ours.sot_id], [ours.eot_id]])
        assert ours.decode(ids) == ref.decode(ids), ids


def test_same_vocabulary(pair):
    ours, ref = pair
    assert ours.encoder == ref.encoder
    assert ours.bpe_ranks == ref.bpe_ranks
    assert list(tokenizer.bytes_to_unicode().items()) == list(ref.byte_encoder.items())
