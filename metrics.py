"""
The metrics of L-Verse's evaluation (paper section 4), as a library: each function computes
numbers from captions, images, feature arrays or models; nothing here parses flags or prints
(load_inception reads the one weights file it is given). evaluate.py runs them as subcommands.

1. Captions (Table 2), the COCO caption toolkit's definitions (pycocoevalcap, Chen et al. 2015,
   "Microsoft COCO Captions: Data Collection and Evaluation Server") and its numerical
   conventions: `ptb_tokenize(_lines)` emulates its Stanford PTBTokenizer step; `bleu` (Papineni
   et al. 2002, corpus BLEU-1..4, closest reference length), `rouge_l` (Lin 2004, ROUGE-L with
   beta 1.2), `cider_d` (Vedantam et al. 2015, CIDEr-D: sigma 6, clipping, x10);
   `caption_metrics` gives the whole table, METEOR (1.5, Denkowski & Lavie 2014) and SPICE
   (Anderson et al. 2016) through pycocoevalcap's Java programs when they can run
   (`java_metric_status`), absent (None) otherwise.
2. Images: `ssim` (Wang et al. 2004, the 11x11 Gaussian window of pytorch-msssim and
   torchmetrics) and `blur`, the Gaussian blur of the paper's FID-k (Table 3).
3. FID (Heusel et al. 2017) with pytorch-fid's conventions: `InceptionV3FID`, the FID
   Inception-v3 (pool3, 2048-d) that loads pytorch-fid's weights file (`load_inception`),
   `gaussian_stats`, `frechet_distance` and `fid_from_features` in float64 without scipy.
4. The Fashion-MNIST judge: `FashionClassifier`, a small CNN trained on the real training images
   only (`train_fashion_classifier`), `classify`, and `fashion_image_metrics`: class accuracy,
   the Frechet distance in the CNN's penultimate features and a diversity figure
   (`mean_pairwise_distance`) of drawn images against the real test images.
"""

import bisect
import math
import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import data
import runtime

# -----------------------------------------------------------------------------------------
# captions: PTB tokenization as the COCO toolkit does it
#
# The toolkit (pycocoevalcap/tokenizer/ptbtokenizer.py) writes all captions of a set (every
# reference of every image in order, or every candidate) one per line to a file, runs Stanford
# CoreNLP 3.4.1's PTBTokenizer with -preserveLines -lowerCase on it and drops the tokens in its
# punctuation list. ptb_tokenize_lines emulates that on ordinary captions; what it does was
# measured against that jar (the lists below come from probing it). Known differences, all on
# text unlike captions: SGML-like tags ("<b>"), a few HTML entities, ' and unicode quotes in
# the middle of unusual words, and 6+-letter abbreviations beyond the ones listed.

# the toolkit's punctuation list, verbatim. It is applied AFTER lowercasing, so brackets, which
# the tokenizer writes as -LRB- -RRB- -LSB- ... and lowercases to -lrb- ..., are never removed:
# they count as words in every metric, and so they do here.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# words that keep their period ("st." "dr." "etc."), any case; found by running the jar on every
# word of 2 to 5 letters and on longer known abbreviations. Single letters ("a.") and dotted
# acronyms ("u.s.", "e.g.") keep theirs too.
PTB_ABBREVIATIONS = frozenset("""
al cf co ct dr ft ga jr ky lt md mo mr ms mt ph rd rt sq sr st va vs vt wm adj adm adv ala apr aug
ave bhd cie col cos cpl dak dec det drs ens esq est etc ext feb fla fri gen gov hon inc ind jan jos
jul jun kan ltd maj mar mfg mme mon mrs mtg neb nev nov oct pfc plc pte pty pvt rep rev sen sep seq
sfc sgt spc ste sys tel thu tue wed wis wyo alex ariz assn asst atty bldg blvd brig bros capt cmdr
colo conn corp dept elec govs insp intl invt kans mich minn mlle mont msgr natl okla penn ppte ppty
pres prof ptes ptys reps sens sept supt tenn tues univ wisc assoc attys calif comdr lieut pptes
pptys profs supts thurs treas bancorp messrs""".split())
# a single letter loses its period when the next word (possibly on the NEXT caption line: the
# jar sees the whole file) is one of these, capitalised, followed by a space or the end
_SENTENCE_STARTS = frozenset("""
the a an in at our it this you as one we that now so more here but what about he when some if they
her their last after there other she these many while then since such yet once earlier according
however""".split())
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}  # can|not ...
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CHAR_MAP = str.maketrans({  # the tokenizer's normalisations of unicode punctuation, currency, fractions
    "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"', "\u2018": "`", "\u2019": "'",
    "\u2039": "`", "\u203a": "'", "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ",
    "\u20ac": "$", "\u00a3": "#", "\u00a2": " cents ", "\u00bd": " 1/2 ", "\u00bc": " 1/4 ",
    "\u00be": " 3/4 ", "\u2153": " 1/3 ", "\u2154": " 2/3 "})
# inside a word: - / ' before a word character, . between digits or between letters, , and :
# between digits (1,000 2:30), & between capitals (AT&T)
_JOIN = (r"(?:[-/'](?=\w)|(?<=\d)\.(?=\d)|(?<=[^\W\d_])\.(?=[^\W\d_])|(?<=\d)[,:](?=\d)"
         r"|(?<=[A-Z])&(?=[A-Z]))")
_TOKEN = re.compile(
    r"(?P<url>https?://[^\s\"'()\[\]{}<>]*[^\s\"'()\[\]{}<>.,;:!?])"
    r"|(?P<bang>[!?]+)"                      # '!!' and '?!' are one token (and not in the list)
    r"|(?P<dots>\.\.\.+)"
    r"|(?P<dashes>--+)"
    r"|(?P<lead>(?i:'(?:\d\d(?:s|(?!\d))|em|cause|till?|t(?=is|was))|'(?:n'?|s|m|d|ll|re|ve)(?!\w)))"
    r"|(?P<email>\w[\w.+-]*@\w[\w-]*(?:\.\w[\w-]*)*)"
    r"|(?P<tag>[#@][^\W\d_]+)"
    r"|(?P<number>-\d+(?:[.,:]\d+)*)"       # a leading minus takes the number only: -3-d -> -3 - d
    r"|(?P<word>(?:\.(?=\d))?\w+(?:" + _JOIN + r"\w+)*)"
    r"|(?P<other>\S)")
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_N_JOIN = re.compile(r"(?i)^(?:(y')(\w+)|(\w+)('n')(\w+)|(\w+)('n))$")  # y'all rock'n'roll more'n
_UNIT = re.compile(r"^(\d[\d,.:]*[.,:]\d+)([^\W\d_]\w*)$")            # 3.5mm -> 3.5 mm
_DOTTED = re.compile(r"^[^\W\d_](?:\.[^\W\d_])+$")                      # u.s  e.g  a.k.a
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)(?=\s|$)")
_DIGIT_NEXT = re.compile(r" ?\d")


def _apostrophe_joins(before: str, after: str) -> bool:
    """Whether a ' between two parts stays inside one word: after one letter other than i, y
    (o'clock, l'oreal, d'ye) or between vowels (ma'am, qu'il); elsewhere it is a quote."""
    letters = re.search(r"[^\W\d_]*$", before).group()
    return (len(letters) == 1 and letters not in "iIyY" and after[:2].isalpha()) or \
        (letters[-1:] in tuple("aeiouyAEIOUY") and after[:1] != "" and (after[0] in "aeiouAEIOU" or after[0].isupper()))


def _split_word(tok: str) -> list:
    """A word token -> its PTB tokens: contractions split off the end (do n't, it 's, they 'd 've),
    can|not-style words, and a ' that does not belong inside a word split out as a quote."""
    low = tok.lower()
    if low in _SPLIT_WORDS:
        return [tok[:_SPLIT_WORDS[low]], tok[_SPLIT_WORDS[low]:]]
    tail = []
    while (c := _CONTRACTION.match(tok)) is not None:
        stem, suffix = c.groups()
        if suffix.lower() == "n't" and not (stem[-1].isalpha() and stem[-1] not in "nN"):
            tail[:0] = ["'", tok[-1]]  # "inn't", "5n't": no n't split; the ' becomes a quote
            tok = tok[:-2]
            continue
        tail.insert(0, suffix)
        tok = stem
    n = _N_JOIN.match(tok)
    if n:
        return [g for g in n.groups() if g] + tail
    head, *pieces = tok.split("'")
    out = []
    for piece in pieces:
        if _apostrophe_joins(head, piece):
            head += "'" + piece
        else:
            out += [head, "'"]
            head = piece
    tok = head
    u = _UNIT.match(tok)
    return out + ([u.group(1), u.group(2)] if u else [tok]) + tail


def ptb_split_lines(captions: list) -> list:
    """Captions -> per caption its lowercased PTB tokens, punctuation included, as the jar
    writes them for the lines of one file (a caption's last period can depend on the next line)."""
    lines = ["".join(ch for ch in c.replace("\n", " ").replace("&amp;", "&") if ord(ch) <= 0xFFFF)
             .translate(_CHAR_MAP) for c in captions]  # characters beyond U+FFFF are dropped, as the jar does
    text = "\n".join(lines)
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
    out = [[] for _ in lines]
    pos = 0
    while (m := _TOKEN.search(text, pos)) is not None:
        kind, tok = m.lastgroup, m.group()
        row = out[bisect.bisect_right(starts, m.start()) - 1]
        pos = m.end()
        if kind == "word":
            single = len(tok) == 1 and tok.isalpha()
            if single:
                nxt = _NEXT_WORD.match(text, pos + 1)
                single = not (nxt and nxt.group(1)[0].isupper() and nxt.group(1).lower() in _SENTENCE_STARTS)
            parts = _split_word(tok)
            if text[pos:pos + 1] == "." and (single or tok.lower() in PTB_ABBREVIATIONS or _DOTTED.match(tok)
                                             or (len(parts) == 1 and text[pos + 1:pos + 2] in (",", ";", ":"))
                                             or (tok.lower() in ("no", "nos") and _DIGIT_NEXT.match(text, pos + 1))):
                row.append(tok + ".")  # the word keeps its period
                pos += 1
            else:
                row += parts
        elif kind == "dots":
            row.append("...")
        elif kind == "dashes":
            row.append("--")
        elif kind == "other":
            row.append(_BRACKETS.get(tok, "''" if tok == '"' else tok))
        else:
            row.append(tok)
    return [[t.lower() for t in row] for row in out]


def ptb_tokenize_lines(captions: list) -> list:
    """What the toolkit's PTBTokenizer gives for these captions tokenized together, in order:
    per caption its list of tokens (lowercased, punctuation removed)."""
    return [[t for t in row if t not in PTB_PUNCTUATION] for row in ptb_split_lines(captions)]


def ptb_tokenize(text: str) -> list:
    """One caption -> its tokens, e.g. "A dog's toy, isn't it?" -> [a, dog, 's, toy, is, n't, it]."""
    return ptb_tokenize_lines([text])[0]


# -----------------------------------------------------------------------------------------
# captions: BLEU, ROUGE-L, CIDEr-D (pycocoevalcap's definitions, its numerical conventions)

def _ngram_counts(tokens: list, n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of a token list."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(candidates: list, references: list, n: int = 4) -> list:
    """Corpus BLEU-1..n. candidates: token lists; references: per candidate a list of token lists.
    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; one brevity
    penalty from the summed candidate lengths and the summed 'closest' reference lengths (per
    candidate the reference length nearest its own, the shorter one on a tie). The toolkit's
    guards 1e-15 (numerator) and 1e-9 (denominator) are kept, so zero counts score as there."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        max_ref = Counter()
        for r in refs:
            max_ref |= _ngram_counts(r, n)  # union of Counters = per n-gram maximum over the references
        for gram, count in _ngram_counts(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    ratio = (cand_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, precision = [], 1.0
    for k in range(n):
        precision *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(precision ** (1 / (k + 1)) * brevity)
    return scores


def _lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: list, references: list, beta: float = 1.2) -> float:
    """Corpus ROUGE-L: the mean over candidates of the LCS F-measure (1 + b^2) P R / (R + b^2 P)
    of P = the best LCS precision and R = the best LCS recall over its references (each maximised
    on its own, as the toolkit does). The toolkit splits a caption on ' ', so an empty caption
    is one empty token; so it is here."""
    scores = []
    for cand, refs in zip(candidates, references):
        cand = cand or [""]
        refs = [r or [""] for r in refs]
        lcs = [_lcs(r, cand) for r in refs]
        p = max(m / len(cand) for m in lcs)
        r = max(m / len(ref) for m, ref in zip(lcs, refs))
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def cider_d(candidates: list, references: list, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015, as in the toolkit), on the x10 scale. Per n-gram
    order, tf-idf vectors with document frequencies counted over the references of all
    candidates (idf = log(#candidates) - log(max(1, df))); the similarity clips the candidate's
    weights at the reference's (sum of min(c, r) * r / (|c| |r|)), is multiplied by the length
    penalty exp(-delta^2 / (2 sigma^2)) and averaged over the references, then over n = 1..4,
    times 10; the corpus score is the mean over candidates. The toolkit measures a caption's
    length by its number of bigrams, and so this does."""
    cand_counts = [_ngram_counts(c, n) for c in candidates]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_count = math.log(len(candidates))

    def tfidf(counts):
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for gram, tf in counts.items():
            w = tf * (log_count - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cc, refs in zip(cand_counts, ref_counts):
        vec_c, norm_c, len_c = tfidf(cc)
        total = np.zeros(n)
        for rc in refs:
            vec_r, norm_r, len_r = tfidf(rc)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                sim = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    sim /= norm_c[k] * norm_r[k]
                total[k] += sim * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores))


# -----------------------------------------------------------------------------------------
# captions: METEOR and SPICE (Java programs shipped with pycocoevalcap), and the whole table

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def java_metric_status() -> dict:
    """{'METEOR': None, 'SPICE': None} when both can run, else the reason each is absent."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
        import pycocoevalcap.spice.spice as spice
    except ImportError:
        why = "needs the pycocoevalcap package (pip install pycocoevalcap) and Java"
        return {"METEOR": why, "SPICE": why}
    if shutil.which("java") is None:
        return {"METEOR": "needs java on PATH", "SPICE": "needs java on PATH"}
    lib = os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")
    # SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use; we never
    # start a download: without the jars SPICE is absent
    have = all(os.path.isfile(os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar")) for s in ("", "-models"))
    return {"METEOR": None, "SPICE": None if have else
            f"needs Stanford CoreNLP 3.6.0 in {lib} (pycocoevalcap fetches it once with network access: "
            "python -c 'from pycocoevalcap.spice.spice import Spice; Spice()')"}


def _java_metric(name: str, gts: dict, res: dict) -> float:
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor as Scorer
    else:
        from pycocoevalcap.spice.spice import Spice as Scorer
    try:
        scorer = Scorer()
        score, _ = scorer.compute_score(gts, res)
        del scorer  # Meteor stops its java process when collected
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise OSError(f"{name} (pycocoevalcap, java) failed: {str(e)[:200]}; "
                      "--no-java skips METEOR and SPICE") from None
    return float(score)


def caption_metrics(candidates: dict, references: dict, java: bool = True) -> dict:
    """{id: candidate caption}, {id: [reference captions]} -> the toolkit's corpus scores as
    fractions: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (CIDEr-D), SPICE. Scored over the ids of
    `candidates` in their order (references of other ids are ignored; CIDEr's document
    frequencies come from the scored ids only, as in the toolkit). METEOR and SPICE are None
    when java=False or when they cannot run (see java_metric_status)."""
    ids = list(candidates)
    if not ids:
        raise ValueError("no candidate captions to score")
    for i in ids:
        if not isinstance(candidates[i], str):
            raise ValueError(f"candidate {i!r}: expected one caption string, got {type(candidates[i]).__name__}")
        refs = references.get(i)
        if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"candidate {i!r}: no list of reference captions for this id")
    flat = ptb_tokenize_lines([r for i in ids for r in references[i]])
    cands = ptb_tokenize_lines([candidates[i] for i in ids])
    refs, k = [], 0
    for i in ids:
        refs.append(flat[k:k + len(references[i])])
        k += len(references[i])
    out = dict.fromkeys(CAPTION_METRICS)
    out.update(zip(CAPTION_METRICS[:4], bleu(cands, refs)))
    out["ROUGE_L"] = rouge_l(cands, refs)
    out["CIDEr"] = cider_d(cands, refs)
    if java:
        gts = {i: [" ".join(t) for t in r] for i, r in zip(ids, refs)}
        res = {i: [" ".join(c)] for i, c in zip(ids, cands)}
        for name, why in java_metric_status().items():
            if why is None:
                out[name] = _java_metric(name, gts, res)
    return out


# -----------------------------------------------------------------------------------------
# images: SSIM and the FID-k blur

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images whose values span `data_range`
    (1 for [0, 1] data): local statistics under an 11x11 Gaussian window (sigma 1.5) at every
    position where the window fits inside the image, C1 = (0.01 L)^2, C2 = (0.03 L)^2, the
    SSIM map averaged over positions and channels -> (B,)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    C = x.shape[1]
    t = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=x.device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-t ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    rows, cols = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1), g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def filt(z):  # separable Gaussian, 'valid' positions only, per channel
        return F.conv2d(F.conv2d(z, rows, groups=C), cols, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean((1, 2, 3)).float()


FID_BLUR_RADII = (0, 1, 2, 4, 8)  # the paper's k (Table 3)


def blur(img: Image.Image, radius: float) -> Image.Image:
    """FID-k's blur: PIL's GaussianBlur on the 8-bit image, `radius` = the Gaussian's standard
    deviation in pixels; radius 0 returns the image itself."""
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    return img if radius == 0 else img.filter(ImageFilter.GaussianBlur(radius=radius))


# -----------------------------------------------------------------------------------------
# the FID Inception-v3: torchvision's Inception3 layout with the FID graph's differences (the
# A, C and E blocks average-pool without counting the zero padding, as TensorFlow does; the
# last E block max-pools). Module and parameter names match the weights file, so it loads with
# strict=True; `fc` (1008 classes) is in the file and kept for that, but FID does not use it.

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE = (f"{INCEPTION_FILE}, the FID Inception-v3 weights (TensorFlow's 2015-12-05 Inception "
                    "graph ported to PyTorch) published with pytorch-fid's GitHub releases (release "
                    "'fid_weights'); this code does not download it")
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
RANDOM_INCEPTION = "random"  # --inception random: random weights, for tests of the plumbing only


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35 x 35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, kernel_size=1)
        self.branch5x5_1 = ConvBN(cin, 48, kernel_size=1)
        self.branch5x5_2 = ConvBN(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17 x 17, factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, kernel_size=1)
        self.branch7x7_1 = ConvBN(cin, c7, kernel_size=1)
        self.branch7x7_2 = ConvBN(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, kernel_size=1)
        self.branch3x3_2 = ConvBN(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = ConvBN(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c, 8 x 8, expanded 3x3 branches
    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, kernel_size=1)
        self.branch3x3_1 = ConvBN(cin, 384, kernel_size=1)
        self.branch3x3_2a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = ConvBN(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048). Inputs are resized to
    input_size x input_size bilinearly (F.interpolate, align_corners=False, as pytorch-fid does)
    and scaled to [-1, 1]. input_size is 299 for real FIDs; tests use less (>= 75) for speed."""

    def __init__(self, input_size: int = INCEPTION_SIZE):
        super().__init__()
        if input_size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75 pixels, got {input_size}")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = ConvBN(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(INCEPTION_DIM, 1008)  # the 2015 graph's 1008 classes; unused by FID
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_for_inception(x, self.input_size) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147) at 299
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (B, 2048, 8, 8) after Mixed_7c
        return x.mean((2, 3))  # (B, 2048): the pool3 features


def resize_for_inception(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size), bilinear like pytorch-fid (no antialiasing)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def inception_input(img: Image.Image, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float in [0, 1] (8-bit values / 255, then resized)."""
    x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return resize_for_inception(x[None], size)[0]


def load_inception(path: str, input_size: int = INCEPTION_SIZE) -> InceptionV3FID:
    """The FID Inception from the weights file at `path` (strict load), in eval mode.
    path 'random' gives deterministic random weights: for tests of the plumbing only."""
    if not path:
        raise ValueError(f"FID needs --inception PATH: {INCEPTION_SOURCE}")
    model = InceptionV3FID(input_size)
    if path == RANDOM_INCEPTION:
        gen = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # He init: the signal neither dies nor explodes over 94 layers
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2 / m.weight[0].numel()))
        return model.eval()
    state = runtime.load_weights(path)
    if not isinstance(state, dict):
        raise runtime.CheckpointError(f"--inception {path}: not a state dict ({INCEPTION_SOURCE})")
    want = model.state_dict()
    # files written by older PyTorch lack BatchNorm's num_batches_tracked counters (unused in eval)
    state = {**{k: v for k, v in want.items() if k.endswith("num_batches_tracked")}, **state}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        raise runtime.CheckpointError(
            f"--inception {path}: not the FID Inception weights ({len(missing)} missing tensors, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {(missing + unexpected + wrong)[0]}); "
            f"expected {INCEPTION_SOURCE}")
    model.load_state_dict(state, strict=True)
    return model.eval()


# -----------------------------------------------------------------------------------------
# the Frechet distance

def gaussian_stats(features) -> tuple:
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma is np.cov(rowvar=False) (N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Gaussian statistics need (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """trace(sqrtm(sigma1 @ sigma2)) for symmetric PSD sigma1, sigma2, without scipy.
    sigma1 @ sigma2 is similar to the symmetric PSD matrix S = sqrt(sigma1) sigma2 sqrt(sigma1),
    so its eigenvalues are S's and the trace of its principal square root is the sum of the
    square roots of S's eigenvalues (rounding noise below zero clipped to zero). Against
    pytorch-fid's np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)) the FIDs agreed to 1e-14
    relative for full-rank covariances; for singular ones (fewer samples than dimensions) both
    carry rounding noise of ~1e-8 relative (fid_from_features avoids it in that case)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    s = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((s + s.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)) in float64 (the FID
    formula of pytorch-fid and torch-fidelity). Like pytorch-fid, when the square root cannot
    be computed (here: an eigensolver that does not converge) it retries with eps * I added to
    both covariances. The symmetric route has no complex intermediate, so there is no imaginary
    part to drop."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("FID statistics contain NaN or inf")
    try:
        tr = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        offset = np.eye(sigma1.shape[0]) * eps
        tr = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)


def fid_from_features(features1, features2) -> float:
    """FID of two (N, D) feature sets: frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2)).
    When a set has fewer samples than dimensions its covariance has low rank and the same number
    comes cheaper from the centred features X1, X2: the nonzero eigenvalues of sigma1 sigma2 are
    those of M M^T / ((n1 - 1)(n2 - 1)) with M = X1 X2^T, so tr(sqrt(sigma1 sigma2)) is the sum
    of M's singular values / sqrt((n1 - 1)(n2 - 1)) (exact; tested equal to the covariance route)."""
    f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    for f in (f1, f2):
        if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] != f1.shape[1]:
            raise ValueError(f"FID needs two (N, D) feature arrays with N >= 2, got {f1.shape} and {f2.shape}")
    (n1, d), n2 = f1.shape, f2.shape[0]
    if min(n1, n2) >= d:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    x1, x2 = f1 - mu1, f2 - mu2
    tr = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (x1 * x1).sum() / (n1 - 1) + (x2 * x2).sum() / (n2 - 1) - 2 * tr)


# -----------------------------------------------------------------------------------------
# the Fashion-MNIST judge: a small CNN trained on the real training images only; drawn images
# are judged by its class and by their spread in its penultimate features (evaluate.py fashion)

class FashionClassifier(nn.Module):
    """A small CNN on 32 x 32 grayscale: three blocks of (3x3 conv, BatchNorm, ReLU, 2x2 max-pool),
    a `features`-wide ReLU layer (the penultimate features: the space of the Frechet distance
    and of the diversity figure) and a 10-way linear head."""

    def __init__(self, width: int = 16, features: int = 128):
        super().__init__()
        layers, cin = [], 1
        for cout in (width, 2 * width, 4 * width):  # 32 -> 16 -> 8 -> 4 px
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 4 * 4, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, len(data.FASHION_CLASSES)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [-1, 1], C 1 or 3 (averaged to gray), any S (area-resized to 32) -> (B, features)."""
        x = x.float().mean(1, keepdim=True)  # (B, 1, S, S)
        if x.shape[-1] != data.FASHION_PADDED:
            x = F.interpolate(x, size=(data.FASHION_PADDED, data.FASHION_PADDED), mode="area")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10) logits


def fashion_batch(pixels: np.ndarray, size: int = data.FASHION_PADDED) -> torch.Tensor:
    """(N, 28, 28) uint8 Fashion-MNIST pixels -> (N, 1, size, size) in [-1, 1]: the gray channel
    of data.fashion_image (vectorised at 32 px, the classifier's and the fashion preset's size)."""
    if size != data.FASHION_PADDED:
        return torch.stack([data.to_tensor(data.fashion_image(p, size))[:1] for p in pixels])
    pad = (data.FASHION_PADDED - data.FASHION_SIDE) // 2
    gray = np.pad(255 - np.asarray(pixels, dtype=np.uint8), ((0, 0), (pad, pad), (pad, pad)), constant_values=255)
    return torch.from_numpy(gray.astype(np.float32) / 127.5 - 1.0)[:, None]


@torch.no_grad()
def classify(model: FashionClassifier, x: torch.Tensor, batch_size: int = 500) -> tuple:
    """-> (predicted classes (N,), penultimate features (N, D)) of (N, C, S, S) images, in eval mode."""
    model.eval()
    preds, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f.cpu())
        preds.append(model.head(f).argmax(1).cpu())
    return torch.cat(preds), torch.cat(feats)


def train_fashion_classifier(pixels: np.ndarray, labels: np.ndarray, epochs: int, device: torch.device,
                             width: int = 16, features: int = 128, batch_size: int = 128, lr: float = 2e-3,
                             seed: int = 0, on_step=None) -> FashionClassifier:
    """Adam with a cosine-decayed lr over `epochs` passes of (N, 28, 28) real images, no augmentation.
    on_step(step, steps), if given, is called after each of the `steps` optimiser steps (a progress bar)."""
    batch_size = min(batch_size, len(pixels))  # a tiny set (the tests') is one batch
    torch.manual_seed(seed)
    model = FashionClassifier(width, features).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    per_epoch = len(pixels) // batch_size
    steps, step = epochs * per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(len(pixels), generator=order).numpy()
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(fashion_batch(pixels[idx]).to(device)),
                                   torch.from_numpy(labels[idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, steps)
    return model.eval()


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of distinct rows of (N, D) features."""
    n = len(features)
    if n < 2:
        return 0.0
    f = features.double()
    return float(torch.cdist(f, f).sum() / (n * (n - 1)))


def fashion_image_metrics(preds: torch.Tensor, feats: torch.Tensor, classes: torch.Tensor,
                          real_feats: torch.Tensor, real_labels: torch.Tensor) -> dict:
    """Drawn images judged against the real test images, overall and per class: class accuracy
    (the classifier agrees with the class the caption named), the Frechet distance between the
    features of the drawn and the real images, and the diversity: the mean pairwise feature
    distance of the drawn images of a class over that of the real test images of the class
    (1: as varied as the real ones; 0: one image repeated). Overall diversity: the mean over classes."""
    per_class = []
    for c in range(len(data.FASHION_CLASSES)):
        mine, real = classes == c, real_labels == c
        if mine.sum() < 2 or real.sum() < 2:
            raise ValueError(f"class {data.FASHION_CLASSES[c]}: needs at least 2 drawn and 2 real images")
        per_class.append({"accuracy": float((preds[mine] == c).float().mean()),
                          "fd": fid_from_features(real_feats[real].numpy(), feats[mine].numpy()),
                          "diversity": mean_pairwise_distance(feats[mine]) / mean_pairwise_distance(real_feats[real])})
    return {"accuracy": float((preds == classes).float().mean()),
            "fd": fid_from_features(real_feats.numpy(), feats.numpy()),
            "diversity": float(np.mean([p["diversity"] for p in per_class])),
            "per_class": {name: p for name, p in zip(data.FASHION_CLASSES, per_class)}}


# -----------------------------------------------------------------------------------------
# what a tokenizer's codes carry: a linear probe on bags of codes

def bag_of_codes_probe(train_tokens: np.ndarray, train_labels: np.ndarray, eval_tokens: np.ndarray,
                       eval_labels: np.ndarray, codebook_size: int, steps: int = 300, seed: int = 0) -> float:
    """Accuracy on (eval_tokens, eval_labels) of a softmax regression fitted on the train pair,
    each image read as the counts of its codes (N, L) -> (N, codebook_size): whether an attribute
    can be read off which codes an image uses, and, on images of unseen attribute combinations,
    whether the codes carry it apart from the other attributes. Full-batch Adam, lr 0.05, a small
    L2 penalty; deterministic for a seed."""
    def bags(tokens):
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        b = torch.zeros(len(tokens), codebook_size)
        return b.scatter_add_(1, tokens, torch.ones(tokens.shape))
    x, y = bags(train_tokens), torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
    classes = int(max(y.max(), int(np.max(eval_labels)))) + 1
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(codebook_size, classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, y) + 1e-4 * (w * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (bags(eval_tokens) @ w + b).argmax(1)
    return float((pred == torch.as_tensor(np.asarray(eval_labels, dtype=np.int64))).float().mean())
