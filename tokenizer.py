"""
Byte-level BPE tokenizer for BiART captions, id-for-id compatible with OpenAI CLIP's
`simple_tokenizer.py` (https://github.com/openai/CLIP), plus BPE-dropout and a small trainer.

How a caption becomes ids:
1. clean: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs, lowercase.
2. pre-tokenize into words with CLIP's regex (letter runs, single digits, punctuation runs,
   English contractions). Literal "<|startoftext|>" / "<|endoftext|>" text in the caption
   matches the regex as one word and becomes the special id, exactly as in CLIP.
3. map each word's UTF-8 bytes to printable characters (bytes_to_unicode), mark its last
   character with "</w>", and apply the merges of the merges file, lowest rank first.
4. look the pieces up: ids 0..255 are the bytes, 256..511 the bytes + "</w>", then one id
   per merge in file order, then <|startoftext|>, <|endoftext|>.

With the default merges file (CLIP's, shipped in assets/ under its MIT licence) the vocabulary
has 49,408 ids; sot_id = 49406, eot_id = 49407. L-Verse feeds BiART 8192 + these ids (the
image codes come first); that offset belongs to the model, not here.

Command line (see `python tokenizer.py --help`):
    python tokenizer.py encode "A photo of a cat."       # show the cleanup, words, pieces, ids
    python tokenizer.py train captions.txt --vocab-size 4096 --out bpe.txt.gz
"""

import argparse
import gzip
import hashlib
import heapq
import html
import operator
import os
import random
import sys
from collections import Counter, defaultdict

import ftfy
import regex

import runtime

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
SPECIAL_TOKENS = (SOT, EOT)  # appended after the merges, in this order
END_OF_WORD = "</w>"  # suffix on a word's last piece; decode turns it into a space
NUM_BASE_TOKENS = 512  # 256 byte tokens + the same 256 with "</w>"
MIN_VOCAB_SIZE = NUM_BASE_TOKENS + len(SPECIAL_TOKENS)
# CLIP's file holds 262,144 merges but CLIP keeps only the first 48,894 (its slice
# merges[1:49152-256-2+1] skips the version line), so that 512 + 48,894 + 2 = 49,408 ids.
# We recognise that file by content and slice it the same way; any other file is used whole.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_BPE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"  # decompressed
CACHE_SIZE = 65536  # words whose BPE result is kept (COCO's captions use ~25k distinct words)

# CLIP's pre-tokenizer: specials, contractions, letter runs, one digit, runs of other symbols.
# Kept as is, IGNORECASE included: it makes "'\u017f" (long s) match 's, as in CLIP.
PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")  # the `regex` module's \s, as CLIP uses (differs from str.split)


def default_bpe_path() -> str:
    """CLIP's merges file, shipped beside this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> a printable character standing for it (GPT-2/CLIP's table). Printable
    Latin-1 bytes stand for themselves; the 68 others (controls, space, soft hyphen...) get
    chr(256), chr(257), ... in byte order, so no piece ever contains whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # the dict's order is the id order: printable bytes first, then the others
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """CLIP's cleanup: ftfy, double html.unescape, strip, collapse whitespace, lowercase."""
    if text.isascii() and text.isprintable() and "&" not in text:
        # Fast path (~5x faster encode): ftfy and html.unescape leave printable ASCII without '&'
        # unchanged, and its only whitespace is ' '. Both test files check this.
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITESPACE.sub(" ", text).strip().lower()


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every non-overlapping occurrence of `pair`, scanning left to right."""
    first, second = pair
    out, i, n = [], 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def word_symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    """A pre-tokenized word -> its byte characters, the last one marked with </w>."""
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return chars


def read_merges(path: str) -> list[tuple[str, str]]:
    """Read a merges file: gzip, a '#version' comment line, then one 'left right' merge per line."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        lines = raw.decode("utf-8").split("\n")
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a gzipped UTF-8 merges file ({e})") from None
    if "#version" not in lines[0]:
        raise ValueError(f"{path}: first line should be a '#version' comment, got {lines[0][:60]!r}")
    body = lines[1:]
    if hashlib.sha256(raw).hexdigest() == CLIP_BPE_SHA256:
        body = body[:CLIP_NUM_MERGES]
    while body and not body[-1].strip():  # the trailing newline
        body.pop()
    merges = []
    for lineno, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected two space-separated pieces, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def write_merges(path: str, merges: list[tuple[str, str]]) -> None:
    """Write merges in CLIP's format; mtime=0 makes the gzip bytes reproducible."""
    text = f"#version: 0.2 - trained by tokenizer.py, vocab_size={MIN_VOCAB_SIZE + len(merges)}\n"
    text += "".join(f"{a} {b}\n" for a, b in merges)
    def write(raw):
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(text.encode("utf-8"))
    runtime.write_atomic(path, write)


def train_bpe(captions, vocab_size: int) -> list[tuple[str, str]]:
    """Learn merges from captions (an iterable of str) until the vocabulary has `vocab_size` ids.

    Classic BPE (Sennrich et al. 2016) on CLIP's cleaned, pre-tokenized, byte-level words: repeatedly
    merge the most frequent adjacent pair (ties: the smallest pair in string order). A pair whose
    merged string is already a token is never merged, so every merge adds exactly one new id.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (512 byte tokens + 2 specials), got {vocab_size}")
    word_counts = Counter()
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"captions must be str, got {type(caption).__name__}")
        word_counts.update(w for w in PRETOKENIZE.findall(clean_text(caption)) if w not in SPECIAL_TOKENS)
    byte_encoder = bytes_to_unicode()
    words = [word_symbols(w, byte_encoder) for w in word_counts]  # corpus order: deterministic
    freqs = list(word_counts.values())

    pair_counts = Counter()
    where = defaultdict(set)  # pair -> indices of the words that (may) contain it
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]  # stale entries skipped on pop
    heapq.heapify(heap)
    tokens = set(byte_encoder.values()) | {c + END_OF_WORD for c in byte_encoder.values()}

    merges = []
    while len(merges) < vocab_size - MIN_VOCAB_SIZE:
        if not heap:
            raise ValueError(f"the corpus supports at most vocab size {MIN_VOCAB_SIZE + len(merges)} "
                             f"(no pairs left to merge); asked for {vocab_size}")
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count or pair[0] + pair[1] in tokens:
            continue
        merges.append(pair)
        tokens.add(pair[0] + pair[1])
        touched = set()
        for i in sorted(where.pop(pair)):
            old, new = words[i], merge_pair(words[i], pair)
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[i]
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            words[i] = new
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return merges


class Tokenizer:
    """CLIP BPE. encode/decode match CLIP's SimpleTokenizer id for id on the default file."""

    def __init__(self, bpe_path: str | None = None):
        self.bpe_path = default_bpe_path() if bpe_path is None else bpe_path
        merges = read_merges(self.bpe_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [c + END_OF_WORD for c in vocab]
        # Every piece must be a token made earlier, and every merge must make a new one, so that
        # ids are dense, ranks are unique, and any partial merge sequence (BPE-dropout) is valid.
        encoder = {piece: i for i, piece in enumerate(vocab)}
        for lineno, (a, b) in enumerate(merges, start=2):
            if a not in encoder or b not in encoder:
                raise ValueError(f"{self.bpe_path}:{lineno}: merge {a!r} {b!r} uses a piece no earlier line makes")
            if a + b in encoder or a + b in SPECIAL_TOKENS:
                raise ValueError(f"{self.bpe_path}:{lineno}: merge {a!r} {b!r} makes {a + b!r}, already a token")
            encoder[a + b] = len(vocab)
            vocab.append(a + b)
        for special in SPECIAL_TOKENS:
            encoder[special] = len(vocab)
            vocab.append(special)
        self.encoder = encoder  # piece -> id
        self.decoder = vocab  # id -> piece
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = len(vocab)  # 49,408 for CLIP's file
        self.sot_id = encoder[SOT]
        self.eot_id = encoder[EOT]
        self.cache = {}  # word -> tuple of ids, insertion order = eviction order, at most CACHE_SIZE

    def bpe(self, word: str, dropout: float = 0.0, rng: random.Random | None = None) -> list[str]:
        """A pre-tokenized word -> its BPE pieces. Each step applies the lowest-rank merge present,
        at all its occurrences. BPE-dropout (Provilkov et al. 2020, Alg. 1): at each step every
        applicable merge is skipped with probability `dropout` (one rng.random() per distinct pair,
        in word order); when all are skipped, the word stays split as it is."""
        symbols = word_symbols(word, self.byte_encoder)
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in dict.fromkeys(zip(symbols, symbols[1:])):  # distinct pairs in word order
                rank = self.bpe_ranks.get(pair)
                if rank is None or (dropout and rng.random() < dropout):
                    continue
                if best is None or rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            symbols = merge_pair(symbols, best)
        return symbols

    def word_ids(self, word: str) -> tuple[int, ...]:
        """ids of one pre-tokenized word, through the bounded cache."""
        ids = self.cache.get(word)
        if ids is None:
            ids = tuple(self.encoder[piece] for piece in self.bpe(word))
            if len(self.cache) >= CACHE_SIZE:
                del self.cache[next(iter(self.cache))]  # evict the oldest entry
            self.cache[word] = ids
        return ids

    def encode(self, text: str, dropout: float = 0.0, rng: random.Random | None = None) -> list[int]:
        """Text -> ids, no start/end tokens added. dropout > 0 needs rng, a random.Random, which
        makes runs reproducible; dropout == 0 is exactly the normal (cached) encoding."""
        if not isinstance(text, str):
            hint = " (decode bytes first, e.g. text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
            raise TypeError(f"encode expects a str, got {type(text).__name__}{hint}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if dropout and not isinstance(rng, random.Random):
            raise TypeError(f"dropout > 0 needs rng=random.Random(seed), got {type(rng).__name__}")
        ids = []
        for word in PRETOKENIZE.findall(clean_text(text)):
            if word in SPECIAL_TOKENS:
                ids.append(self.encoder[word])
            elif dropout:  # never cached: each call draws a new segmentation
                ids.extend(self.encoder[piece] for piece in self.bpe(word, dropout, rng))
            else:
                ids.extend(self.word_ids(word))
        return ids

    def decode(self, ids) -> str:
        """ids -> text, as CLIP: each word ends with a space; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
        pieces = []
        for i in ids:
            try:
                i = operator.index(i)
            except TypeError:
                raise TypeError(f"decode expects int ids, got {i!r} ({type(i).__name__})") from None
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
            pieces.append(self.decoder[i])
        data = bytes(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")



# -----------------------------------------------------------------------------
# command line: encode (show the steps), train

def show_encoding(tok: Tokenizer, text: str, dropout: float, seed: int) -> None:
    """Print each step of encode, like minGPT's encode_and_show_work."""
    cleaned = clean_text(text)
    words = PRETOKENIZE.findall(cleaned)
    if not words:
        raise ValueError("caption is empty after cleanup")
    rng = random.Random(seed)
    print(f"cleaned: {cleaned!r}")
    print(f"words:   {words}")
    ids = []
    for word in words:
        pieces = [word] if word in SPECIAL_TOKENS else tok.bpe(word, dropout, rng)
        word_ids = [tok.encoder[p] for p in pieces]
        ids += word_ids
        print(f"  {word!r:24} -> {' '.join(pieces):40} {word_ids}")
    print(f"ids ({len(ids)}): {ids}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="tokenizer.py", description="CLIP BPE tokenizer for L-Verse's BiART: inspect, train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               '  python tokenizer.py encode "A photo of a cat."\n'
               "  python tokenizer.py encode --dropout 0.1 --seed 3 \"A photo of a cat.\"\n"
               "  python tokenizer.py train captions.txt --vocab-size 4096 --out bpe.txt.gz\n"
               '  python tokenizer.py encode --bpe bpe.txt.gz "A photo of a cat."\n'
               "run `python tokenizer.py COMMAND --help` for the flags of each command; "
               "bad input exits with code 2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{encode,train}")
    bpe_flag = argparse.ArgumentParser(add_help=False)
    bpe_flag.add_argument("--bpe", metavar="PATH", default=None,
                          help="merges file (.txt.gz) to use instead of CLIP's (assets/bpe_simple_vocab_16e6.txt.gz)")
    p = sub.add_parser("encode", parents=[bpe_flag], help="show how a caption is cleaned, split, merged and numbered",
                       description="Print the cleaned text, the pre-tokenized words, each word's BPE pieces and ids.")
    p.add_argument("text", help="the caption to encode (quote it)")
    p.add_argument("--dropout", type=float, default=0.0, help="BPE-dropout probability (default 0: normal encoding)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random.Random used by --dropout (default 0)")
    p = sub.add_parser("train", help="learn a merges file from a text file with one caption per line",
                       description="Learn BPE merges with CLIP's cleanup, pre-tokenizer and byte alphabet; "
                                   "write them gzipped in CLIP's format (a version line, one merge per line).")
    p.add_argument("captions", help="UTF-8 text file, one caption per line (blank lines are skipped), a "
                                    "prepare.py split file (train.jsonl: every caption of every image), or a "
                                    "prepare.py folder (its train split, every shard's part)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"ids in the resulting vocabulary, >= {MIN_VOCAB_SIZE} (512 byte tokens + 2 specials)")
    p.add_argument("--out", required=True, help="output path, e.g. bpe.txt.gz")
    args = parser.parse_args(argv)

    try:
        if args.command == "encode":
            if not 0.0 <= args.dropout <= 1.0:
                raise ValueError(f"--dropout must be in [0, 1], got {args.dropout}")
            show_encoding(Tokenizer(args.bpe), args.text, args.dropout, args.seed)
        elif args.command == "train":
            if args.vocab_size < MIN_VOCAB_SIZE:
                raise ValueError(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (512 byte tokens + 2 specials), "
                                 f"got {args.vocab_size}")
            if os.path.isdir(args.captions) or args.captions.endswith(".jsonl"):  # prepare.py's captions
                import data  # its readers of that format; imported here, so the library stays light
                paths = [os.path.join(args.captions, stem + ".jsonl") for stem in data.split_parts(args.captions, "train")
                         ] if os.path.isdir(args.captions) else [args.captions]
                captions = [c for caps in data.CaptionLines(paths) for c in caps]
            else:
                with open(args.captions, encoding="utf-8") as f:
                    captions = [line for line in f.read().split("\n") if line.strip()]
            if not captions:
                raise ValueError(f"{args.captions} holds no captions")
            merges = train_bpe(captions, args.vocab_size)
            write_merges(args.out, merges)
            print(f"{len(captions)} captions -> {len(merges)} merges, vocab size "
                  f"{Tokenizer(args.out).vocab_size}, written to {args.out}")
    except (OSError, ValueError) as e:  # one line on stderr, no traceback
        print(f"tokenizer.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
