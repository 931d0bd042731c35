"""
Data for L-Verse, beside the built-in shapes (shapes.py): real images, caption files,
img2dataset shards, Fashion-MNIST and the token arrays BiART trains on.

1. Real images: `load_image` (robust decoding to RGB, one exception type), crops,
   `ImageFolder` (skips unreadable files), `save_grid`, `split_indices`.
2. img2dataset shards (WebDataset tar files or `files` folders), read member by member:
   `list_shards` (brace ranges, globs), `shard_samples` (per sample, with why it is unusable),
   `ShardViews` (prepare.py's reader), `ShardImages`/`ShardBatches` (train_vae.py's endless,
   shuffled, rank- and worker-split stream with a resume position), `held_out` (the split).
3. Fashion-MNIST, real photos with captions from templates: `read_idx` (the idx format, one-line
   errors), `read_fashion_mnist`, `fashion_image` (28 px -> a 32 px RGB image, dark on white),
   `fashion_captions` (training paraphrases) and FASHION_HELDOUT_TEMPLATES (never trained on),
   `parse_fashion_caption` (the class a caption names).
"""

import bisect
import glob
import gzip
import io
import json
import math
import mmap
import os
import random
import re
import tarfile
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


def load_image(path, content: bytes | None = None) -> Image.Image:
    """Decode an image file fully into an RGB PIL image, EXIF orientation applied. Alpha is
    composited on white; 16-bit data is scaled to 8 bits. Raises ImageError for anything
    that is not a complete, readable image of at most MAX_PIXELS pixels. With `content` (the
    file's bytes, e.g. a member of a tar shard) `path` only names it in messages."""
    path = os.fspath(path)
    try:
        if content is None and not os.path.isfile(path):
            raise ImageError(f"cannot load image {path}: no such file")
        if (len(content) if content is not None else os.path.getsize(path)) == 0:
            raise ImageError(f"cannot load image {path}: empty file")
        with warnings.catch_warnings():  # PIL's decompression-bomb warning -> an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path if content is None else io.BytesIO(content))
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
    raise ImageError(f"no {name}(.gz) in {root}: get the files with `apt-get install dataset-fashion-mnist` "
                     f"(Debian, Ubuntu) or give --fashion-root the folder that holds them")


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
        try:
            images, labels = _check_fashion(root, split, paths)
        except ImageError as e:
            raise ImageError(f"{e}; a fresh copy: `apt-get install --reinstall dataset-fashion-mnist`") from None
        if len(_FASHION_CACHE) >= 4:  # the two official splits of a root or two
            _FASHION_CACHE.pop(next(iter(_FASHION_CACHE)))
        _FASHION_CACHE[key] = (images, labels.astype(np.int64))
    return _FASHION_CACHE[key]


def _check_fashion(root: str, split: str, paths: tuple) -> tuple:
    """Read and check one split's images and labels; an ImageError naming what is wrong."""
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
    return images, labels


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


def centre_and_crops(img: Image.Image, big: Image.Image, size: int, crops: int, seed: str) -> tuple:
    """What prepare.py encodes of an image: its centre view (3, S, S) and `crops` random crops
    (K, 3, S, S) of `big` (the same image, perhaps at a higher resolution), drawn from
    random.Random(seed) (a str seed: stable across runs and processes)."""
    rng = random.Random(seed)
    views = [to_tensor(random_crop_resize(big, size, rng)) for _ in range(crops)]
    return (to_tensor(center_crop_resize(img, size)),
            torch.stack(views) if views else torch.zeros(0, 3, size, size))


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
        centre, crops = centre_and_crops(img, big, S, K, f"{self.seed}/{self.split}/{i}")
        return centre, crops, True, "", json.dumps(captions)


# ----------------------------------------------------------------------------------------
# img2dataset shards: WebDataset tar files (per sample KEY.jpg + KEY.txt [+ KEY.json], the
# files of a sample adjacent) or the same layout as plain folders (img2dataset's
# --output_format files), read member by member: nothing lists the whole set in memory.


class ShardError(ValueError):
    """A shard that cannot be read through (missing, not a tar, truncated); the message names it."""


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTION_EXTENSIONS = (".txt", ".json")  # the caption, and img2dataset's metadata (its "caption" field too)
SKIP_REASONS = ("undecodable image", "no caption", "empty caption", "unknown extension", "no image")


def expand_braces(pattern: str) -> list:
    """Shell-style braces, left to right: 'a/{00000..00002}.tar' -> a/00000.tar, a/00001.tar,
    a/00002.tar (zero padding kept, as bash does); '{x,y}' lists. Other braces stay as they are."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        if int(hi) < int(lo):
            raise ValueError(f"{pattern}: the range {{{body}}} runs backwards")
        padded = any(len(v) > 1 and v.startswith("0") for v in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    elif "," in body:
        values = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [p for v in values for p in expand_braces(head + v + tail)]


def list_shards(spec: str) -> list:
    """A shard spec -> shard paths, in order, each once: braces expanded (expand_braces), then
    globs (each sorted). A folder of tar files -> those; a folder of img2dataset's `files` output
    (subfolders 00000/, 00001/, ...) -> its subfolders; a folder of sample files -> itself. A
    plain path that names nothing stays (reading it reports the shard missing, the others go on);
    a glob that matches nothing is an error."""
    if not spec:
        raise ValueError("no shards given (e.g. --shards 'cc3m/{00000..00331}.tar')")
    found = []
    for p in expand_braces(spec):
        if any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise ValueError(f"{spec}: {p} matches no file" if p != spec else f"{spec} matches no file")
            found += hits
        elif os.path.isdir(p):
            entries = sorted(e for e in os.listdir(p) if not e.startswith("."))
            tars = [os.path.join(p, e) for e in entries if e.lower().endswith(SHARD_SUFFIXES)]
            subs = [os.path.join(p, e) for e in entries if os.path.isdir(os.path.join(p, e))]
            found += tars or subs or [p]
        else:
            found.append(p)
    return list(dict.fromkeys(found))


def is_shard_spec(spec: str) -> bool:
    """Whether a --data value names tar shards (a brace range, a glob or a .tar path)."""
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}|[*?\[]", spec)) or spec.lower().endswith(SHARD_SUFFIXES)


def shard_members(path: str):
    """-> (member name, bytes) of every file in a shard, in the shard's order (a folder: sorted
    by name). A missing, unreadable or truncated shard raises ShardError after the members
    before the damage; a whole tar ends with two zero blocks, which is how a cut at a member
    boundary is told from the end."""
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if not name.startswith(".") and os.path.isfile(full):
                with open(full, "rb") as f:
                    yield name, f.read()
        return
    if not os.path.exists(path):
        raise ShardError(f"shard {path}: no such file or folder")
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if compressed else raw  # .tar.gz: decompressed once, in order
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if m.isfile():
                        yield m.name, tf.extractfile(m).read()
                end = tf.offset
            f.seek(end)
            tail = f.read(1024)
            if len(tail) < 1024 or tail.strip(b"\0"):
                raise ShardError(f"shard {path}: truncated tar (it ends inside or right after a member, "
                                 f"at byte {end:,}{' of the decompressed data' if compressed else ''}, without "
                                 f"the end-of-archive blocks); fetch it again")
            while compressed and f.read(1 << 20):
                pass  # to the end of the gzip stream, which raises EOFError when it is cut short
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ShardError(f"shard {path}: truncated or not a tar file ({runtime.first_line(e)}); fetch it again") from None


def _split_name(name: str) -> tuple:
    """'dir/000012.jpg' -> ('dir/000012', '.jpg'): WebDataset's key is the name up to the first
    dot of its last part; the rest is the extension (lower case)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, (dot + ext).lower()


def _sample(key: str, members: list, caption_field: str) -> dict:
    """One sample's members [(ext, bytes)] -> {key, image, image_ext, caption, reason}."""
    by_ext = dict(members)
    image_ext = next((e for e, _ in members if e in IMAGE_EXTENSIONS), None)
    out = {"key": key, "image": by_ext.get(image_ext), "image_ext": image_ext, "caption": None, "reason": ""}
    if image_ext is None:
        known = IMAGE_EXTENSIONS + CAPTION_EXTENSIONS
        out["reason"] = "unknown extension" if any(e not in known for e, _ in members) else "no image"
        return out
    caption = None
    if not caption_field and ".txt" in by_ext:
        caption = by_ext[".txt"].decode("utf-8", errors="replace")
    elif ".json" in by_ext:
        try:
            record = json.loads(by_ext[".json"])
            caption = record.get(caption_field or "caption") if isinstance(record, dict) else None
        except ValueError:
            caption = None
        caption = caption if isinstance(caption, str) else None
    out["caption"] = caption
    if caption is None:
        out["reason"] = "no caption"
    elif not caption.strip():
        out["reason"] = "empty caption"
    return out


def shard_samples(path: str, caption_field: str = ""):
    """-> one dict per sample of a shard: key, image (bytes or None), image_ext, caption (from
    .txt, or the `caption_field` of .json; img2dataset's .json also holds "caption") and reason:
    '' or, for a sample unusable before any decoding, one of SKIP_REASONS."""
    key, members = None, []
    for name, content in shard_members(path):
        k, ext = _split_name(name)
        if k != key and members:
            yield _sample(key, members, caption_field)
            members = []
        key = k
        members.append((ext, content))
    if members:
        yield _sample(key, members, caption_field)


def held_out(key: str, val_fraction: float, seed: int) -> bool:
    """Whether a shard sample is in the validation split: a hash of (seed, key), so the split
    depends on neither the process count nor the shard order (prepare.py and train_vae.py
    hold out the same samples with the same --seed)."""
    return zlib.crc32(f"{seed}/{key}".encode()) < val_fraction * 2 ** 32


def shard_image(path: str, sample: dict) -> Image.Image:
    """A shard sample's decoded image (load_image: ImageError when it is not whole)."""
    return load_image(f"{path}:{sample['key']}{sample['image_ext']}", sample["image"])


class ShardViews(torch.utils.data.IterableDataset):
    """prepare.py's reader of shards: `jobs` [(job, shard path, split: 'train', 'val' or 'auto'
    (held_out by key))] -> for each job, batches {job, split, centre (B, 3, S, S), crops
    (B, K, 3, S, S), names, captions} of up to `batch_size` usable samples in shard order (K
    random crops for train, from random.Random(seed, split, key)), then {job, end: True,
    skipped: {reason: count}, members: [[name, reason]], error: '' or the shard's one line}.
    DataLoader worker w of W takes jobs w, w + W, ...; a batch depends on its shard alone."""

    def __init__(self, jobs: list, image_size: int, crops: int, seed: int, val_fraction: float,
                 caption_field: str, batch_size: int):
        super().__init__()
        self.jobs, self.size, self.crops, self.seed = jobs, image_size, crops, seed
        self.val_fraction, self.caption_field, self.batch_size = val_fraction, caption_field, batch_size

    def _batch(self, job, split, pending):
        return {"job": job, "split": split, "centre": torch.stack([p[0] for p in pending]),
                "crops": torch.stack([p[1] for p in pending]), "names": [p[2] for p in pending],
                "captions": [p[3] for p in pending]}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        for job, path, rule in self.jobs[w::W]:
            pending, skipped, members, error = {"train": [], "val": []}, {}, [], ""
            label = os.path.basename(path.rstrip(os.sep))
            try:
                for s in shard_samples(path, self.caption_field):
                    name, reason = f"{label}/{s['key']}", s["reason"]
                    detail = reason
                    if not reason:
                        try:
                            img = shard_image(path, s)
                        except ImageError as e:
                            reason, detail = "undecodable image", str(e)
                    if reason:
                        skipped[reason] = skipped.get(reason, 0) + 1
                        members.append([name, detail])
                        continue
                    split = rule if rule != "auto" else ("val" if held_out(s["key"], self.val_fraction, self.seed)
                                                         else "train")
                    K = self.crops if split == "train" else 0  # the shard's name is not in the seed
                    views = centre_and_crops(img, img, self.size, K, f"{self.seed}/{split}/{s['key']}")
                    pending[split].append((*views, name, s["caption"].strip()))
                    if len(pending[split]) == self.batch_size:
                        yield self._batch(job, split, pending[split])
                        pending[split] = []
            except ShardError as e:
                error = str(e)
            for split, rest in pending.items():
                if rest and not error:
                    yield self._batch(job, split, rest)
            yield {"job": job, "end": True, "skipped": skipped, "members": members, "error": error}


def skip_kind(reason: str) -> str:
    """The kind of a skip message (load_image's, a shard's), for the totals a run reports."""
    for kind, words in (("missing file", ("no such file",)), ("empty file", ("empty file",)),
                        ("too large", ("too large", "MAX_PIXELS")), ("unreadable shard", ("shard ",))):
        if any(w in reason for w in words):
            return kind
    return next((r for r in SKIP_REASONS if reason.startswith(r)), "undecodable image")


class Skipped:
    """The main process's tally of what a training run skipped (the workers find it): each name
    once, logged when first met (the first `show`), counted by skip_kind."""

    def __init__(self, log, show: int = 20):
        self.log, self.show, self.seen, self.kinds = log, show, set(), {}

    def add(self, entries) -> None:
        """entries: strings of 'name<TAB>reason' lines, as WithSkips and ShardImages yield them."""
        for entry in entries:
            for line in filter(None, entry.split("\n")):
                name, _, reason = line.partition("\t")
                if name in self.seen:
                    continue
                self.seen.add(name)
                kind = skip_kind(reason)
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                if len(self.seen) <= self.show:
                    self.log(f"skipped {name}: {reason}" + (" (further skips are counted, not listed)"
                                                             if len(self.seen) == self.show else ""))

    def summary(self) -> str:
        return (f"{len(self.seen)} skipped: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
                if self.seen else "nothing skipped")


class WithSkips(torch.utils.data.Dataset):
    """An image dataset with `bad_files` (ImageFolder, or a Subset of one) -> (image, the
    'name<TAB>reason' lines of the files this call found unreadable): what a DataLoader worker
    finds reaches the main process with the batch."""

    def __init__(self, ds):
        self.ds = ds
        self.base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, i):
        before = len(self.base.bad_files)
        x = self.ds[i]
        return x, "".join(f"{p}\t{r}\n" for p, r in self.base.bad_files[before:])


def _shard_order(n: int, seed: int, epoch: int) -> list:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


class ShardImages(torch.utils.data.IterableDataset):
    """train_vae.py's endless training images from tar shards. Epoch e visits the shards in an
    order drawn from (seed, e); rank r reads every world-th shard of it (its `mine`), DataLoader
    worker w of W every W-th of those, starting at position `start` = (epoch, position in mine)
    (a resume); the samples pass a shuffle buffer of `buffer` images per worker, each a random
    75-100% crop drawn from (seed, epoch, key). held_out samples (the validation images) are
    left out. Yields (image (3, S, S), epoch, worker, shards this worker finished in that epoch,
    skipped 'name<TAB>reason' lines): ShardBatches turns the last three into the position to
    resume from."""

    def __init__(self, shards: list, image_size: int, rank: int, world: int, seed: int, val_fraction: float,
                 buffer: int, start: tuple = (0, 0)):
        super().__init__()
        if len(shards) < world:
            raise ValueError(f"{len(shards)} shard(s) for {world} processes: each process needs one")
        self.shards, self.size, self.rank, self.world, self.seed = shards, image_size, rank, world, seed
        self.val_fraction, self.buffer, self.start = val_fraction, buffer, start

    def mine(self, epoch: int) -> list:
        return [self.shards[i] for i in _shard_order(len(self.shards), self.seed, epoch)[self.rank::self.world]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info else (0, 1)
        epoch, first = self.start
        rng = random.Random(f"{self.seed}/{self.rank}/{w}/{epoch}/{first}")
        buf, skipped = [], ""
        while True:
            mine, done = self.mine(epoch), 0
            for pos in range(first + w, len(mine), W):
                path = mine[pos]
                try:
                    for s in shard_samples(path):
                        name = f"{os.path.basename(path)}/{s['key']}"
                        if s["image_ext"] is None:  # a caption is not needed here
                            skipped += f"{name}\t{s['reason']}\n"
                            continue
                        if held_out(s["key"], self.val_fraction, self.seed):
                            continue
                        try:
                            img = shard_image(path, s)
                        except ImageError as e:
                            skipped += f"{name}\t{e}\n"
                            continue
                        crop = random_crop_resize(img, self.size, random.Random(f"{self.seed}/{epoch}/{s['key']}"))
                        buf.append(torch.from_numpy(np.array(crop, dtype=np.uint8)))
                        if len(buf) >= self.buffer:
                            yield self._item(buf.pop(rng.randrange(len(buf))), epoch, w, done, skipped)
                            skipped = ""
                except ShardError as e:
                    skipped += f"{path}\t{e}\n"
                done += 1
            while buf:  # the epoch's last images: the buffer does not carry over
                yield self._item(buf.pop(rng.randrange(len(buf))), epoch, w, done, skipped)
                skipped = ""
            epoch, first = epoch + 1, 0

    @staticmethod
    def _item(pixels, epoch, w, done, skipped):
        return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, epoch, w, done, skipped


class ShardBatches:
    """The training iterator over ShardImages: next() -> ((B, 3, S, S) images, the skipped
    'name<TAB>reason' lines that came with them); position() is where a resume starts: the first shard of this rank's
    order that some worker has not finished (images of finished shards still in a shuffle
    buffer are not seen again, those of unfinished ones may be seen twice)."""

    def __init__(self, ds: ShardImages, batch_size: int, workers: int, device: torch.device):
        self.ds, self.start = ds, ds.start
        self.workers = max(1, min(workers, len(ds.mine(0))))
        self.reported = {}  # worker -> (epoch, shards finished in it)
        self.it = iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers and self.workers,
                                                   pin_memory=device.type == "cuda"))

    def __next__(self) -> tuple:
        x, epochs, ws, done, skipped = next(self.it)
        self.reported[int(ws[-1])] = (int(epochs[-1]), int(done[-1]))
        return x, skipped

    def position(self) -> tuple:
        """(epoch, position in this rank's shard order) to resume from."""
        state = [self.reported.get(w, self.start[:1] + (0,)) for w in range(self.workers)]
        epoch = min(e for e, _ in state)
        base = self.start[1] if epoch == self.start[0] else 0
        n = len(self.ds.mine(epoch))
        first = min((base + w + self.workers * d if e == epoch else n) for w, (e, d) in enumerate(state))
        return (epoch, first) if first < n else (epoch + 1, 0)


def shard_validation(shards: list, image_size: int, count: int, val_fraction: float, seed: int) -> list:
    """The first `count` held_out samples of the shards in their listed order, centre crops as
    (3, S, S) tensors: the validation images of train_vae.py --data SHARDS (the samples
    prepare.py puts in its val split with the same --val-fraction and --seed)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"tar shards need --val-fraction in (0, 1) to hold out validation images, got {val_fraction}")
    out = []
    for path in shards:
        try:
            for s in shard_samples(path):
                if s["image_ext"] is not None and held_out(s["key"], val_fraction, seed):
                    try:
                        out.append(to_tensor(center_crop_resize(shard_image(path, s), image_size)))
                    except ImageError:
                        continue
                    if len(out) == count:
                        return out
        except ShardError:
            continue
    if not out:
        raise ValueError(f"no validation image in {len(shards)} shard(s) with --val-fraction {val_fraction}")
    return out


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


def _caption_list(line: bytes, path: str, lineno: int) -> list:
    try:
        caps = json.loads(line)["captions"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"could not read {path}:{lineno}: not a prepare.py line "
                         f"({runtime.first_line(e)[:100]}); the file is truncated or damaged") from None
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{path}:{lineno}: 'captions' must be a non-empty list of strings")
    return caps


class CaptionLines:
    """The captions of prepare.py .jsonl files (one or several parts, in order), one list per
    image, read from the memory-mapped files when asked: what stays in memory is where each line
    is (20 bytes an image; the file pages are the page cache, shared by the ranks). Every line is checked
    once when the files are opened; a bad one is a one-line error naming the file and line."""

    def __init__(self, paths: list):
        self.paths, self.starts, self.ends, self.file_of, self.counts = list(paths), [], [], [], []
        for k, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file (is prepare.py finished there?)")
            buf = self._map(path)
            newlines = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) if len(buf) else np.zeros(0, np.int64)
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [len(buf)]])
            keep = []
            for lineno, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist()), start=1):
                if buf[lo:hi].strip():
                    _caption_list(buf[lo:hi], path, lineno)
                    keep.append(lineno - 1)
            self.starts.append(starts[keep])
            self.ends.append(ends[keep])
            self.file_of.append(np.full(len(keep), k, np.int32))
            self.counts.append(len(keep))
        self.starts, self.ends, self.file_of = (np.concatenate(a or [[]]).astype(t) for a, t in (
            (self.starts, np.int64), (self.ends, np.int64), (self.file_of, np.int32)))
        self.maps = {}

    @staticmethod
    def _map(path: str):
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""

    def __getstate__(self):  # DataLoader workers under spawn: the maps are opened again there
        return {**self.__dict__, "maps": {}}

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i) -> list:
        k = int(self.file_of[i])
        if k not in self.maps:
            self.maps[k] = self._map(self.paths[k])
        return json.loads(self.maps[k][int(self.starts[i]):int(self.ends[i])])["captions"]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def split_parts(folder: str, split: str) -> list:
    """The file stems of a split of a prepare.py folder, in row order: [split] ({split}.npy,
    {split}_crops.npy, {split}.jsonl) or, from shards, meta.json's "parts" (one per shard, read
    where prepare wrote them: no merge copies them)."""
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        return [split]
    parts = read_meta(folder).get("parts", {}).get(split)
    if parts is None:
        return [split]
    stems = [stem for stem, rows in parts if rows]
    if not stems:
        raise ValueError(f"--tokens {folder}: the {split} split has no images")
    return stems


class Rows:
    """Several arrays with the same row shape read as one: len, shape, ndim, dtype, a row by
    index (prepare.py --source shards writes one array per shard and split)."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.ends = np.cumsum([len(a) for a in arrays]).tolist()
        self.shape = (self.ends[-1], *arrays[0].shape[1:])
        self.ndim, self.dtype = len(self.shape), arrays[0].dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        k = bisect.bisect_right(self.ends, i)
        return self.arrays[k][i - (self.ends[k - 1] if k else 0)]


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
        tokens, crops, stems = [], [], split_parts(folder, split)
        self.captions = CaptionLines([os.path.join(folder, f"{stem}.jsonl") for stem in stems])
        for stem in stems:
            path = os.path.join(folder, f"{stem}.npy")
            arr = open_token_array(path)  # (N, image_len) uint16
            crops_path = os.path.join(folder, f"{stem}_crops.npy")
            crop = open_token_array(crops_path) if train and os.path.exists(crops_path) else None  # (N, K, L)
            n_lines = self.captions.counts[len(tokens)]  # lines of this part
            if n_lines != len(arr):
                raise ValueError(f"{folder}: {stem}.jsonl has {n_lines} lines for {len(arr)} images")
            if arr.ndim != 2 or arr.shape[1] != config.image_len:
                raise ValueError(f"{folder}/{stem}.npy: shape {arr.shape}, expected (N, {config.image_len})")
            if crop is not None and (crop.ndim != 3 or crop.shape[0] != len(arr) or crop.shape[2] != config.image_len
                                     or (crops and crop.shape[1] != crops[0].shape[1])):
                raise ValueError(f"{crops_path}: shape {crop.shape}, expected ({len(arr)}, "
                                 f"{crops[0].shape[1] if crops else 'K'}, {config.image_len})")
            check_token_ids(arr, config.image_vocab, path)
            if crop is not None:
                check_token_ids(crop, config.image_vocab, crops_path)
                crops.append(crop)
            tokens.append(arr)
        if crops and len(crops) != len(tokens):
            raise ValueError(f"{folder}: {len(crops)} of the {len(tokens)} parts of {split} have crops; run prepare.py again")
        self.tokens = tokens[0] if len(tokens) == 1 else Rows(tokens)
        self.crops = None if not crops else crops[0] if len(crops) == 1 else Rows(crops)
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
            image = self.tokens[i] if view == 0 else self.crops[i][view - 1]
            ids = self.tok.encode(caption, dropout=self.bpe_dropout, rng=rng) if self.bpe_dropout else None
            if ids is None or len(ids) > self.config.text_len - 1:
                ids = self.tok.encode(caption)
        else:
            caption, image = caps[i % len(caps)], self.tokens[i]
            ids = self.tok.encode(caption)
        text = biart.caption_to_model(ids, self.config, truncate=self.truncate)  # (text_len,)
        return text, torch.from_numpy(image.astype(np.int64))  # (text_len,), (image_len,)
