"""
Encode a captioned image set ONCE with a trained AugVAE-SL into token arrays for BiART
(nanoGPT's data/*/prepare.py: an idempotent step that writes flat uint16 arrays which
training memory-maps; rosinality's "extract codes once so the prior never loads the VAE").

    python prepare.py --vae out/vae_sl/best.pt                       # built-in shapes -> out/tokens
    python prepare.py --vae sl.pt --source coco --captions dataset_coco.json --image-root /data/coco
    torchrun --nproc_per_node 8 prepare.py --vae sl.pt --source cc --captions cc_train.tsv \
        --val-captions cc_val.tsv --image-root /data/cc --crops 2 --workers 8

Output folder (default out/tokens):
    {split}.npy        uint16 (N, g*g): the centre view of each kept image, its token grid row-major
    {split}_crops.npy  uint16 (N, K, g*g): with --crops K (training split only), K random crops of
                       each image (each a square of 75-100% of the image area, data.random_crop_resize;
                       the paper crops while training BiART, SPEC 2). Row i of both files is image i.
    {split}.jsonl      one line per kept image: {"image": name, "captions": [all its captions]}
    meta.json          the VAE checkpoint (path, sha256), codebook size, grid, image size, source
                       settings, per-split counts, and every skipped file with the reason
    log.txt            what each run did
train_gpt.py draws, per image and epoch, one of its views (the centre one or a crop) and one of
its captions, so an image's crops share its captions.

Sources (--source):
    shapes  the built-in captioned shapes (data.py), splits train/val/test/heldout (sizes are flags)
    coco    the Karpathy split file dataset_coco.json; "restval" goes to train
    cc      Conceptual Captions style TSV: caption<TAB>image path (relative to --image-root)
    jsonl   {"image": path, "caption": str or [str]} per line ("captions" is accepted too, so the
            folder `python data.py export` writes is a valid source)
    fashion-mnist  the idx files in --fashion-root (where Debian's dataset-fashion-mnist puts
            them by default): train (the official training images less a --val-fraction slice),
            val (that slice) and test (the 10,000 official test images, for evaluation only:
            train_gpt.py reads train and val). Captions: data.fashion_captions, training
            paraphrases only; each .jsonl line also holds "label" (0..9) and "class".
For cc and jsonl, --val-captions gives a validation file; without it --val-fraction of
--captions is held out. Unreadable images are skipped, counted and listed, never fatal.

Large sets: the work is cut into chunks of --chunk-size images per split. Under torchrun rank r
encodes chunks r, r + world, ... and writes each as OUT/parts/{split}-{chunk}.npz atomically;
rank 0 then merges them in the original order. A killed prepare resumes where it stopped (with
any number of processes: a chunk does not depend on who encodes it), a finished one is a no-op,
and --force redoes everything. The AugVAE runs in fp32, eval mode, without gradients; the batch
composition inside a chunk is fixed, so 1 and N processes give identical arrays.
"""

import argparse
import contextlib
import datetime
import glob
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import augvae
import data

# -----------------------------------------------------------------------------------------
# defaults: each is the flag of the same name (underscores become dashes)
DEFAULTS = dict(
    vae="",                # the AugVAE-SL checkpoint (train_vae.py --sl); required
    source="shapes",       # 'shapes', 'coco', 'cc' or 'jsonl'
    out="out/tokens",      # output folder
    force=False,           # redo a finished (or differently configured) prepare in --out
    # file sources
    captions="",           # coco: dataset_coco.json; cc: TSV; jsonl: JSONL (cc/jsonl: the training set)
    val_captions="",       # cc/jsonl: validation file; '' -> hold out --val-fraction of --captions
    image_root="",         # image paths are relative to this; '' -> the folder of --captions
    val_fraction=0.01,     # cc/jsonl without --val-captions; fashion-mnist: of the training images
    fashion_root=data.FASHION_ROOT,  # fashion-mnist: the folder of the idx files
    # the built-in shapes
    num_objects=1,
    train_size=20000,
    val_size=500,
    test_size=500,
    heldout_size=500,
    seed=0,                # shapes dataset seed; also seeds the crops and the cc/jsonl hold-out
    # augmentation
    crops=0,               # extra random crops per training image
    # system
    batch_size=64,         # images per AugVAE forward
    chunk_size=4096,       # images per shard file: the unit of resumption and of work per rank
    workers=0,             # DataLoader processes decoding images
    device="auto",
)

HELP = dict(
    vae="AugVAE-SL checkpoint to encode with (train_vae.py --sl writes out/vae_sl/best.pt)",
    source="'shapes' (built in), 'coco' (Karpathy dataset_coco.json), 'cc' (caption<TAB>path TSV), 'jsonl' or "
           "'fashion-mnist' (the idx files in --fashion-root, captioned from templates)",
    out="output folder for {split}.npy, {split}.jsonl, meta.json",
    force="delete what --out holds from an earlier prepare and encode everything again",
    captions="the caption file: coco dataset_coco.json, cc TSV or jsonl (cc/jsonl: training images)",
    val_captions="cc/jsonl: a validation caption file; without it --val-fraction of --captions is held out",
    image_root="folder the image paths in the caption file are relative to (default: the caption file's folder)",
    val_fraction="cc/jsonl without --val-captions, and fashion-mnist: fraction of the training images held out "
                 "for validation",
    fashion_root="--source fashion-mnist: the folder with train-images-idx3-ubyte.gz and the other idx files",
    num_objects="shapes: objects per image (1 or 2)",
    train_size="shapes: training images",
    val_size="shapes: validation images",
    test_size="shapes: test images",
    heldout_size="shapes: images of the compositional held-out split",
    seed="shapes dataset seed; also seeds the random crops, the caption draws of fashion-mnist and the "
         "cc/jsonl/fashion-mnist validation hold-out",
    crops="K extra random crops (75-100%% of the area) per training image, stored in train_crops.npy",
    batch_size="images per AugVAE forward pass",
    chunk_size="images per shard chunk (the unit a rank encodes and a rerun skips when done)",
    workers="DataLoader worker processes decoding images (0: in the main process)",
    device="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'",
)

SOURCES = ("shapes", "coco", "cc", "jsonl", "fashion-mnist")
SHAPES_SPLITS = {"train": "train_size", "val": "val_size", "test": "test_size", "heldout": "heldout_size"}
COCO_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_TOKEN_ID = np.iinfo(np.uint16).max  # uint16 arrays hold codebooks up to 65,536 codes
CROP_SUPERSAMPLE = 2  # shapes: crops are cut from a rendering at 2x (max 512 px), then resized down


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = data.ArgumentParser(description="Encode a captioned image set with AugVAE-SL into BiART's token arrays.",
                            argument_default=argparse.SUPPRESS if suppress else None)
    data.add_flags(p, DEFAULTS, HELP, suppress)
    return p


# -----------------------------------------------------------------------------------------
# sources: split -> list of items (name, path or shapes index or pixels, captions or None[, extra
# JSON fields for the split's .jsonl line])

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


def _fashion_items(cfg: dict) -> dict:
    """Fashion-MNIST: train less a validation slice, the slice, and the official test images."""
    root, seed = cfg["fashion_root"], cfg["seed"]

    def items(official: str, indices) -> list:
        images, labels = data.read_fashion_mnist(root, official)
        return [(f"{official}/{i}", images[i], data.fashion_captions(int(labels[i]), i, official, seed),
                 {"label": int(labels[i]), "class": data.FASHION_CLASSES[labels[i]]}) for i in indices]

    train_idx, val_idx = data.split_indices(len(data.read_fashion_mnist(root, "train")[0]), cfg["val_fraction"], seed)
    out = {"train": items("train", train_idx), "val": items("train", val_idx),
           "test": items("test", range(len(data.read_fashion_mnist(root, "test")[0])))}
    return {k: v for k, v in out.items() if v}


def list_items(cfg: dict) -> dict:
    """{split: [(name, path or shapes index, captions or None)]} in the order rows are written."""
    source = cfg["source"]
    if source == "shapes":
        if cfg["num_objects"] not in (1, 2):
            raise ValueError(f"--num-objects must be 1 or 2, got {cfg['num_objects']}")
        out = {}
        for split, key in SHAPES_SPLITS.items():
            if cfg[key] < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
            if cfg[key]:
                out[split] = [(f"{split}/{i}", i, None) for i in range(cfg[key])]
        return out
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "fashion-mnist":
        return _fashion_items(cfg)
    path = cfg["captions"]
    if not path:
        raise ValueError(f"--source {source} needs --captions FILE")
    for p in (path, cfg["val_captions"]):
        if p and not os.path.isfile(p):
            raise FileNotFoundError(f"--captions {p}: no such file")
    root = cfg["image_root"] or os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--image-root {root}: no such folder")
    if source == "coco":
        return {k: v for k, v in _read_coco(path, root).items() if v}
    read = _read_cc if source == "cc" else _read_jsonl
    train = read(path, root)
    if not train:
        raise ValueError(f"{path}: holds no images")
    if cfg["val_captions"]:
        val = read(cfg["val_captions"], root)
    else:
        train_idx, val_idx = data.split_indices(len(train), cfg["val_fraction"], cfg["seed"])
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    return {k: v for k, v in (("train", train), ("val", val)) if v}


class Views(torch.utils.data.Dataset):
    """Items of one chunk -> (centre view (3, S, S), crops (K, 3, S, S), ok, error, captions as JSON)."""

    def __init__(self, cfg: dict, split: str, items: list, first: int, image_size: int, crops: int):
        self.cfg, self.split, self.items, self.first = cfg, split, items, first
        self.size, self.crops = image_size, crops

    def __len__(self):
        return len(self.items)

    def _load(self, item) -> tuple:
        """-> (centre image, image to crop from, captions)."""
        name, where, captions = item[:3]
        if self.cfg["source"] == "fashion-mnist":  # where: the (28, 28) pixels
            img = data.fashion_image(where, self.size)
            big = data.fashion_image(where, min(512, CROP_SUPERSAMPLE * self.size)) if self.crops else img
            return img, big, captions
        if self.cfg["source"] == "shapes":
            ex = data.shapes_example(where, self.split, self.size, self.cfg["num_objects"], self.cfg["seed"])
            img = Image.fromarray(ex.image, "RGB")
            big = img
            if self.crops:  # the same scene at a higher resolution: crops are resized down, not up
                side = min(512, CROP_SUPERSAMPLE * self.size)
                big = Image.fromarray(data.shapes_example(where, self.split, side, self.cfg["num_objects"],
                                                               self.cfg["seed"]).image, "RGB")
            return img, big, ex.captions
        if not captions:
            raise data.ImageError(f"{where}: no caption")
        img = data.load_image(where)
        return img, img, captions

    def __getitem__(self, k):
        i = self.first + k  # index of the item within its split
        S, K = self.size, self.crops
        try:
            img, big, captions = self._load(self.items[k])
        except data.ImageError as e:
            return torch.zeros(3, S, S), torch.zeros(K, 3, S, S), False, str(e), "[]"
        centre = data.to_tensor(data.center_crop_resize(img, S))
        rng = random.Random(f"{self.cfg['seed']}/{self.split}/{i}")  # str seeds are stable
        crops = [data.to_tensor(data.random_crop_resize(big, S, rng)) for _ in range(K)]
        crops = torch.stack(crops) if crops else torch.zeros(0, 3, S, S)
        return centre, crops, True, "", json.dumps(captions)


# -----------------------------------------------------------------------------------------
# helpers

def load_vae(path: str) -> augvae.AugVAE:
    ckpt = data.load_checkpoint(path, augvae.CHECKPOINT_KIND)
    vcfg = augvae.AugVAEConfig.from_dict(ckpt["config"])
    if not vcfg.single_level:
        raise ValueError(f"--vae {path}: is a multi-level (ML) checkpoint; give the fine-tuned SL one "
                         f"(python train_vae.py --sl --init ML.pt)")
    if vcfg.codebook_size > MAX_TOKEN_ID + 1:
        raise ValueError(f"--vae {path}: codebook of {vcfg.codebook_size} codes does not fit uint16 tokens")
    model = augvae.AugVAE(vcfg)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.float().eval()


def _write_atomically(path: str, binary: bool, write):
    """write(file) into a temp file beside `path`, fsync, rename. A failed write (a full disk)
    removes the temp file and raises OSError naming `path`."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {e.strerror or e}") from None


def _atomic_write_text(path: str, text: str):
    _write_atomically(path, False, lambda f: f.write(text))


def _save_npz(path: str, **arrays):
    _write_atomically(path, True, lambda f: np.savez(f, **arrays))


def output_files(out: str) -> list:
    """Files a prepare writes in `out` (what --force deletes)."""
    names = ["meta.json", "parts"]
    for split in data.SPLITS:
        names += [f"{split}.npy", f"{split}_crops.npy", f"{split}.jsonl"]
    return [os.path.join(out, n) for n in names]


# -----------------------------------------------------------------------------------------

@torch.no_grad()
def encode_chunk(vae, cfg, split, items, first, image_size, device) -> dict:
    K = cfg["crops"] if split == "train" else 0
    ds = Views(cfg, split, items, first, image_size, K)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], num_workers=cfg["workers"],
                                         generator=torch.Generator().manual_seed(0))
    tokens, crops, keep, errors, captions = [], [], [], [], []
    for centre, crop, ok, err, caps in loader:
        B = centre.size(0)
        tokens.append(vae.encode(centre.to(device)).reshape(B, -1).cpu())  # (B, g*g) row-major
        if K:
            crop_tok = vae.encode(crop.flatten(0, 1).to(device)).reshape(B, K, -1).cpu()  # (B, K, g*g)
            crops.append(crop_tok)
        keep.append(ok)
        errors += list(err)
        captions += list(caps)
    tokens = torch.cat(tokens).numpy().astype(np.uint16)
    L = tokens.shape[1]
    crops = torch.cat(crops).numpy().astype(np.uint16) if K else np.zeros((len(items), 0, L), np.uint16)
    extras = [json.dumps(it[3]) if len(it) > 3 else "{}" for it in items]  # e.g. fashion-mnist's label
    return dict(tokens=tokens, crops=crops, keep=torch.cat(keep).numpy(), errors=np.array(errors, dtype=str),
                captions=np.array(captions, dtype=str), names=np.array([it[0] for it in items], dtype=str),
                extras=np.array(extras, dtype=str))


def merge(out: str, split: str, n_chunks: int, log) -> dict:
    """Concatenate a split's chunk files in order into {split}.npy (+ _crops.npy) and .jsonl."""
    parts = [np.load(os.path.join(out, "parts", f"{split}-{c:06d}.npz")) for c in range(n_chunks)]
    n = sum(int(p["keep"].sum()) for p in parts)
    L, K = parts[0]["tokens"].shape[1], parts[0]["crops"].shape[1]
    if n == 0:
        raise ValueError(f"split {split}: every image was unreadable; nothing to write")
    targets = {"tokens": os.path.join(out, f"{split}.npy")}
    if K:
        targets["crops"] = os.path.join(out, f"{split}_crops.npy")
    arrays = {}
    for key, path in targets.items():
        shape = (n, L) if key == "tokens" else (n, K, L)
        tmp = os.path.join(out, f".{os.path.basename(path)}.tmp{os.getpid()}.npy")
        arrays[key] = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=shape), tmp, path)
    row, lines, skipped = 0, [], []
    for p in parts:
        keep = p["keep"]
        k = int(keep.sum())
        for key, (arr, _, _) in arrays.items():
            arr[row:row + k] = p[key][keep]
        extras = p["extras"] if "extras" in p else ["{}"] * len(keep)  # chunks of an older prepare have none
        for name, ok, err, caps, extra in zip(p["names"], keep, p["errors"], p["captions"], extras):
            if ok:
                lines.append(json.dumps({"image": str(name), "captions": json.loads(str(caps)),
                                         **json.loads(str(extra))}))
            else:
                skipped.append([str(name), str(err)])
        row += k
    for arr, tmp, path in arrays.values():
        arr.flush()
        del arr
        os.replace(tmp, path)
    _atomic_write_text(os.path.join(out, f"{split}.jsonl"), "\n".join(lines) + "\n")
    for name, err in skipped[:20]:
        log(f"{split}: skipped {name}: {err}")
    if len(skipped) > 20:
        log(f"{split}: ... and {len(skipped) - 20} more skipped (all listed in meta.json)")
    return {"images": n, "skipped": len(skipped), "captions": sum(len(json.loads(l)["captions"]) for l in lines),
            "crops_per_image": K, "skipped_files": skipped}


def main(argv: list | None = None) -> dict | None:
    cfg = data.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    cfg.pop("_given")
    if not cfg["vae"]:
        raise ValueError("--vae is required: the AugVAE-SL checkpoint to encode with (out/vae_sl/best.pt)")
    for key in ("batch_size", "chunk_size"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["crops"] < 0:
        raise ValueError(f"--crops must be >= 0, got {cfg['crops']}")
    out = cfg["out"]

    # -- processes and device ------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:  # only barriers are exchanged: gloo everywhere; a long encode must not time out
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(cfg["device"])

    def barrier():
        if ddp:
            dist.barrier()

    # -- what to do: the settings that decide the output ---------------------------------------
    vae = load_vae(cfg["vae"])
    vcfg = vae.cfg
    grid = vcfg.grid(vcfg.token_level)
    items = list_items(cfg)
    if not items:
        raise ValueError("no split has any image (all sizes are 0?)")
    plan = {
        "format_version": data.TOKENS_FORMAT,
        "vae_sha256": data.sha256_file(cfg["vae"]),
        "source": cfg["source"],
        "settings": {k: cfg[k] for k in ("captions", "val_captions", "image_root", "val_fraction", "num_objects",
                                         *SHAPES_SPLITS.values(), "seed", "crops", "chunk_size")},
        "splits": {s: len(v) for s, v in items.items()},
    }
    if cfg["source"] == "fashion-mnist":  # the caption-file settings mean nothing here
        plan["settings"] = {k: plan["settings"][k] for k in ("val_fraction", "seed", "crops", "chunk_size")}
        plan["settings"]["fashion_root"] = os.path.abspath(cfg["fashion_root"])
        plan["idx_sha256"] = {os.path.basename(p): data.sha256_file(p)
                              for split in ("train", "test") for p in data.fashion_files(cfg["fashion_root"], split)}
    elif cfg["source"] != "shapes":
        for key in ("captions", "val_captions", "image_root"):
            plan["settings"][key] = os.path.abspath(cfg[key]) if cfg[key] else ""
        plan["captions_sha256"] = {k: data.sha256_file(cfg[k]) for k in ("captions", "val_captions") if cfg[k]}
    meta_path, parts_dir = os.path.join(out, "meta.json"), os.path.join(out, "parts")
    plan_path = os.path.join(parts_dir, "plan.json")

    def read_json(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    if os.path.exists(meta_path) and not cfg["force"]:
        if read_json(meta_path).get("plan") == plan:
            if master:
                print(f"prepare.py: {out} is already prepared with these settings; nothing to do (--force redoes it)")
            if ddp:
                dist.destroy_process_group()
            return None
        raise ValueError(f"{out} holds tokens prepared with other settings; use another --out or --force to replace them")
    if os.path.exists(plan_path) and not cfg["force"] and read_json(plan_path) != plan:
        raise ValueError(f"{parts_dir} holds an unfinished prepare with other settings; use --force to start over")
    if master:
        if cfg["force"]:
            for path in output_files(out):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(parts_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(out, ".*.tmp*")) + glob.glob(os.path.join(parts_dir, ".*.tmp*")):
            os.remove(stale)  # temp files of a killed run
        _atomic_write_text(plan_path, json.dumps(plan, indent=2))
    barrier()

    log_file = open(os.path.join(out, "log.txt"), "a") if master else None

    def log(msg: str):
        if master:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    # -- encode this rank's chunks ----------------------------------------------------------------
    vae.to(device)
    chunks = {s: (len(v) + cfg["chunk_size"] - 1) // cfg["chunk_size"] for s, v in items.items()}
    todo = [(s, c) for s in items for c in range(chunks[s]) if c % world == rank
            and not os.path.exists(os.path.join(parts_dir, f"{s}-{c:06d}.npz"))]
    total = sum(len(v) for v in items.values())
    log(f"prepare {cfg['source']} -> {out}: {total} images in splits "
        + ", ".join(f"{s} {len(v)}" for s, v in items.items())
        + f"; AugVAE-SL {vcfg.image_size} px -> {grid}x{grid} tokens of {vcfg.codebook_size} codes"
        + (f"; {cfg['crops']} crops per training image" if cfg["crops"] else "")
        + f"; {world} process(es) on {device}; {sum(chunks.values())} chunk(s)"
        + (f", {len(todo)} to encode on rank 0" if master else ""))
    if cfg["source"] == "shapes" and cfg["crops"]:
        log("note: crops of the shapes can move an object out of the cell its caption names")
    t0 = time.time()
    bar = tqdm(todo, disable=not master, desc="encode", dynamic_ncols=True)
    for split, c in bar:
        lo = c * cfg["chunk_size"]
        chunk = items[split][lo:lo + cfg["chunk_size"]]
        arrays = encode_chunk(vae, cfg, split, chunk, lo, vcfg.image_size, device)
        _save_npz(os.path.join(parts_dir, f"{split}-{c:06d}.npz"), **arrays)
    bar.close()
    barrier()

    # -- rank 0 merges the chunks in order ---------------------------------------------------------
    meta = None
    if master:
        counts = {s: merge(out, s, chunks[s], log) for s in items}
        meta = {
            "format_version": data.TOKENS_FORMAT,
            "vae": os.path.abspath(cfg["vae"]), "vae_sha256": plan["vae_sha256"],
            "codebook_size": vcfg.codebook_size, "grid": grid, "image_len": grid * grid,
            "image_size": vcfg.image_size, "dtype": "uint16",
            "source": cfg["source"], "settings": plan["settings"],
            "splits": {s: {k: v for k, v in c.items() if k != "skipped_files"} for s, c in counts.items()},
            "skipped": {s: c["skipped_files"] for s, c in counts.items() if c["skipped_files"]},
            "plan": plan,
        }
        _atomic_write_text(meta_path, json.dumps(meta, indent=2))
        shutil.rmtree(parts_dir)
        log(f"done in {time.time() - t0:.0f} s: " + ", ".join(
            f"{s} {c['images']} images ({c['skipped']} skipped)" for s, c in counts.items()) + f" -> {out}")
        log_file.close()
    barrier()
    if ddp:
        dist.destroy_process_group()
    return meta


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
