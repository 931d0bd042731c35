"""
Data for L-Verse: the built-in captioned shapes dataset, real image folders, Fashion-MNIST.

1. Captioned shapes (see shared SHAPES.md). Every example is generated on the fly, the same
   on any machine, from (seed, split, num_objects, index): numpy draws the scene, PIL draws it
   at 4x the target resolution and a box filter downsamples it (exact antialiasing).
   - An object: a shape (SHAPES), a colour (COLOURS), a size (SIZES: small objects cover about
     2-4% of the image, large ones about 5-10%), a position (POSITIONS, a 3x3 grid; the
     object's area centroid lies in that cell, with a little jitter).
   - Two objects: distinct cells whose grid offset is not a pure diagonal, so the relation of
     objects[0] to objects[1] (RELATIONS) follows unambiguously from the geometry: the axis
     with the larger grid offset decides ('left of' / 'right of' / 'above' / 'below'). Their
     bounding boxes never touch.
   - Captions: 5 paraphrases per image, from templates. Every caption names every attribute
     (size, colour, shape and position of every object, plus the relation), so a caption is
     a complete description: image->text can be scored exactly against the ground truth and
     text->image against the caption alone. `parse_caption` reads any template back.
   - Splits: 'train', 'val', 'test' are disjoint random streams of the same distribution.
     HELDOUT_PAIRS, 3 of the 18 (colour, shape) pairs, never occur in those three splits;
     they occur only in split 'heldout', where every 1-object example uses a held-out pair
     and every 2-object example has at least one object with a held-out pair. Each held-out
     pair keeps its colour and its shape seen elsewhere in training, so 'heldout' measures
     composition, not new words.
   - `analyze_image` reads the attributes back from pixels (the text->image metric);
     `match_attributes` scores predicted against true attributes.
2. Real images: `load_image` (robust decoding to RGB, one exception type), crops,
   `ImageFolder` (skips unreadable files), `save_grid`, `split_indices`.
3. Fashion-MNIST, real photos with captions from templates: `read_idx` (the idx format, one-line
   errors), `read_fashion_mnist`, `fashion_image` (28 px -> a 32 px RGB image, dark on white),
   `fashion_captions` (training paraphrases) and FASHION_HELDOUT_TEMPLATES (never trained on),
   `parse_fashion_caption` (the class a caption names).
4. Training plumbing shared by the train scripts: `MicroBatches` (a resumable, rank-sharded
   order of micro-batches), `EpochIndexed`, RNG state capture, and checkpoint files
   (`load_checkpoint` / `save_checkpoint`: weights-only loads, atomic writes).
5. CLI: `python data.py show ...` previews the shapes, `python data.py export ...` writes them
   as an ordinary image folder plus captions.jsonl.
"""

import argparse
import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

# -----------------------------------------------------------------------------
# Captioned shapes: vocabulary

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; every pair >= 90 apart, every colour >= 175 from any background
    "red": (210, 35, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 215, 35),
    "purple": (135, 60, 175),
    "orange": (235, 120, 20),
}
SIZES = ("small", "large")
POSITIONS = (  # row-major 3x3 grid
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] <relation> objects[1]
# (colour, shape) pairs seen only in split 'heldout': one per shape, one per colour used
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
SPLITS = ("train", "val", "test", "heldout")

ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# -----------------------------------------------------------------------------
# Captioned shapes: geometry (all in units of the image side)

SUPERSAMPLE = 4                                 # draw at 4x, box-filter down: antialiasing
EXTENT = {"small": (0.17, 0.20), "large": (0.28, 0.32)}  # bounding-box side before SHAPE_SCALE
SIZE_THRESHOLD = math.sqrt(0.20 * 0.28)         # analyzer: extent below -> small
SHAPE_SCALE = {"circle": 1.1, "square": 1.0, "triangle": 1.25}  # evens out the covered area
# area of a shape / (scaled extent)^2: circle pi/4, square 1, equilateral triangle sqrt(3)/4
SHAPE_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}
JITTER = 0.05                                   # max offset of an object from its cell centre
MARGIN = 0.03                                   # min distance of any object from the border
PLACEMENT_TRIES = 20                            # jitter draws per two-object scene before new attributes
GAP = 0.04                                      # min gap between two objects' bounding boxes
COLOUR_JITTER = 6                               # per-channel jitter of an object's colour
NOISE_STD = 2.0                                 # faint luminance grain on the whole image
MIN_OBJECT_FRACTION = 0.004                     # analyzer: smaller components are specks
MIN_ALPHA_ASSIGN = 0.2                          # analyzer: less coverage than this -> background
MAX_RESIDUAL = 50.0                             # analyzer: max RGB distance from a background-colour line
DROP_TRIANGLE = 0.045                           # analyzer: centroid below the box centre -> triangle (ideal 1/6)
PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float32)  # (6, 3)
COLOUR_NAMES = tuple(COLOURS)


def _cell(position):
    i = POSITIONS.index(position)
    return i // 3, i % 3  # (row, col)


def _relation_from_offset(drow, dcol):
    """Relation of object a to object b from (row_a - row_b, col_a - col_b); None on a tie."""
    if abs(dcol) > abs(drow):
        return "left of" if dcol < 0 else "right of"
    if abs(drow) > abs(dcol):
        return "above" if drow < 0 else "below"
    return None


# ordered pairs of distinct cells that are not on a diagonal of each other
CELL_PAIRS = tuple(
    (a, b) for a in POSITIONS for b in POSITIONS
    if a != b and _relation_from_offset(_cell(a)[0] - _cell(b)[0], _cell(a)[1] - _cell(b)[1]) is not None
)

# -----------------------------------------------------------------------------
# Captioned shapes: captions. Templates are lower case (and never put 'a' before a vowel);
# rendering capitalises the first letter; parsing compiles every template into a regex.

POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "near the top edge", "at the top centre"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "near the left edge"),
    "centre": ("in the centre", "in the middle", "in the centre of the image"),
    "right": ("on the right", "on the right side", "near the right edge"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom edge", "at the bottom centre"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
TEMPLATES_1 = (
    "a {size} {colour} {shape} {pos}.",
    "there is a {size} {colour} {shape} {pos}.",
    "{pos}, a {size} {colour} {shape}.",
    "{pos} there is a {size} {colour} {shape}.",
    "{size} {colour} {shape} {pos}.",
    "a {shape}, {size} and {colour}, {pos}.",
    "a picture of a {size} {colour} {shape} {pos}.",
    "the image shows a {size} {colour} {shape} {pos}.",
)
TEMPLATES_2 = (
    "a {size1} {colour1} {shape1} {pos1} {rel} a {size2} {colour2} {shape2} {pos2}.",
    "there is a {size1} {colour1} {shape1} {pos1}, {rel} a {size2} {colour2} {shape2} {pos2}.",
    "{pos1}, a {size1} {colour1} {shape1} {rel} a {size2} {colour2} {shape2} {pos2}.",
    "a {size2} {colour2} {shape2} {pos2}, and a {size1} {colour1} {shape1} {pos1} {rel} it.",
    "{size1} {colour1} {shape1} {pos1}, {rel} a {size2} {colour2} {shape2} {pos2}.",
)
CAPTIONS_PER_IMAGE = 5


def _render(template, values):
    text = template.format(**values)
    return text[0].upper() + text[1:]


def _alternation(name, phrases):
    ordered = sorted(phrases, key=len, reverse=True)  # longest first
    return "(?P<%s>%s)" % (name, "|".join(re.escape(p) for p in ordered))


_POSITION_OF_PHRASE = {p: pos for pos, ps in POSITION_PHRASES.items() for p in ps}
_RELATION_OF_PHRASE = {p: rel for rel, ps in RELATION_PHRASES.items() for p in ps}


def _compile_template(template):
    out = []
    for k, part in enumerate(re.split(r"\{(\w+)\}", template.rstrip("."))):
        if k % 2 == 0:  # literal text
            lit = re.escape(part)
            lit = lit.replace(",", ",?")  # commas optional
            out.append(lit)
            continue
        kind = part.rstrip("12")
        if kind == "size":
            out.append(_alternation(part, SIZES))
        elif kind == "colour":
            out.append(_alternation(part, COLOURS))
        elif kind == "shape":
            out.append(_alternation(part, SHAPES))
        elif kind == "pos":
            out.append(_alternation(part, _POSITION_OF_PHRASE))
        elif kind == "rel":
            out.append(_alternation(part, _RELATION_OF_PHRASE))
        else:
            raise ValueError(f"unknown template field {part!r} in {template!r}")
    return re.compile("".join(out))


_PATTERNS_1 = tuple(_compile_template(t) for t in TEMPLATES_1)
_PATTERNS_2 = tuple(_compile_template(t) for t in TEMPLATES_2)


def _normalise_caption(text):
    text = text.lower().replace("-", " ").replace("center", "centre")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ?, ?", ", ", text)
    text = re.sub(r"[\s.!]+$", "", text)
    return text


def parse_caption(text):
    """Attributes from a caption any template produces: {'objects': [...], 'relation': ...},
    objects as dicts with keys shape, colour, size, position. Case, extra whitespace, a
    missing full stop, 'center' and 'top-left' are tolerated. None when no template fits."""
    if not isinstance(text, str):
        raise TypeError(f"parse_caption expects a str, got {type(text).__name__}")
    text = _normalise_caption(text)
    for pattern in _PATTERNS_1:
        m = pattern.fullmatch(text)
        if m:
            obj = {"shape": m["shape"], "colour": m["colour"], "size": m["size"],
                   "position": _POSITION_OF_PHRASE[m["pos"]]}
            return {"objects": [obj], "relation": None}
    for pattern in _PATTERNS_2:
        m = pattern.fullmatch(text)
        if m:
            objs = [{"shape": m[f"shape{k}"], "colour": m[f"colour{k}"], "size": m[f"size{k}"],
                     "position": _POSITION_OF_PHRASE[m[f"pos{k}"]]} for k in (1, 2)]
            return {"objects": objs, "relation": _RELATION_OF_PHRASE[m["rel"]]}
    return None

# -----------------------------------------------------------------------------
# Captioned shapes: generation


@dataclass
class ShapesExample:
    image: np.ndarray          # (H, W, 3) uint8
    objects: list[dict]        # dicts with keys shape, colour, size, position
    relation: str | None       # objects[0] <relation> objects[1]; None for one object
    captions: list[str]        # CAPTIONS_PER_IMAGE paraphrases
    mask: np.ndarray | None = None  # (H, W) float32 in [0, 1]: object coverage (foreground weighting)


def _example_rng(seed, split, num_objects, index):
    # crc32 of the split name: stable across runs and machines (str hash() is salted)
    entropy = [seed, zlib.crc32(split.encode()), num_objects, index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _object_box(shape, extent, cx, cy):
    """(x0, y0, x1, y1) of an object whose area centroid is (cx, cy)."""
    w = extent * SHAPE_SCALE[shape]
    if shape == "triangle":  # equilateral, pointing up; the centroid is 2/3 of the way down
        h = w * math.sqrt(3) / 2
        return cx - w / 2, cy - 2 * h / 3, cx + w / 2, cy + h / 3
    return cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2


def _place(rng, shape, size, position):
    """Sample an extent and a centroid in the position's cell, clamped inside the image."""
    extent = rng.uniform(*EXTENT[size])
    row, col = _cell(position)
    cx = (col + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
    cy = (row + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
    x0, y0, x1, y1 = _object_box(shape, extent, cx, cy)
    cx += max(0.0, MARGIN - x0) - max(0.0, x1 - (1 - MARGIN))
    cy += max(0.0, MARGIN - y0) - max(0.0, y1 - (1 - MARGIN))
    return extent, cx, cy


def _boxes_apart(a, b):
    return (a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1])


def _sample_scene(rng, split, num_objects):
    """Attributes and geometry: (objects, relation, placements)."""
    if split == "heldout":
        heldout_slot = int(rng.integers(num_objects))
    for _ in range(1000):
        pairs = []
        for k in range(num_objects):
            if split == "heldout":
                choices = HELDOUT_PAIRS if k == heldout_slot else ALL_PAIRS
            else:
                choices = TRAIN_PAIRS
            pairs.append(choices[int(rng.integers(len(choices)))])
        sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(num_objects)]
        if num_objects == 1:
            positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
        else:
            positions = list(CELL_PAIRS[int(rng.integers(len(CELL_PAIRS)))])
        for _ in range(PLACEMENT_TRIES):  # new jitter first: keeps the attribute mix nearly uniform
            placements = [_place(rng, s, z, p) for (_, s), z, p in zip(pairs, sizes, positions)]
            boxes = [_object_box(s, *pl) for (_, s), pl in zip(pairs, placements)]
            if num_objects == 1 or _boxes_apart(*boxes):
                break
        else:
            continue  # these two cannot sit apart in these cells (e.g. two large triangles side by side)
        objects = [{"shape": s, "colour": c, "size": z, "position": p}
                   for (c, s), z, p in zip(pairs, sizes, positions)]
        relation = None
        if num_objects == 2:
            (r0, c0), (r1, c1) = _cell(positions[0]), _cell(positions[1])
            relation = _relation_from_offset(r0 - r1, c0 - c1)
        return objects, relation, placements
    raise RuntimeError("could not place two non-touching objects")  # unreachable in practice


def _captions(rng, objects, relation):
    def pick(options):
        return options[int(rng.integers(len(options)))]
    if len(objects) == 1:
        o = objects[0]
        chosen = rng.choice(len(TEMPLATES_1), size=CAPTIONS_PER_IMAGE, replace=False)
        return [_render(TEMPLATES_1[t], {"size": o["size"], "colour": o["colour"], "shape": o["shape"],
                                         "pos": pick(POSITION_PHRASES[o["position"]])})
                for t in chosen]
    chosen = rng.permutation(len(TEMPLATES_2))[:CAPTIONS_PER_IMAGE]
    captions = []
    for t in chosen:
        values = {"rel": pick(RELATION_PHRASES[relation])}
        for k, o in enumerate(objects, start=1):
            values.update({f"size{k}": o["size"], f"colour{k}": o["colour"], f"shape{k}": o["shape"],
                           f"pos{k}": pick(POSITION_PHRASES[o["position"]])})
        captions.append(_render(TEMPLATES_2[t], values))
    return captions


def _draw_coverage(shape, extent, cx, cy, image_size):
    """(S, S) float32 coverage in [0, 1] of one object, drawn at 4x and box-filtered."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * big for v in _object_box(shape, extent, cx, cy))
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _check_shapes_args(split, num_objects, image_size):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    if not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be in 32..512, got {image_size!r}")


def shapes_example(index: int, split: str = "train", image_size: int = 64, num_objects: int = 1,
                   seed: int = 0) -> ShapesExample:
    """Example `index` of a split. The scene and captions depend on (seed, split,
    num_objects, index) only, so the same index at 64 and 256 px shows the same scene."""
    _check_shapes_args(split, num_objects, image_size)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = _example_rng(seed, split, num_objects, index)
    objects, relation, placements = _sample_scene(rng, split, num_objects)
    captions = _captions(rng, objects, relation)

    # background: a pale grey/cream tint, a faint linear gradient (resolution independent)
    base = rng.uniform(222, 240) + np.array([rng.uniform(0, 6), rng.uniform(-2, 3), rng.uniform(-8, 0)])
    angle, amplitude = rng.uniform(0, 2 * math.pi), rng.uniform(0, 8)
    tints = [np.array(COLOURS[o["colour"]]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
             for o in objects]
    noise_rng = np.random.default_rng(rng.integers(2**63))  # last: keeps the scene size-independent
    t = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    ramp = t[None, :] * math.cos(angle) + t[:, None] * math.sin(angle)  # (S, S)
    image = base[None, None, :] + (amplitude * ramp)[..., None]  # (S, S, 3)
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    for o, (extent, cx, cy), tint in zip(objects, placements, tints):
        alpha = _draw_coverage(o["shape"], extent, cx, cy, image_size)[..., None]
        image = image * (1 - alpha) + tint[None, None, :] * alpha
        mask = np.maximum(mask, alpha[..., 0])
    image = image + noise_rng.normal(0, NOISE_STD, (image_size, image_size, 1))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ShapesExample(image=image, objects=objects, relation=relation, captions=captions, mask=mask)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` examples of a split as (3, H, W) float32 tensors in [-1, 1]."""

    def __init__(self, split="train", length=10000, image_size=64, num_objects=1, seed=0):
        _check_shapes_args(split, num_objects, image_size)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length!r}")
        self.split, self.length, self.image_size = split, length, image_size
        self.num_objects, self.seed = num_objects, seed

    def __len__(self):
        return self.length

    def example(self, i) -> ShapesExample:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length}")
        return shapes_example(int(i), self.split, self.image_size, self.num_objects, self.seed)

    def __getitem__(self, i) -> torch.Tensor:
        return _tensor_from_uint8(self.example(i).image)

# -----------------------------------------------------------------------------
# Captioned shapes: analyzer (attributes read back from pixels)


def _components(mask):
    """8-connected components of a boolean (H, W) mask, by union-find over row runs.
    Returns run arrays (rows, starts, ends exclusive) and a component label per run."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 after it ends
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major, so run k's start and end pair up
    n = len(rows)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_start = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    starts_l, ends_l = starts.tolist(), ends.tolist()
    for y in range(1, mask.shape[0]):
        i, i_end = row_start[y - 1], row_start[y]
        j, j_end = row_start[y], row_start[y + 1]
        while i < i_end and j < j_end:
            if starts_l[i] <= ends_l[j] and starts_l[j] <= ends_l[i]:  # touch incl. diagonally
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
            if ends_l[i] < ends_l[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(k) for k in range(n)], dtype=np.int64)
    _, labels = np.unique(roots, return_inverse=True)
    return rows, starts, ends, labels


def _soft_measures(alpha, x0, y0, w, h, colour):
    """Measurements of one object from its coverage map alpha (a window at x0, y0 of an
    h x w image): area, width and height in pixels (width = sum over columns of the column's
    largest alpha), centroid cx, cy as fractions of the image side, and shape features."""
    ys, xs = np.mgrid[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] + 0.5  # pixel centres
    area = alpha.sum()
    col_max, row_max = alpha.max(0), alpha.max(1)  # (window W,), (window H,)
    width, height = col_max.sum(), row_max.sum()
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    # centre of the soft bounding box: where the column / row profiles balance
    bx = (col_max * xs[0]).sum() / width
    by = (row_max * ys[:, 0]).sum() / height
    # corners of the soft bounding box: coverage within a triangle of legs width/4, height/4
    u, v = (xs - (bx - width / 2)) / width, (ys - (by - height / 2)) / height  # 0..1 inside
    inside = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    corners = []
    for cu, cv in ((u, v), (1 - u, v), (u, 1 - v), (1 - u, 1 - v)):
        region = inside & (cu + cv < 0.25)
        if region.any():  # tiny objects: a corner region may hold no pixel centre
            corners.append(alpha[region].mean())
    return {"colour": colour, "area": float(area), "width": float(width), "height": float(height),
            "cx": cx / w, "cy": cy / h,
            "fill": float(area / (width * height)),       # circle pi/4, square 1, triangle 1/2
            "drop": float((cy - by) / height),            # centroid below box centre: triangle 1/6, else 0
            "corners": float(np.mean(corners)) if corners else None}  # square 1, circle 0


def _object_stats(image):
    """Candidate objects, largest first (dicts from _soft_measures).

    An object pixel is a mix of the background (the image median) and one palette colour, so
    it lies on the line from the background to that colour. Each pixel is assigned to the
    colour whose line it is closest to (coverage alpha >= MIN_ALPHA_ASSIGN, distance below
    MAX_RESIDUAL); this, unlike nearest-colour, keeps a blue edge half mixed with a pale
    background from reading as purple. Pixels covered at least half are segmented into
    8-connected components per colour; components under MIN_OBJECT_FRACTION of the image
    are specks. Each component is then measured soft, from alpha in and next to it, so that
    half-covered edge rows count half instead of flipping in and out with noise."""
    pixels = image.astype(np.float32)
    h, w = pixels.shape[:2]
    background = np.median(pixels.reshape(-1, 3), axis=0)
    offset = pixels - background  # (H, W, 3)
    axes = PALETTE - background  # (6, 3): from the background to each colour
    dots = offset @ axes.T  # (H, W, 6)
    alphas = dots / (axes * axes).sum(1)  # (H, W, 6): coverage along each background-colour line
    residual2 = (offset * offset).sum(-1, keepdims=True) - dots * alphas  # squared distance to each line
    residual2[alphas < MIN_ALPHA_ASSIGN] = np.inf
    nearest = residual2.argmin(-1)  # (H, W): the colour whose line the pixel lies on
    assigned = residual2.min(-1) < MAX_RESIDUAL ** 2  # on some colour's line: an object or its fringe
    foreground = assigned & (np.take_along_axis(alphas, nearest[..., None], -1)[..., 0] >= 0.5)
    min_area = MIN_OBJECT_FRACTION * h * w
    found = []
    for k, name in enumerate(COLOUR_NAMES):
        mask = foreground & (nearest == k)
        if mask.sum() < min_area:
            continue
        rows, starts, ends, labels = _components(mask)
        length = ends - starts
        area = np.bincount(labels, weights=length)
        others = assigned & (nearest != k)
        for c in np.nonzero(area >= min_area)[0]:
            sel = labels == c
            r, s, e = rows[sel], starts[sel], ends[sel]
            y0, y1 = max(r.min() - 1, 0), min(r.max() + 2, h)
            x0, x1 = max(s.min() - 1, 0), min(e.max() + 1, w)
            comp = np.zeros((y1 - y0, x1 - x0), dtype=bool)  # the component inside its window
            pix_r = np.repeat(r, e - s) - y0
            pix_c = np.arange(len(pix_r)) - np.repeat(np.cumsum(e - s) - (e - s), e - s) \
                + np.repeat(s, e - s) - x0
            comp[pix_r, pix_c] = True
            near = comp.copy()  # dilate by one pixel (8-neighbourhood)
            near[1:] |= comp[:-1]; near[:-1] |= comp[1:]
            near[:, 1:] |= near[:, :-1].copy(); near[:, :-1] |= near[:, 1:].copy()
            near &= ~others[y0:y1, x0:x1]
            alpha = np.clip(alphas[y0:y1, x0:x1, k], 0, 1) * near
            found.append(_soft_measures(alpha, x0, y0, w, h, name))
    found.sort(key=lambda o: -o["area"])
    return found


def _classify(o, h, w):
    if o["drop"] > DROP_TRIANGLE:
        shape = "triangle"
    else:  # circle vs square: bounding-box fill and corner coverage, each 0 for a circle, 1 for a square
        squareness = (o["fill"] - SHAPE_AREA["circle"]) / (1 - SHAPE_AREA["circle"])
        if o["corners"] is not None:
            squareness = 0.5 * (squareness + o["corners"])
        shape = "square" if squareness > 0.5 else "circle"
    extent = math.sqrt(o["area"] / (h * w) / (SHAPE_AREA[shape] * SHAPE_SCALE[shape] ** 2))
    size = "small" if extent < SIZE_THRESHOLD else "large"
    col = min(int(o["cx"] * 3), 2)
    row = min(int(o["cy"] * 3), 2)
    return {"shape": shape, "colour": o["colour"], "size": size, "position": POSITIONS[3 * row + col]}


def analyze_image(image: np.ndarray, num_objects: int = 1) -> dict | None:
    """Attributes read from an (H, W, 3) uint8 image: {'objects': [...], 'relation': ...},
    or None when fewer than `num_objects` objects are found. Segmentation: see _object_stats;
    the largest `num_objects` components are kept. Shape: a triangle (pointing up) has its
    centroid 1/6 of its height below the centre of its bounding box, a circle or a square
    none; a square fills its bounding box and its corners (fill 1), a circle does not (fill
    pi/4, corners empty). Size: the extent implied by the area for that shape, against
    SIZE_THRESHOLD. Position: the cell of the area centroid. Relation: from the two cells
    (the axis with the larger grid offset), from the centroids on a diagonal tie."""
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(f"expected an (H, W, 3) uint8 array, got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    h, w = image.shape[:2]
    found = _object_stats(image)
    if len(found) < num_objects:
        return None
    found = found[:num_objects]
    objects = [_classify(o, h, w) for o in found]
    relation = None
    if num_objects == 2:
        (r0, c0), (r1, c1) = _cell(objects[0]["position"]), _cell(objects[1]["position"])
        relation = _relation_from_offset(r0 - r1, c0 - c1)
        if relation is None:
            relation = _relation_from_offset(found[0]["cy"] - found[1]["cy"],
                                             found[0]["cx"] - found[1]["cx"])
        if relation is None:  # exactly equal centroids: no relation can be read
            return None
    return {"objects": objects, "relation": relation}


OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")


def match_attributes(pred: dict | None, truth: dict) -> dict:
    """Per-attribute agreement of predicted with true attributes, plus 'exact' (all agree).
    Objects are matched as a set: the assignment of predicted to true objects that agrees on
    the most attributes is used, and the predicted relation is inverted when that assignment
    swaps the two objects. An attribute counts only if it agrees for every object; 'relation'
    is reported when the truth has one. A None prediction or a wrong object count: all False."""
    keys = OBJECT_ATTRIBUTES + (("relation",) if truth.get("relation") is not None else ())
    n = len(truth["objects"])
    if pred is None or len(pred.get("objects", ())) != n:
        return {**{k: False for k in keys}, "exact": False}
    best = None
    for perm in itertools.permutations(range(n)):
        result = {k: all(pred["objects"][perm[i]][k] == truth["objects"][i][k] for i in range(n))
                  for k in OBJECT_ATTRIBUTES}
        if "relation" in keys:
            rel = pred.get("relation")
            if perm != tuple(range(n)):  # pred's objects[0] is truth's objects[1]
                rel = INVERSE_RELATION.get(rel)
            result["relation"] = rel == truth["relation"]
        score = sum(sum(pred["objects"][perm[i]][k] == truth["objects"][i][k] for i in range(n))
                    for k in OBJECT_ATTRIBUTES) + result.get("relation", 0)
        if best is None or score > best[0]:
            best = (score, result)
    result = best[1]
    result["exact"] = all(result.values())
    return result

# -----------------------------------------------------------------------------
# Real images


class ImageError(ValueError):
    """An image file that cannot be used; the message names the path and the reason."""


MAX_PIXELS = 89_478_485  # refuse larger images (PIL's own bomb threshold; 50 MP photos are fine)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _to_rgb(im):
    """Any decoded PIL image -> RGB, handling alpha, 16-bit and float modes properly."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info) \
            or (mode in ("L", "RGB") and "transparency" in im.info):  # P/L/RGB: a tRNS colour key
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if a.ndim != 2:
            raise ValueError(f"unsupported {mode} image with shape {a.shape}")
        if mode.startswith("I;16"):
            a = a.astype(np.float64) / 257.0  # 65535 -> 255
        elif mode == "I":
            a = a.astype(np.float64)
            if a.min() >= 0 and a.max() <= 65535:  # 16-bit data (older PIL decodes 16-bit PNG to 'I')
                a = a / 257.0
            else:
                a = (a - a.min()) / max(a.max() - a.min(), 1) * 255.0
        else:  # 'F': [0, 1] is scaled to [0, 255], [0, 255] kept, any other range min-max scaled
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            if a.min() >= 0 and a.max() <= 1:
                a = a * 255.0
            elif not (a.min() >= 0 and a.max() <= 255):
                a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...


def load_image(path) -> Image.Image:
    """Decode an image file fully into an RGB PIL image, EXIF orientation applied. Alpha is
    composited on white; 16-bit data is scaled to 8 bits. Raises ImageError for anything
    that is not a complete, readable image of at most MAX_PIXELS pixels."""
    path = os.fspath(path)
    try:
        if not os.path.isfile(path):
            raise ImageError(f"cannot load image {path}: no such file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"cannot load image {path}: empty file")
        with warnings.catch_warnings():  # PIL's decompression-bomb warning -> an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ImageError(f"cannot load image {path}: {im.size[0]}x{im.size[1]} pixels is more "
                                 f"than MAX_PIXELS={MAX_PIXELS}")
            im.load()  # decode now: truncated or corrupt data fails here
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)  # exif_transpose returned a new image: no tie to the file
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot load image {path}: too large ({_first_line(e)})") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
            MemoryError, ZeroDivisionError) as e:  # what PIL's plugins raise on bad data
        raise ImageError(f"cannot load image {path}: {_first_line(e)}") from None


def _tensor_from_uint8(a):
    a = np.array(a, dtype=np.uint8)  # a copy: arrays from PIL are read-only
    return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1.0


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image (see load_image), got mode {img.mode}")
    return _tensor_from_uint8(np.asarray(img, dtype=np.uint8))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) in [-1, 1] -> (H, W, 3) or (N, H, W, 3) uint8, clamped."""
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
    y = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.movedim(-3, -1).numpy()


def save_grid(rows: list, path, pad: int = 2, pad_value: int = 255) -> None:
    """Save a PNG grid: one row per (N, 3, H, W) batch in [-1, 1] (rows may differ in N),
    `pad` pixels of `pad_value` between images. Atomic: temp file, then os.replace."""
    if not rows:
        raise ValueError("save_grid needs at least one row")
    for r in rows:
        if r.dim() != 4 or r.shape[1] != 3 or r.shape[2:] != rows[0].shape[2:]:
            raise ValueError(f"every row must be (N, 3, H, W) with the same H, W; got "
                             f"{[tuple(r.shape) for r in rows]}")
    h, w = rows[0].shape[2:]
    cols = max(r.shape[0] for r in rows)
    grid = np.full((pad + len(rows) * (h + pad), pad + cols * (w + pad), 3), pad_value, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(to_uint8(r)):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = im
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(grid, "RGB").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _uniform(rng):
    """A float in [0, 1) from a torch.Generator, random.Random or numpy Generator."""
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng))
    if isinstance(rng, (random.Random, np.random.Generator)):
        return float(rng.random())
    raise TypeError(f"rng must be a torch.Generator, random.Random or numpy Generator, "
                    f"got {type(rng).__name__}")


def _crop_resize(img, size, box):
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"size must be a positive int, got {size!r}")
    return img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def random_crop_resize(img: Image.Image, size: int, rng, min_area: float = 0.75) -> Image.Image:
    """Random square crop covering a uniform min_area..1 of the image area (its side clipped
    to the short side of a non-square image), at a random place, resized to size x size."""
    if not 0 < min_area <= 1:
        raise ValueError(f"min_area must be in (0, 1], got {min_area!r}")
    w, h = img.size
    area = w * h * (min_area + (1 - min_area) * _uniform(rng))
    side = min(math.sqrt(area), w, h)
    x = (w - side) * _uniform(rng)
    y = (h - side) * _uniform(rng)
    return _crop_resize(img, size, (x, y, x + side, y + side))


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and crop the centre square (one resampling step)."""
    w, h = img.size
    side = min(w, h)
    x, y = (w - side) / 2, (h - side) / 2
    return _crop_resize(img, size, (x, y, x + side, y + side))


def list_images(root) -> list:
    """Image files under root (any depth, hidden entries skipped), sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(folder, f))
    return sorted(found, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (class subfolders or flat) as (3, S, S) tensors in [-1, 1]:
    train -> random 75-100% crop (reproducible from seed, epoch and index), else centre crop.
    An unreadable file is recorded in `bad_files`, warned about once and replaced by the next
    readable one. With DataLoader workers each worker keeps its own `bad_files`."""

    def __init__(self, root, image_size, train: bool, seed: int = 0):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        self.root, self.image_size, self.train, self.seed = root, image_size, train, seed
        self.files = list_images(root)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.epoch = 0
        self.bad_files = []  # (path, reason)
        self._bad = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.files)

    def _mark_bad(self, path, reason):
        if path not in self._bad:
            self._bad.add(path)
            self.bad_files.append((path, reason))
            warnings.warn(f"skipping unreadable image: {reason}", stacklevel=3)

    def __getitem__(self, i) -> torch.Tensor:
        n = len(self.files)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        for k in range(n):
            path = self.files[(i + k) % n]
            if path in self._bad:
                continue
            try:
                img = load_image(path)
            except ImageError as e:
                self._mark_bad(path, str(e))
                continue
            if self.train:
                rng = random.Random(f"{self.seed}/{self.epoch}/{i}")  # str seeds are stable
                img = random_crop_resize(img, self.image_size, rng)
            else:
                img = center_crop_resize(img, self.image_size)
            return to_tensor(img)
        raise ImageError(f"no readable image under {self.root} ({n} files, all unreadable)")

    def scan(self, progress: bool = True) -> list:
        """Decode every file once; drop the unreadable ones from `files`. Returns them."""
        from tqdm import tqdm
        bad = []
        for path in tqdm(self.files, desc="scan", disable=not progress):
            if path in self._bad:
                bad.append((path, next(r for p, r in self.bad_files if p == path)))
                continue
            try:
                load_image(path)
            except ImageError as e:
                self._mark_bad(path, str(e))
                bad.append((path, str(e)))
        self.files = [p for p in self.files if p not in self._bad]
        if not self.files:
            raise ImageError(f"no readable image under {self.root}")
        return bad


def split_indices(n: int, val_fraction: float, seed: int) -> tuple:
    """Deterministic (train_idx, val_idx), each sorted, for a dataset without a val split."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())

# ----------------------------------------------------------------------------------------
# Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grayscale photos of 10 kinds of
# clothing, read from the standard idx files (gzipped or not), captioned from templates.
# The official split is kept: 60,000 train, 10,000 test (never trained on; the scripts hold a
# validation slice out of train). The files hold a light garment on black; fashion_image
# inverts that to a dark garment on white (the captions say "on a white background", as in
# the catalogue photos the set was made from) and pads 28 -> 32 px with white, so the side
# is a multiple of 16 (augvae's 'fashion' preset: 8x8 tokens, ML levels down to 2x2).

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs it
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_SIDE = 28        # pixels of a Fashion-MNIST image
FASHION_PADDED = 32      # after fashion_image's white border (2 px each side)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # the official names, label order
FASHION_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot")  # what the captions call them
# other words parse_fashion_caption accepts for a class (a caption naming two classes is None)
FASHION_ALIASES = {0: ("top", "tee"), 1: ("pants",), 2: ("sweater", "jumper"), 9: ("boot",)}
# training paraphrases ({a}: the noun's article). Every caption names the class once.
FASHION_TEMPLATES = (
    "a photo of {a} {noun}.",
    "{a} {noun} on a white background.",
    "a picture of {a} {noun}.",
    "a product photo of {a} {noun}.",
    "{a} {noun}.",
    "a black and white photo of {a} {noun}.",
    "a small grey image of {a} {noun}.",
    "this is {a} {noun}.",
)
# held-out paraphrases: never in a training caption, used to draw images for evaluation.
# They recombine words of the training templates, so no word is new to the model.
FASHION_HELDOUT_TEMPLATES = (
    "a picture of {a} {noun} on a white background.",
    "this is a photo of {a} {noun}.",
    "a black and white picture of {a} {noun}.",
    "a small grey photo of {a} {noun}.",
)
IDX_MAGIC_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
                   0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path, ndim: int | None = None) -> np.ndarray:
    """An idx file (LeCun's MNIST format; gzip-compressed when it starts with gzip's magic) ->
    numpy array. Header: two zero bytes, a type code, the number of dimensions, then each size
    as a big-endian uint32; the data follows, row-major. Raises ImageError when the magic, the
    dimensions (`ndim` if given) or the length do not fit."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off gzip, EOFError
        raise ImageError(f"{path}: not a readable idx file ({_first_line(e)})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_MAGIC_TYPES or raw[3] == 0:
        raise ImageError(f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'})")
    dtype, dims = IDX_MAGIC_TYPES[raw[2]], raw[3]
    if ndim is not None and dims != ndim:
        raise ImageError(f"{path}: has {dims} dimension(s), expected {ndim}")
    if len(raw) < 4 + 4 * dims:
        raise ImageError(f"{path}: header cut off ({len(raw)} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", dims, 4))
    expected = 4 + 4 * dims + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ImageError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * dims).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_path(root: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise ImageError(f"no {name}(.gz) in {root} (install the Debian package dataset-fashion-mnist, "
                     f"or give the folder that holds the idx files)")


def fashion_files(root: str, split: str) -> tuple:
    """(images path, labels path) of an official split ('train' or 'test') under root."""
    if split not in FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return tuple(_idx_path(root, name) for name in FASHION_FILES[split])


_FASHION_CACHE = {}  # (path, size, mtime) of both files -> (images, labels): scripts read a split once


def read_fashion_mnist(root: str, split: str) -> tuple:
    """-> (images (N, 28, 28) uint8, light garment on black as stored; labels (N,) int64 in 0..9)."""
    paths = fashion_files(root, split)
    key = tuple((os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths)
    if key not in _FASHION_CACHE:
        images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ImageError(f"{root}: Fashion-MNIST images and labels are uint8, got {images.dtype} and {labels.dtype}")
        if images.shape[1:] != (FASHION_SIDE, FASHION_SIDE):
            raise ImageError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}, "
                             f"expected {FASHION_SIDE}x{FASHION_SIDE}")
        if len(images) != len(labels) or len(images) == 0:
            raise ImageError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
        if labels.max() >= len(FASHION_CLASSES):
            raise ImageError(f"{paths[1]}: label {int(labels.max())} outside 0..{len(FASHION_CLASSES) - 1}")
        if len(_FASHION_CACHE) >= 4:  # the two official splits of a root or two
            _FASHION_CACHE.pop(next(iter(_FASHION_CACHE)))
        _FASHION_CACHE[key] = (images, labels.astype(np.int64))
    return _FASHION_CACHE[key]


def fashion_image(pixels: np.ndarray, size: int = FASHION_PADDED) -> Image.Image:
    """A (28, 28) uint8 Fashion-MNIST image -> RGB PIL image of size x size: inverted (a dark
    garment on white), padded with white to 32 px, then resized (Lanczos) if size is not 32."""
    if pixels.shape != (FASHION_SIDE, FASHION_SIDE) or pixels.dtype != np.uint8:
        raise ValueError(f"expected a ({FASHION_SIDE}, {FASHION_SIDE}) uint8 image, got {pixels.dtype} {pixels.shape}")
    pad = (FASHION_PADDED - FASHION_SIDE) // 2
    gray = np.pad(255 - pixels, pad, constant_values=255)
    img = Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    return img if size == FASHION_PADDED else img.resize((size, size), Image.Resampling.LANCZOS)


class FashionMNIST(torch.utils.data.Dataset):
    """Images of an official split (or of `indices` into it) as (3, S, S) tensors in [-1, 1]."""

    def __init__(self, root: str, split: str, image_size: int, indices=None):
        self.images, self.labels = read_fashion_mnist(root, split)
        self.image_size = image_size
        self.indices = list(range(len(self.images))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i) -> torch.Tensor:
        return to_tensor(fashion_image(self.images[self.indices[i]], self.image_size))


def fashion_caption(label: int, template: str) -> str:
    noun = FASHION_NOUNS[label]
    return _render(template, {"a": "an" if noun[0] in "aeiou" else "a", "noun": noun})


def fashion_captions(label: int, index: int, split: str = "train", seed: int = 0) -> list:
    """CAPTIONS_PER_IMAGE training paraphrases of image `index` of a split, drawn without
    replacement from FASHION_TEMPLATES; they depend on (seed, split, index) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(f"fashion/{split}".encode()), index]))
    chosen = rng.choice(len(FASHION_TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
    return [fashion_caption(label, FASHION_TEMPLATES[t]) for t in chosen]


_FASHION_WORDS = sorted(((w, c) for c in range(len(FASHION_CLASSES))
                         for w in (FASHION_NOUNS[c], FASHION_CLASSES[c].lower(), *FASHION_ALIASES.get(c, ()))),
                        key=lambda wc: -len(wc[0]))  # longest first: 't-shirt' before 'shirt'
_FASHION_CLASS_OF = dict(_FASHION_WORDS)
_FASHION_PATTERN = re.compile(r"(?<![\w-])(%s)(?:e?s)?(?![\w-])" % "|".join(re.escape(w) for w, _ in _FASHION_WORDS))


def parse_fashion_caption(text: str) -> int | None:
    """The Fashion-MNIST class (index into FASHION_CLASSES) a caption names, or None when it
    names none or two different ones. Case, plurals and the spacing the BPE decoder leaves
    ('t - shirt') are tolerated; 'shirt' inside 't-shirt' is not a shirt."""
    if not isinstance(text, str):
        raise TypeError(f"parse_fashion_caption expects a str, got {type(text).__name__}")
    text = re.sub(r"\s+", " ", text.lower())
    text = re.sub(r"\bt ?-? ?shirt", "t-shirt", text)
    text = re.sub(r" ?/ ?", "/", text)
    found = {_FASHION_CLASS_OF[m.group(1)] for m in _FASHION_PATTERN.finditer(text)}
    return found.pop() if len(found) == 1 else None


# ----------------------------------------------------------------------------------------
# training plumbing shared by the train scripts: a resumable, rank-sharded order of
# micro-batches, RNG state capture, checkpoint files

class EpochIndexed(torch.utils.data.Dataset):
    """Index j = epoch * n + i -> dataset[i] with the dataset's augmentation RNG set for that
    epoch, so random crops depend only on (seed, epoch, i): reproducible across resumes and
    worker processes."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __getitem__(self, j):
        epoch, i = divmod(j, self.n)
        base = self.ds.dataset if isinstance(self.ds, torch.utils.data.Subset) else self.ds
        if hasattr(base, "set_epoch"):
            base.set_epoch(epoch)
        return self.ds[i]

    def __len__(self):
        return 1 << 62


class MicroBatches(torch.utils.data.Sampler):
    """Endless micro-batches of dataset indices, starting at micro-batch `start`. Each epoch
    is a permutation seeded by (seed, epoch); rank r takes the r-th slice of every group of
    `world` micro-batches, so the order depends only on (seed, batch size, world size)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int):
        self.n, self.bs, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{n} training images are fewer than one batch of {batch_size} x {world} processes")

    def __iter__(self):
        b, perm_epoch, perm = self.start, -1, None
        while True:
            epoch, k = divmod(b, self.per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
                perm_epoch = epoch
            s = (k * self.world + self.rank) * self.bs
            yield [epoch * self.n + int(i) for i in perm[s:s + self.bs]]
            b += 1


def start_processes(device: str) -> tuple:
    """torchrun-aware start of a training script -> (ddp, rank, world, device). DDP is on when
    torchrun set RANK: gloo on CPU, NCCL on CUDA, each process on cuda:LOCAL_RANK. 'auto'
    picks cuda when there is one. TF32 matmuls are allowed on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (x86 AMX or AVX512-BF16, read from
    /proc/cpuinfo), where bf16 autocast trains convolutions about 2x faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_context(device: torch.device, dtype: str) -> tuple:
    """-> (context, torch dtype, amp on?). 'auto': bf16 on a GPU that has it, else fp16 on CUDA;
    fp32 on CPU. 'bfloat16' also autocasts on CPU (fast where cpu_has_fast_bf16()); fp16 is
    CUDA only and needs a GradScaler."""
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dt == torch.float16 and device.type != "cuda":
        raise ValueError("--dtype float16 needs a CUDA device; on CPU use bfloat16 or float32")
    amp = dt != torch.float32
    return (torch.autocast(device.type, dtype=dt) if amp else contextlib.nullcontext()), dt, amp


def require_nonnegative(cfg: dict, keys) -> None:
    """A ValueError naming the first of these flags whose value is not >= 0 (nan included)."""
    for key in keys:
        if not cfg[key] >= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")


def resume_settings(cfg: dict, kind: str) -> tuple:
    """For --resume: load OUT/ckpt.pt and return (settings, checkpoint), where the settings are
    the saved run's, overridden by the flags given explicitly now (cfg['_given']); a setting
    the checkpoint predates takes its default."""
    if not cfg["out"]:
        raise ValueError("--resume needs --out (the folder of the run to continue)")
    path = os.path.join(cfg["out"], "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path, kind)
    given = set(cfg["_given"]) - {"resume"}
    defaults = {k: v for k, v in cfg.items() if k != "_given"}
    return {**defaults, **ckpt["train"], **{k: cfg[k] for k in given}, "resume": True}, ckpt


def scheduled_lr(lr: float, step: int, max_steps: int, warmup: int = 0, warmdown: int = 0,
                 min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from 0 over the first
    `warmup` steps, then `lr`, then a linear decay to `min_lr` over the last `warmdown` steps of
    `max_steps`. A function of the step alone, so a resumed run follows it exactly."""
    now = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    left = max_steps - step
    if left <= warmdown:
        now = min_lr + (now - min_lr) * left / warmdown
    return now


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def all_rng_states(world: int) -> list:
    """Every rank's RNG state (rank order), gathered on all ranks, for the checkpoint."""
    mine = rng_state()
    if world == 1:
        return [mine]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------
# checkpoints and weight files: plain dicts of tensors and primitives, loaded weights-only
# (a pickle that would run code is refused), written atomically.

CHECKPOINT_FORMAT = 1  # bump when the layout changes; newer files are refused with a message
TOKENS_FORMAT = 1  # of prepare.py's output folder (meta.json says which)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another kind or of a newer format."""


def load_weights(path) -> dict:
    """torch.load a file of tensors safely (weights_only=True) with a one-line error."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not loadable"
        raise CheckpointError(f"{path}: not a loadable weights file ({_first_line(e)[:200]})") from None


def load_checkpoint(path, kind: str) -> dict:
    """Load a training checkpoint and check that it is a `kind` ('augvae', 'biart') one."""
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no kind/config/model entries)")
    if ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: is a {ckpt['kind']!r} checkpoint, expected {kind!r}")
    if int(ckpt.get("format_version", 0)) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this code "
                              f"understands ({CHECKPOINT_FORMAT}); update the code")
    return ckpt


class TrainingError(Exception):
    """A failure that stops training with a one-line message (the last checkpoint is kept)."""


def check_finite_loss(loss: torch.Tensor, step: int, ckpt_path, world: int = 1) -> None:
    """Stop training on a NaN/inf loss: a TrainingError naming the step and what is kept at
    ckpt_path. With world > 1 (DDP) the ranks' losses are gathered first, so every rank stops
    at the same micro-step with the same message, where a rank stopping alone would leave the
    others waiting in the gradient all-reduce."""
    value = loss.detach().float().reshape(1)
    where = ""
    if world > 1:
        values = [torch.empty_like(value) for _ in range(world)]
        torch.distributed.all_gather(values, value)
        bad = [r for r, v in enumerate(values) if not torch.isfinite(v).all()]
        if bad:
            value, where = values[bad[0]], f" on rank {bad[0]}"
    if not torch.isfinite(value).all():
        raise TrainingError(f"loss is {float(value)} at step {step}{where}: stopping; " + kept_checkpoint(ckpt_path))


def kept_checkpoint(path) -> str:
    """What a training run that must stop leaves behind, for its error message."""
    if not os.path.exists(path):
        return f"no checkpoint was written yet ({path} does not exist)"
    try:
        return f"the last good checkpoint is kept at {path} (step {int(load_weights(path).get('step', 0))})"
    except CheckpointError as e:
        return f"the checkpoint at {path} is not loadable ({e})"


def save_checkpoint(obj: dict, path) -> None:
    """Write atomically: a temp file in the same folder, fsync, then os.replace, so a kill or
    a full disk never leaves a half-written file where the previous checkpoint was. A failed
    write removes its temp file and raises OSError naming `path`."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        # torch.save reports a failed write (full disk, file-size limit) as a RuntimeError
        # ("unexpected pos ...") raised while handling the OSError: name that one
        cause = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else _first_line(cause)
        raise OSError(f"could not write checkpoint {path}: {reason}") from None


# -----------------------------------------------------------------------------
# CLI


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2, no usage dump), for every script's CLI."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def add_flags(parser: argparse.ArgumentParser, defaults: dict, helps: dict, suppress: bool = False):
    """One flag per config key (underscores become dashes), typed by its default: bools get
    --x / --no-x, everything else parses (and rejects) by the default's type. `suppress`
    leaves flags that were not given out of the result (to tell given flags from defaults)."""
    for k, v in defaults.items():
        flag = "--" + k.replace("_", "-")
        kw = {} if suppress else {"default": v}
        if isinstance(v, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=helps[k], **kw)
        else:
            parser.add_argument(flag, type=type(v), help=helps[k] + f" (default: {v!r})", **kw)


def parse_flags(build_parser, argv: list) -> dict:
    """Parse argv with build_parser(suppress); '_given' lists the flags given explicitly
    (a resumed run keeps its saved settings except those)."""
    cfg = vars(build_parser(False).parse_args(argv))
    cfg["_given"] = sorted(vars(build_parser(True).parse_args(argv)))
    return cfg


def _int_in(lo, hi):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {lo}..{hi}, got {v}")
        return v
    return parse


def _cmd_show(args):
    examples = [shapes_example(args.start + i, args.split, args.image_size, args.num_objects, args.seed)
                for i in range(args.count)]
    batch = torch.stack([_tensor_from_uint8(e.image) for e in examples])
    per_row = 8
    save_grid([batch[i:i + per_row] for i in range(0, len(batch), per_row)], args.out)
    exact = 0
    for i, e in enumerate(examples):
        truth = {"objects": e.objects, "relation": e.relation}
        verdict = match_attributes(analyze_image(e.image, args.num_objects), truth)
        exact += verdict["exact"]
        wrong = [k for k, v in verdict.items() if k != "exact" and not v]
        print(f"[{args.start + i}] analyzer: {'ok' if verdict['exact'] else 'WRONG ' + ','.join(wrong)}")
        for c in e.captions:
            print(f"    {c}")
    print(f"analyzer exact: {exact}/{len(examples)}; grid written to {args.out}")


def _cmd_export(args):
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise ValueError(f"--out {out} is not empty (use --force to write into it)")
    from tqdm import tqdm
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    lines = []
    for i in tqdm(range(args.start, args.start + args.count), desc="export"):
        e = shapes_example(i, args.split, args.image_size, args.num_objects, args.seed)
        rel = f"images/{args.split}_{i:06d}.png"
        Image.fromarray(e.image, "RGB").save(os.path.join(out, rel))
        lines.append(json.dumps({"image": rel, "captions": e.captions, "objects": e.objects,
                                 "relation": e.relation}))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp_", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "captions.jsonl"))
    print(f"wrote {args.count} images and captions.jsonl to {out}")


def main(argv=None):
    parser = ArgumentParser(prog="data.py", description="Captioned shapes (see SHAPES.md): preview or export.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = dict(split=dict(choices=SPLITS, default="train", help="which split"),
                  image_size=dict(type=_int_in(32, 512), default=64, help="pixels, 32..512"),
                  num_objects=dict(type=_int_in(1, 2), default=1, help="objects per image, 1 or 2"),
                  seed=dict(type=_int_in(0, 2**32 - 1), default=0, help="dataset seed"),
                  start=dict(type=_int_in(0, 2**62), default=0, help="first index"))
    show = sub.add_parser("show", formatter_class=fmt,
                          help="write a preview grid; print captions and the analyzer's verdict")
    show.add_argument("--count", type=_int_in(1, 1024), default=16, help="number of examples")
    show.add_argument("--out", default="out/shapes_preview.png", help="PNG to write")
    export = sub.add_parser("export", formatter_class=fmt,
                            help="write PNG images and captions.jsonl to a folder")
    export.add_argument("--out", required=True, help="folder to write (images/ and captions.jsonl)")
    export.add_argument("--count", type=_int_in(1, 10_000_000), required=True, help="number of examples")
    export.add_argument("--force", action="store_true", help="write into a non-empty folder")
    for p in (show, export):
        for name, kw in common.items():
            p.add_argument("--" + name.replace("_", "-"), **kw)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            _cmd_show(args)
        else:
            _cmd_export(args)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"data.py: error: {e}\n")
        sys.exit(2 if isinstance(e, ValueError) else 1)


if __name__ == "__main__":
    main()
