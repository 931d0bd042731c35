"""
Data for L-Verse, beside the built-in shapes (shapes.py): real images, caption files,
Fashion-MNIST and the token arrays BiART trains on.

1. Real images: `load_image` (robust decoding to RGB, one exception type), crops,
   `ImageFolder` (skips unreadable files), `save_grid`, `split_indices`.
2. Fashion-MNIST, real photos with captions from templates: `read_idx` (the idx format, one-line
   errors), `read_fashion_mnist`, `fashion_image` (28 px -> a 32 px RGB image, dark on white),
   `fashion_captions` (training paraphrases) and FASHION_HELDOUT_TEMPLATES (never trained on),
   `parse_fashion_caption` (the class a caption names).
"""

import gzip
import json
import math
import os
import random
import re
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps

import biart
import runtime
import shapes

# -----------------------------------------------------------------------------
# Real images


class ImageError(ValueError):
    """An image file that cannot be used; the message names the path and the reason."""


MAX_PIXELS = 89_478_485  # refuse larger images (PIL's own bomb threshold; 50 MP photos are fine)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
        raise ImageError(f"cannot load image {path}: too large ({runtime.first_line(e)})") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
            MemoryError, ZeroDivisionError) as e:  # what PIL's plugins raise on bad data
        raise ImageError(f"cannot load image {path}: {runtime.first_line(e)}") from None


def from_uint8(a) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float32 in [-1, 1]."""
    a = np.array(a, dtype=np.uint8)  # a copy: arrays from PIL are read-only
    return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1.0


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image (see load_image), got mode {img.mode}")
    return from_uint8(np.asarray(img, dtype=np.uint8))


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
    runtime.write_atomic(path, lambda f: Image.fromarray(grid, "RGB").save(f, format="PNG"))


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

# -----------------------------------------------------------------------------
# The built-in captioned shapes (shapes.py) as a dataset of tensors


class ShapesDataset(torch.utils.data.Dataset):
    """`length` examples of a split as (3, H, W) float32 tensors in [-1, 1]; recolour=True
    draws each object in a random colour (shapes.shapes_example)."""

    def __init__(self, split="train", length=10000, image_size=64, num_objects=1, seed=0, recolour=False):
        shapes.check_shapes_args(split, num_objects, image_size)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length!r}")
        self.split, self.length, self.image_size = split, length, image_size
        self.num_objects, self.seed, self.recolour = num_objects, seed, recolour

    def __len__(self):
        return self.length

    def example(self, i) -> shapes.ShapesExample:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length}")
        return shapes.shapes_example(int(i), self.split, self.image_size, self.num_objects, self.seed, self.recolour)

    def __getitem__(self, i) -> torch.Tensor:
        return from_uint8(self.example(i).image)


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
        raise ImageError(f"{path}: not a readable idx file ({runtime.first_line(e)})") from None
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
    return shapes.render_caption(template, {"a": "an" if noun[0] in "aeiou" else "a", "noun": noun})


def fashion_captions(label: int, index: int, split: str = "train", seed: int = 0) -> list:
    """CAPTIONS_PER_IMAGE training paraphrases of image `index` of a split, drawn without
    replacement from FASHION_TEMPLATES; they depend on (seed, split, index) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(f"fashion/{split}".encode()), index]))
    chosen = rng.choice(len(FASHION_TEMPLATES), size=shapes.CAPTIONS_PER_IMAGE, replace=False)
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
# Captioned image sources (what prepare.py encodes and evaluate.py scores): split -> list of
# items (name, path or shapes index or pixels, captions or None[, extra JSON fields for the
# split's .jsonl line])

SOURCES = ("shapes", "coco", "cc", "jsonl", "fashion-mnist")
COCO_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # Karpathy -> ours
CROP_SUPERSAMPLE = 2  # shapes: crops are cut from a rendering at 2x (max 512 px), then resized down

def _clean_captions(captions) -> list:
    if isinstance(captions, str):
        captions = [captions]
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def _read_cc(path: str, root: str) -> list:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'caption<TAB>image path', got {len(fields)} field(s)")
            caption, rel = fields
            items.append((rel, os.path.join(root, rel), _clean_captions(caption)))
    return items


def _read_jsonl(path: str, root: str) -> list:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with an \"image\" path")
            caps = rec.get("caption", rec.get("captions"))
            if not isinstance(caps, (str, list)):
                raise ValueError(f"{path}:{lineno}: expected \"caption\": a string or a list of strings")
            items.append((rec["image"], os.path.join(root, rec["image"]), _clean_captions(caps)))
    return items


def _read_coco(path: str, root: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Karpathy dataset_coco.json ({type(e).__name__}: {e})") from None
    splits = {"train": [], "val": [], "test": []}
    for k, im in enumerate(images):
        try:
            split = COCO_SPLITS[im["split"]]
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            caps = _clean_captions([s["raw"] for s in im["sentences"]])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: image entry {k} lacks {e} (needs filepath, filename, split, sentences)") from None
        splits[split].append((rel, os.path.join(root, rel), caps))
    return splits


def _fashion_items(root: str, val_fraction: float, seed: int) -> dict:
    """Fashion-MNIST: train less a validation slice, the slice, and the official test images."""

    def items(official: str, indices) -> list:
        images, labels = read_fashion_mnist(root, official)
        return [(f"{official}/{i}", images[i], fashion_captions(int(labels[i]), i, official, seed),
                 {"label": int(labels[i]), "class": FASHION_CLASSES[labels[i]]}) for i in indices]

    train_idx, val_idx = split_indices(len(read_fashion_mnist(root, "train")[0]), val_fraction, seed)
    out = {"train": items("train", train_idx), "val": items("train", val_idx),
           "test": items("test", range(len(read_fashion_mnist(root, "test")[0])))}
    return {k: v for k, v in out.items() if v}


def list_items(source: str, *, captions: str = "", val_captions: str = "", image_root: str = "",
               val_fraction: float = 0.01, seed: int = 0, fashion_root: str = FASHION_ROOT,
               shapes_sizes: dict | None = None) -> dict:
    """{split: [(name, path or shapes index or pixels, captions or None[, extra])]} in the order
    rows are written. shapes: `shapes_sizes` {split: images}; coco: the Karpathy `captions`
    file; cc / jsonl: `captions` (train) and `val_captions`, or `val_fraction` of `captions`
    held out; fashion-mnist: the idx files in `fashion_root`."""
    if source == "shapes":
        out = {}
        for split, n in (shapes_sizes or {}).items():
            if split not in shapes.SPLITS:
                raise ValueError(f"shapes split {split!r}: the splits are {', '.join(shapes.SPLITS)}")
            if n < 0:
                raise ValueError(f"{split} size must be >= 0, got {n}")
            if n:
                out[split] = [(f"{split}/{i}", i, None) for i in range(n)]
        return out
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "fashion-mnist":
        return _fashion_items(fashion_root, val_fraction, seed)
    path = captions
    if not path:
        raise ValueError(f"--source {source} needs --captions FILE")
    for p in (path, val_captions):
        if p and not os.path.isfile(p):
            raise FileNotFoundError(f"--captions {p}: no such file")
    root = image_root or os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--image-root {root}: no such folder")
    if source == "coco":
        return {k: v for k, v in _read_coco(path, root).items() if v}
    read = _read_cc if source == "cc" else _read_jsonl
    train = read(path, root)
    if not train:
        raise ValueError(f"{path}: holds no images")
    if val_captions:
        val = read(val_captions, root)
    else:
        train_idx, val_idx = split_indices(len(train), val_fraction, seed)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    return {k: v for k, v in (("train", train), ("val", val)) if v}


class Views(torch.utils.data.Dataset):
    """Items of one split of `source` (list_items), the first at index `first` of its split ->
    (centre view (3, S, S), K random crops (K, 3, S, S), ok, error, captions as JSON). A crop
    depends on (seed, split, index) alone; an unusable image gives ok False and the reason."""

    def __init__(self, source: str, split: str, items: list, first: int, image_size: int, crops: int,
                 num_objects: int = 1, seed: int = 0):
        self.source, self.split, self.items, self.first = source, split, items, first
        self.size, self.crops, self.num_objects, self.seed = image_size, crops, num_objects, seed

    def __len__(self):
        return len(self.items)

    def _load(self, item) -> tuple:
        """-> (centre image, image to crop from, captions)."""
        name, where, captions = item[:3]
        if self.source == "fashion-mnist":  # where: the (28, 28) pixels
            img = fashion_image(where, self.size)
            big = fashion_image(where, min(512, CROP_SUPERSAMPLE * self.size)) if self.crops else img
            return img, big, captions
        if self.source == "shapes":
            ex = shapes.shapes_example(where, self.split, self.size, self.num_objects, self.seed)
            img = Image.fromarray(ex.image, "RGB")
            big = img
            if self.crops:  # the same scene at a higher resolution: crops are resized down, not up
                side = min(512, CROP_SUPERSAMPLE * self.size)
                big = Image.fromarray(shapes.shapes_example(where, self.split, side, self.num_objects,
                                                        self.seed).image, "RGB")
            return img, big, ex.captions
        if not captions:
            raise ImageError(f"{where}: no caption")
        img = load_image(where)
        return img, img, captions

    def __getitem__(self, k):
        i = self.first + k  # index of the item within its split
        S, K = self.size, self.crops
        try:
            img, big, captions = self._load(self.items[k])
        except ImageError as e:
            return torch.zeros(3, S, S), torch.zeros(K, 3, S, S), False, str(e), "[]"
        centre = to_tensor(center_crop_resize(img, S))
        rng = random.Random(f"{self.seed}/{self.split}/{i}")  # str seeds are stable
        crops = [to_tensor(random_crop_resize(big, S, rng)) for _ in range(K)]
        crops = torch.stack(crops) if crops else torch.zeros(0, 3, S, S)
        return centre, crops, True, "", json.dumps(captions)


# ----------------------------------------------------------------------------------------
# Token arrays: the folder prepare.py writes ({split}.npy, {split}_crops.npy, {split}.jsonl,
# meta.json), read by train_gpt.py as (caption ids, image tokens) pairs

TOKENS_FORMAT = 1  # of prepare.py's output folder (meta.json says which)


META_FIELDS = {"codebook_size": int, "image_len": int, "splits": dict, "vae": str, "vae_sha256": str,
               "source": str}  # what train_gpt.py reads from meta.json


def read_meta(folder: str) -> dict:
    """The folder's meta.json, checked: a missing, cut-short or foreign one is a one-line
    error naming the file, before anything is trained or written."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--tokens {folder}: no such folder (run prepare.py first)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokens {folder}: no meta.json (is prepare.py finished there?)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else runtime.first_line(e)
        raise ValueError(f"could not read {path}: not valid JSON ({reason}{where}); the file is truncated "
                         f"or damaged: run prepare.py again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a prepare.py meta.json (a JSON {type(meta).__name__}, not an object)")
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise ValueError(f"{path}: not a prepare.py meta.json ({key!r} is {value!r}, expected "
                             f"{'a positive integer' if kind is int else 'a ' + kind.__name__})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise ValueError(f"{path}: not a prepare.py meta.json ('format_version' is {version!r})")
    if version > TOKENS_FORMAT:
        raise ValueError(f"{path}: format {version} is newer than this code understands")
    for split in ("train", "val"):
        if split not in meta["splits"]:
            raise ValueError(f"--tokens {folder}: has no {split!r} split")
    return meta


def open_token_array(path: str) -> np.ndarray:
    """np.load(path, mmap_mode='r') of a prepare.py array with a one-line error naming the file.
    numpy's own messages for a cut-short file ("mmap length is greater than file size", an
    EOFError "No data left in file") name neither the file nor the cause."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is prepare.py finished there?)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        size = os.path.getsize(path)
        if size == 0:
            reason = "the file is empty (0 bytes)"
        else:
            try:  # the size the header promises, when the header itself is whole
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                    want = f.tell() + math.prod(shape) * dtype.itemsize
                reason = f"the file is truncated ({size:,} of the {want:,} bytes its header promises)"
            except Exception:
                reason = f"the file is truncated or not a .npy array ({runtime.first_line(e)[:200]})"
        raise ValueError(f"could not read {path}: {reason}; run prepare.py again") from None
    if arr.dtype.kind not in "ui":
        raise ValueError(f"{path}: holds {arr.dtype} values, not integer token ids")
    return arr


def check_token_ids(arr: np.ndarray, vocab: int, path: str) -> None:
    """A ValueError naming the file and the first image with a token id outside [0, vocab).
    It reads the whole (memory-mapped) array once, in ~32 MB chunks, when the set is opened:
    about a second per GB from disk, so seconds to a minute for the paper's arrays (~7 GB with
    crops, once per process; the ranks share the page cache) against a run of hours. In exchange
    a bad id stops the run before a flag, a log line or a checkpoint is written, where a check per
    batch (biart.build_sequence still makes one) finds it only when that image is drawn, perhaps
    days in, and without naming the file."""
    if not len(arr):
        return
    rows = max(1, (16 << 20) // max(1, arr[0].size))
    for lo in range(0, len(arr), rows):
        chunk = np.asarray(arr[lo:lo + rows])
        if chunk.max() < vocab and (arr.dtype.kind == "u" or chunk.min() >= 0):
            continue
        bad = ((chunk >= vocab) | (chunk < 0)).reshape(len(chunk), -1)
        row = int(bad.any(axis=1).argmax())
        value = int(chunk.reshape(len(chunk), -1)[row][bad[row].argmax()])
        raise ValueError(f"{path}: image {lo + row} holds token id {value}, outside the codebook "
                         f"[0, {vocab}) of meta.json: the array is damaged or from another VAE; "
                         f"run prepare.py again")


def read_captions(path: str) -> list:
    """The captions of each line of a prepare.py {split}.jsonl, one list per image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is prepare.py finished there?)")
    captions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                caps = json.loads(line)["captions"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"could not read {path}:{lineno}: not a prepare.py line "
                                 f"({runtime.first_line(e)[:100]}); the file is truncated or damaged") from None
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{path}:{lineno}: 'captions' must be a non-empty list of strings")
            captions.append(caps)
    return captions


class TokenCaptions(torch.utils.data.Dataset):
    """One split of a prepare.py folder -> (text (text_len,), image (image_len,)) LongTensors in
    BiART's id space. Training (`train=True`): each call draws, from random.Random(seed, epoch,
    index), one caption of the image, one view (centre or crop), and the caption's BPE-dropout
    segmentation. A dropout segmentation too long for text_len falls back to the plain one
    (checked to fit when the set is loaded). Validation: view 0, caption index % count, no dropout."""

    def __init__(self, folder: str, split: str, tok, config,
                 train: bool, bpe_dropout: float, seed: int, truncate: bool):
        self.tok, self.config, self.train = tok, config, train
        self.bpe_dropout, self.seed, self.truncate = bpe_dropout, seed, truncate
        path = os.path.join(folder, f"{split}.npy")
        self.tokens = open_token_array(path)  # (N, image_len) uint16
        crops = os.path.join(folder, f"{split}_crops.npy")
        self.crops = open_token_array(crops) if train and os.path.exists(crops) else None  # (N, K, L)
        self.captions = read_captions(os.path.join(folder, f"{split}.jsonl"))
        if len(self.captions) != len(self.tokens):
            raise ValueError(f"{folder}: {split}.jsonl has {len(self.captions)} lines for {len(self.tokens)} images")
        if self.tokens.ndim != 2 or self.tokens.shape[1] != config.image_len:
            raise ValueError(f"{folder}/{split}.npy: shape {self.tokens.shape}, expected (N, {config.image_len})")
        if self.crops is not None and (self.crops.ndim != 3 or self.crops.shape[0] != len(self.tokens)
                                       or self.crops.shape[2] != config.image_len):
            raise ValueError(f"{crops}: shape {self.crops.shape}, expected ({len(self.tokens)}, K, {config.image_len})")
        check_token_ids(self.tokens, config.image_vocab, path)
        if self.crops is not None:
            check_token_ids(self.crops, config.image_vocab, crops)
        self.epoch = 0
        self.truncated = 0
        for i, caps in enumerate(self.captions):  # every caption must fit without dropout
            for c in caps:
                n = len(tok.encode(c))
                if n == 0:
                    raise ValueError(f"{split} image {i}: caption {c[:60]!r} is empty after cleanup")
                if n > config.text_len - 1:
                    if not truncate:
                        short = c if len(c) <= 80 else c[:77] + "..."
                        raise ValueError(f"{split} image {i}: caption {short!r} has {n} tokens + end-of-text, "
                                         f"more than text_len {config.text_len}; raise --text-len or pass --truncate")
                    self.truncated += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        caps = self.captions[i]
        if self.train:
            rng = random.Random(f"{self.seed}/{self.epoch}/{i}")  # str seeds are stable across runs
            caption = caps[rng.randrange(len(caps))]
            K = 0 if self.crops is None else self.crops.shape[1]
            view = rng.randrange(1 + K)
            image = self.tokens[i] if view == 0 else self.crops[i, view - 1]
            ids = self.tok.encode(caption, dropout=self.bpe_dropout, rng=rng) if self.bpe_dropout else None
            if ids is None or len(ids) > self.config.text_len - 1:
                ids = self.tok.encode(caption)
        else:
            caption, image = caps[i % len(caps)], self.tokens[i]
            ids = self.tok.encode(caption)
        text = biart.caption_to_model(ids, self.config, truncate=self.truncate)  # (text_len,)
        return text, torch.from_numpy(image.astype(np.int64))  # (text_len,), (image_len,)
