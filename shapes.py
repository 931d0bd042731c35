"""
The built-in captioned shapes dataset and its pixel analyzer.

Every example is generated on the fly, the same
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

CLI: `python shapes.py show ...` previews the shapes, `python shapes.py export ...` writes them
as an ordinary image folder plus captions.jsonl (a valid `prepare.py --source jsonl`).
"""

import argparse
import itertools
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

import runtime

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


def render_caption(template, values):
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
        return [render_caption(TEMPLATES_1[t], {"size": o["size"], "colour": o["colour"], "shape": o["shape"],
                                         "pos": pick(POSITION_PHRASES[o["position"]])})
                for t in chosen]
    chosen = rng.permutation(len(TEMPLATES_2))[:CAPTIONS_PER_IMAGE]
    captions = []
    for t in chosen:
        values = {"rel": pick(RELATION_PHRASES[relation])}
        for k, o in enumerate(objects, start=1):
            values.update({f"size{k}": o["size"], f"colour{k}": o["colour"], f"shape{k}": o["shape"],
                           f"pos{k}": pick(POSITION_PHRASES[o["position"]])})
        captions.append(render_caption(TEMPLATES_2[t], values))
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


def check_shapes_args(split, num_objects, image_size):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects!r}")
    if not 32 <= image_size <= 512:
        raise ValueError(f"image_size must be in 32..512, got {image_size!r}")


def shapes_example(index: int, split: str = "train", image_size: int = 64, num_objects: int = 1,
                   seed: int = 0, recolour: bool = False) -> ShapesExample:
    """Example `index` of a split. The scene and captions depend on (seed, split,
    num_objects, index) only, so the same index at 64 and 256 px shows the same scene.
    recolour=True gives every object a colour drawn from all COLOURS instead, by a generator of
    its own: the same scene (shape, size, place, background, noise) in other colours, any
    colour/shape pair included; the captions follow the new colours."""
    check_shapes_args(split, num_objects, image_size)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = _example_rng(seed, split, num_objects, index)
    objects, relation, placements = _sample_scene(rng, split, num_objects)
    if recolour:
        names = sorted(COLOURS)
        crng = np.random.default_rng([seed, SPLITS.index(split), num_objects, index, 1])
        objects = [{**o, "colour": names[int(crng.integers(len(names)))]} for o in objects]
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
    per_row, pad, side = 8, 2, args.image_size
    rows = -(-len(examples) // per_row)
    grid = np.full((pad + rows * (side + pad), pad + min(per_row, len(examples)) * (side + pad), 3), 255, np.uint8)
    for i, e in enumerate(examples):
        y, x = pad + (i // per_row) * (side + pad), pad + (i % per_row) * (side + pad)
        grid[y:y + side, x:x + side] = e.image
    runtime.write_atomic(args.out, lambda f: Image.fromarray(grid, "RGB").save(f, format="PNG"))
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
    runtime.write_text(os.path.join(out, "captions.jsonl"), "\n".join(lines) + "\n")
    print(f"wrote {args.count} images and captions.jsonl to {out}")


def main(argv=None):
    parser = runtime.ArgumentParser(prog="shapes.py", description="Captioned shapes: preview or export.")
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
        sys.stderr.write(f"shapes.py: error: {e}\n")
        sys.exit(2 if isinstance(e, ValueError) else 1)


if __name__ == "__main__":
    main()
