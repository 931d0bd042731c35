"""
Encode a captioned image set ONCE with a trained AugVAE-SL into token arrays for BiART
(nanoGPT's data/*/prepare.py: an idempotent step that writes flat uint16 arrays which
training memory-maps; rosinality's "extract codes once so the prior never loads the VAE").

    python prepare.py --vae out/vae_sl/best.pt                       # built-in shapes -> out/tokens
    python prepare.py --vae sl.pt --source coco --captions dataset_coco.json --image-root /data/coco
    torchrun --nproc_per_node 8 prepare.py --vae sl.pt --source cc --captions cc_train.tsv \
        --val-captions cc_val.tsv --image-root /data/cc --crops 2 --workers 8
    torchrun --nproc_per_node 8 prepare.py --vae sl.pt --source shards --shards 'cc3m/{00000..00331}.tar' \
        --crops 2 --workers 8 --out /data/cc3m_tokens

Output folder (default out/tokens):
    {split}.npy        uint16 (N, g*g): the centre view of each kept image, its token grid row-major
    {split}_crops.npy  uint16 (N, K, g*g): with --crops K (training split only), K random crops of
                       each image (each a square of 75-100% of the image area, data.random_crop_resize;
                       the paper crops while training BiART, appendix B.2). Row i of both files is image i.
    {split}.jsonl      one line per kept image: {"image": name, "captions": [all its captions]}
    meta.json          the VAE checkpoint (path, sha256), codebook size, grid, image size, source
                       settings, per-split counts, and every skipped file with the reason
    log.txt            what each run did
train_gpt.py draws, per image and epoch, one of its views (the centre one or a crop) and one of
its captions, so an image's crops share its captions.

Sources (--source):
    shapes  the built-in captioned shapes (shapes.py), splits train/val/test/heldout (sizes are flags)
    coco    the Karpathy split file dataset_coco.json; "restval" goes to train
    cc      Conceptual Captions style TSV: caption<TAB>image path (relative to --image-root)
    jsonl   {"image": path, "caption": str or [str]} per line ("captions" is accepted too, so the
            folder `python shapes.py export` writes is a valid source)
    fashion-mnist  the idx files in --fashion-root (where Debian's dataset-fashion-mnist puts
            them by default): train (the official training images less a --val-fraction slice),
            val (that slice) and test (the 10,000 official test images, for evaluation only:
            train_gpt.py reads train and val). Captions: data.fashion_captions, training
            paraphrases only; each .jsonl line also holds "label" (0..9) and "class".
    shards  img2dataset output (--shards): WebDataset tar files (KEY.jpg + KEY.txt [+ KEY.json]
            per sample) given with brace ranges and globs ('cc3m/{00000..00331}.tar'), or its
            --output_format files folders; the caption is the .txt (or --caption-field of the .json)
For cc and jsonl, --val-captions gives a validation file; without it --val-fraction of
--captions is held out (shards: --val-shards, or --val-fraction of the samples by a hash of
their key). Unreadable images are skipped, counted and listed, never fatal.

Shards are streamed, never listed whole: each shard is a job (rank r takes jobs r, r + world,
...; DataLoader workers split a rank's), written as OUT/shards/{job}.{split}.npy (+ _crops.npy,
.jsonl) and then OUT/shards/{job}.done.json (its rows, and its skipped samples by reason:
undecodable image, no caption, empty caption, unknown extension, no image). meta.json lists
the parts of each split in shard order and training reads them where they are: no merge copies
them. A missing or truncated shard is one line (meta.json "failed_shards"), the others go
through, and the same command run again encodes just the failed ones.

Caption-file and built-in sets: the work is cut into chunks of --chunk-size images per split. Under torchrun rank r
encodes chunks r, r + world, ... and writes each as OUT/parts/{split}-{chunk}.npz atomically;
rank 0 then merges them in the original order. A killed prepare resumes where it stopped (with
any number of processes: a chunk does not depend on who encodes it), a finished one is a no-op,
and --force redoes everything. The AugVAE runs in fp32, eval mode, without gradients; the batch
composition inside a chunk is fixed, so 1 and N processes give identical arrays.
"""

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import augvae
import data
import runtime
import shapes

FLAGS = dict(  # name: (default, help); each is the flag --name (underscores become dashes)
    vae=("", "AugVAE-SL checkpoint to encode with (train_vae.py --sl writes out/vae_sl/best.pt)"),
    source=("shapes", "'shapes' (built in), 'coco' (Karpathy dataset_coco.json), 'cc' (caption<TAB>path TSV), 'jsonl', "
           "'fashion-mnist' (the idx files in --fashion-root, captioned from templates) or 'shards' (img2dataset "
           "output, --shards)"),
    out=("out/tokens", "output folder for {split}.npy, {split}.jsonl, meta.json"),
    force=(False, "delete what --out holds from an earlier prepare and encode everything again"),
    # file sources
    captions=("", "the caption file: coco dataset_coco.json, cc TSV or jsonl (cc/jsonl: training images)"),
    val_captions=("", "cc/jsonl: a validation caption file; without it --val-fraction of --captions is held out"),
    image_root=("", "folder the image paths in the caption file are relative to (default: the caption file's folder)"),
    val_fraction=(0.01, "cc/jsonl without --val-captions, shards without --val-shards, and fashion-mnist: fraction "
                 "of the training images held out for validation"),
    fashion_root=(data.FASHION_ROOT, "--source fashion-mnist: the folder with train-images-idx3-ubyte.gz and the other idx files"),
    # img2dataset shards
    shards=("", "--source shards: the training shards: tar files with brace ranges and globs "
                "('cc3m/{00000..00331}.tar'), or a folder of img2dataset's files output"),
    val_shards=("", "--source shards: validation shards (same forms); without them --val-fraction of the samples "
                    "(a hash of each key, so the split is the same however the work is cut) is held out"),
    caption_field=("", "--source shards: take the caption from this field of each sample's .json (default: its "
                       ".txt, else the .json's \"caption\")"),
    # the built-in shapes
    num_objects=(1, "shapes: objects per image (1 or 2)"),
    train_size=(20000, "shapes: training images"),
    val_size=(500, "shapes: validation images"),
    test_size=(500, "shapes: test images"),
    heldout_size=(500, "shapes: images of the compositional held-out split"),
    seed=(0, "shapes dataset seed; also seeds the random crops, the caption draws of fashion-mnist and the "
         "cc/jsonl/fashion-mnist validation hold-out"),
    # augmentation
    crops=(0, "K extra random crops (75-100%% of the area) per training image, stored in train_crops.npy"),
    # system
    batch_size=(64, "images per AugVAE forward pass"),
    chunk_size=(4096, "images per chunk, the unit a rank encodes and a rerun skips when done (--source shards: "
                     "each shard is one)"),
    workers=(0, "DataLoader worker processes decoding images (0: in the main process)"),
    device=("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"),
)

SHAPES_SPLITS = {"train": "train_size", "val": "val_size", "test": "test_size", "heldout": "heldout_size"}
MAX_TOKEN_ID = np.iinfo(np.uint16).max  # uint16 arrays hold codebooks up to 65,536 codes
SHARDS_DIR = "shards"  # --source shards: per shard and split {job}.{split}.npy, _crops.npy, .jsonl; {job}.done.json


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(description="Encode a captioned image set with AugVAE-SL into BiART's token arrays.",
                            argument_default=argparse.SUPPRESS if suppress else None)
    runtime.add_flags(p, FLAGS, suppress)
    return p


# -----------------------------------------------------------------------------------------
# helpers

def load_vae(path: str) -> augvae.AugVAE:
    model = augvae.load(path, single_level=True, flag="--vae")
    if model.cfg.codebook_size > MAX_TOKEN_ID + 1:
        raise ValueError(f"--vae {path}: codebook of {model.cfg.codebook_size} codes does not fit uint16 tokens")
    return model


def output_files(out: str) -> list:
    """Files a prepare writes in `out` (what --force deletes)."""
    names = ["meta.json", "parts", SHARDS_DIR]
    for split in shapes.SPLITS:
        names += [f"{split}.npy", f"{split}_crops.npy", f"{split}.jsonl"]
    return [os.path.join(out, n) for n in names]


# -----------------------------------------------------------------------------------------

@torch.no_grad()
def encode_views(vae, centre: torch.Tensor, crops: torch.Tensor, device) -> tuple:
    """(B, 3, S, S) centre views and (B, K, 3, S, S) crops -> uint16 token grids, row-major:
    (B, g*g) and (B, K, g*g)."""
    B, K = crops.shape[:2]
    tokens = vae.encode(centre.to(device)).reshape(B, -1).cpu().numpy().astype(np.uint16)
    crop_tokens = (vae.encode(crops.flatten(0, 1).to(device)).reshape(B, K, -1).cpu().numpy().astype(np.uint16)
                   if K else np.zeros((B, 0, tokens.shape[1]), np.uint16))
    return tokens, crop_tokens


@torch.no_grad()
def encode_chunk(vae, cfg, split, items, first, image_size, device) -> dict:
    K = cfg["crops"] if split == "train" else 0
    ds = data.Views(cfg["source"], split, items, first, image_size, K, cfg["num_objects"], cfg["seed"])
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], num_workers=cfg["workers"],
                                         generator=torch.Generator().manual_seed(0))
    tokens, crops, keep, errors, captions = [], [], [], [], []
    for centre, crop, ok, err, caps in loader:
        t, c = encode_views(vae, centre, crop, device)
        tokens.append(t)
        crops.append(c)
        keep.append(ok)
        errors += list(err)
        captions += list(caps)
    tokens, crops = np.concatenate(tokens), np.concatenate(crops)
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
    runtime.write_text(os.path.join(out, f"{split}.jsonl"), "\n".join(lines) + "\n")
    for name, err in skipped[:20]:
        log(f"{split}: skipped {name}: {err}")
    if len(skipped) > 20:
        log(f"{split}: ... and {len(skipped) - 20} more skipped (all listed in meta.json)")
    return {"images": n, "skipped": len(skipped), "captions": sum(len(json.loads(l)["captions"]) for l in lines),
            "crops_per_image": K, "skipped_files": skipped}


def make_plan(cfg: dict, items: dict) -> dict:
    """The settings that decide the output (and the sha256 of every input file): a rerun with the
    same plan resumes or does nothing; another plan is refused without --force."""
    plan = {
        "format_version": data.TOKENS_FORMAT,
        "vae_sha256": runtime.sha256_file(cfg["vae"]),
        "source": cfg["source"],
        "settings": {k: cfg[k] for k in ("captions", "val_captions", "image_root", "val_fraction", "num_objects",
                                         *SHAPES_SPLITS.values(), "seed", "crops", "chunk_size")},
        "splits": {s: len(v) for s, v in items.items()},
    }
    if cfg["source"] == "fashion-mnist":  # the caption-file settings mean nothing here
        plan["settings"] = {k: plan["settings"][k] for k in ("val_fraction", "seed", "crops", "chunk_size")}
        plan["settings"]["fashion_root"] = os.path.abspath(cfg["fashion_root"])
        plan["idx_sha256"] = {os.path.basename(p): runtime.sha256_file(p)
                              for split in ("train", "test") for p in data.fashion_files(cfg["fashion_root"], split)}
    elif cfg["source"] != "shapes":
        for key in ("captions", "val_captions", "image_root"):
            plan["settings"][key] = os.path.abspath(cfg[key]) if cfg[key] else ""
        plan["captions_sha256"] = {k: runtime.sha256_file(cfg[k]) for k in ("captions", "val_captions") if cfg[k]}
    return plan


# -----------------------------------------------------------------------------------------
# --source shards: each shard is a job; its arrays are the output (meta.json lists them)

def shard_jobs(cfg: dict) -> list:
    """[(job, shard path, split rule)]: the training shards ('auto': held_out by key unless
    --val-shards are given, then 'train'), then the validation shards ('val')."""
    train = data.list_shards(cfg["shards"])
    val = data.list_shards(cfg["val_shards"]) if cfg["val_shards"] else []
    rules = [(p, "train" if val else "auto") for p in train] + [(p, "val") for p in val]
    return [(j, p, rule) for j, (p, rule) in enumerate(rules)]


def shard_plan(cfg: dict, jobs: list) -> dict:
    return {"format_version": data.TOKENS_FORMAT, "vae_sha256": runtime.sha256_file(cfg["vae"]), "source": "shards",
            "settings": {k: cfg[k] for k in ("shards", "val_shards", "caption_field", "val_fraction", "seed", "crops")},
            "shards": [[os.path.abspath(p), rule] for _, p, rule in jobs]}


def job_record(out: str, job: int, kind: str) -> str:
    return os.path.join(out, SHARDS_DIR, f"{job:06d}.{kind}.json")  # kind: done or failed


def write_job(out: str, job: int, path: str, parts: dict, end: dict, log, n_jobs: int) -> None:
    """A finished shard's arrays and lines per split, then its done record (last: a kill before
    it leaves the shard to do again); a shard that failed gets a failed record instead."""
    if end["error"]:
        runtime.write_json(job_record(out, job, "failed"), {"path": path, "error": end["error"]})
        return
    rows = {}
    for split, (tokens, crops, lines) in parts.items():
        stem = os.path.join(out, SHARDS_DIR, f"{job:06d}.{split}")
        tokens = np.concatenate(tokens)
        runtime.write_atomic(stem + ".npy", lambda f: np.save(f, tokens))
        if crops:
            crops = np.concatenate(crops)
            runtime.write_atomic(stem + "_crops.npy", lambda f: np.save(f, crops))
        runtime.write_text(stem + ".jsonl", "".join(line + "\n" for line in lines))
        rows[split] = len(tokens)
    runtime.write_json(job_record(out, job, "done"), {"path": path, "rows": rows, "skipped": end["skipped"],
                                                     "members": end["members"]})
    if os.path.exists(job_record(out, job, "failed")):
        os.remove(job_record(out, job, "failed"))
    log(f"shard {job + 1}/{n_jobs} done: {path}: " + ", ".join(f"{k} {v}" for k, v in rows.items())
        + f" images, {sum(end['skipped'].values())} skipped")


@torch.no_grad()
def encode_shards(vae, cfg: dict, jobs: list, out: str, device, log, n_jobs: int) -> None:
    """Encode these shard jobs (DataLoader workers read and decode them, data.ShardViews)."""
    ds = data.ShardViews(jobs, vae.cfg.image_size, cfg["crops"], cfg["seed"], cfg["val_fraction"],
                         cfg["caption_field"], cfg["batch_size"])
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(cfg["workers"], len(jobs)))
    paths, acc = {j: p for j, p, _ in jobs}, {}
    bar = tqdm(total=len(jobs), disable=not log.file, desc="shards", dynamic_ncols=True)
    for rec in loader:
        parts = acc.setdefault(rec["job"], {})
        if rec.get("end"):
            write_job(out, rec["job"], paths[rec["job"]], acc.pop(rec["job"]), rec, log, n_jobs)
            bar.update(1)
            continue
        tokens, crops, lines = parts.setdefault(rec["split"], ([], [], []))
        t, c = encode_views(vae, rec["centre"], rec["crops"], device)
        tokens.append(t)
        if c.shape[1]:
            crops.append(c)
        lines += [json.dumps({"image": n, "captions": [c]}) for n, c in zip(rec["names"], rec["captions"])]
    bar.close()


def shards_meta(out: str, jobs: list, log) -> dict:
    """Rank 0, after every rank's shards: the parts of each split in shard order, the totals, the
    skipped members by reason and the shards that failed (a rerun retries them)."""
    parts, skipped, failed = {}, {}, {}
    for job, path, _ in jobs:
        if os.path.exists(job_record(out, job, "done")):
            rec = runtime.read_json(job_record(out, job, "done"))
            for split, rows in rec["rows"].items():
                parts.setdefault(split, []).append([os.path.join(SHARDS_DIR, f"{job:06d}.{split}"), rows])
            for reason, n in rec["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        elif os.path.exists(job_record(out, job, "failed")):
            failed[path] = runtime.read_json(job_record(out, job, "failed"))["error"]
        else:
            raise RuntimeError(f"shard {path} was neither encoded nor reported failed")
    for path, error in failed.items():
        log(f"failed: {error}")
    if skipped:
        log("skipped samples by reason: " + ", ".join(f"{r} {n}" for r, n in skipped.items())
            + f" (each listed in {os.path.join(out, SHARDS_DIR)}/*.done.json)")
    if failed:
        log(f"{len(failed)} shard(s) failed (listed in meta.json); run the same command again to retry them")
    if not any(rows for p in parts.values() for _, rows in p):
        raise ValueError(f"no usable sample in {len(jobs)} shard(s): " + (f"{len(failed)} failed, " if failed else "")
                         + f"{sum(skipped.values())} sample(s) skipped (see {os.path.join(out, 'log.txt')})")
    return {"parts": parts, "skipped_by_reason": skipped, "failed_shards": failed}


def start(device: str) -> tuple:
    """torchrun-aware start -> (ddp, rank, world, device): gloo on any device (a long encode must
    not time out: 12 hours), each process on cuda:LOCAL_RANK under CUDA."""
    device = str(runtime.resolve_device(device))
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device(device)
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return True, dist.get_rank(), dist.get_world_size(), torch.device(device)


def main(argv: list | None = None) -> dict | None:
    cfg = runtime.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    cfg.pop("_given")
    if not cfg["vae"]:
        raise ValueError("--vae is required: the AugVAE-SL checkpoint to encode with (out/vae_sl/best.pt)")
    for key in ("batch_size", "chunk_size"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    runtime.require_nonnegative(cfg, ("crops", *SHAPES_SPLITS.values()))
    out = cfg["out"]

    # -- processes and device: only barriers are exchanged, so gloo everywhere -------------
    ddp, rank, world, device = start(cfg["device"])
    master = rank == 0

    def barrier():
        if ddp:
            dist.barrier()

    # -- what to do: the settings that decide the output ---------------------------------------
    vae = load_vae(cfg["vae"])
    vcfg = vae.cfg
    grid = vcfg.grid(vcfg.token_level)
    if cfg["source"] == "shapes" and cfg["num_objects"] not in (1, 2):
        raise ValueError(f"--num-objects must be 1 or 2, got {cfg['num_objects']}")
    if cfg["source"] == "shards":
        items, jobs = None, shard_jobs(cfg)
        plan = shard_plan(cfg, jobs)
    else:
        items = data.list_items(cfg["source"], captions=cfg["captions"], val_captions=cfg["val_captions"],
                                image_root=cfg["image_root"], val_fraction=cfg["val_fraction"], seed=cfg["seed"],
                                fashion_root=cfg["fashion_root"],
                                shapes_sizes={split: cfg[key] for split, key in SHAPES_SPLITS.items()})
        if not items:
            raise ValueError("no split has any image (all sizes are 0?)")
        plan = make_plan(cfg, items)
    meta_path, parts_dir = os.path.join(out, "meta.json"), os.path.join(out, "parts")
    plan_path = os.path.join(parts_dir, "plan.json")

    if os.path.exists(meta_path) and not cfg["force"]:
        old = runtime.read_json(meta_path)
        if old.get("plan") != plan:
            raise ValueError(f"{out} holds tokens prepared with other settings; use another --out or --force to replace them")
        if not old.get("failed_shards"):
            if master:
                print(f"prepare.py: {out} is already prepared with these settings; nothing to do (--force redoes it)")
            if ddp:
                dist.destroy_process_group()
            return None
    if os.path.exists(plan_path) and not cfg["force"] and runtime.read_json(plan_path) != plan:
        raise ValueError(f"{parts_dir} holds an unfinished prepare with other settings; use --force to start over")
    if master:
        if cfg["force"]:
            for path in output_files(out):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(parts_dir, exist_ok=True)
        if items is None:
            os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
        for stale in glob.glob(os.path.join(out, "*", ".*.tmp*")) + glob.glob(os.path.join(out, ".*.tmp*")):
            os.remove(stale)  # temp files of a killed run
        runtime.write_text(plan_path, json.dumps(plan, indent=2))
    barrier()

    log = runtime.Log(out, master)
    vae.to(device)
    described = (f"; AugVAE-SL {vcfg.image_size} px -> {grid}x{grid} tokens of {vcfg.codebook_size} codes"
                 + (f"; {cfg['crops']} crops per training image" if cfg["crops"] else "")
                 + f"; {world} process(es) on {device}")
    t0 = time.time()
    meta = {"format_version": data.TOKENS_FORMAT, "vae": os.path.abspath(cfg["vae"]), "vae_sha256": plan["vae_sha256"],
            "codebook_size": vcfg.codebook_size, "grid": grid, "image_len": grid * grid,
            "image_size": vcfg.image_size, "dtype": "uint16", "source": cfg["source"], "settings": plan["settings"]}

    if items is None:  # -- shards: rank r encodes shards r, r + world, ... not done yet ---------------------
        todo = [job for job in jobs if job[0] % world == rank and not os.path.exists(job_record(out, job[0], "done"))]
        log(f"prepare shards -> {out}: {len(jobs)} shard(s)" + described
            + (f"; {len(todo)} to encode on rank 0" if master else ""))
        if todo:
            encode_shards(vae, cfg, todo, out, device, log, len(jobs))
        barrier()
        if master:
            found = shards_meta(out, jobs, log)
            meta["splits"] = {split: {"images": sum(r for _, r in p), "captions": sum(r for _, r in p),
                                      "crops_per_image": cfg["crops"] if split == "train" else 0, "parts": len(p)}
                              for split, p in found["parts"].items()}
            meta.update(found)
    else:  # -- files and built-in sets: rank r encodes chunks r, r + world, ...; rank 0 merges ----------
        chunks = {s: (len(v) + cfg["chunk_size"] - 1) // cfg["chunk_size"] for s, v in items.items()}
        todo = [(s, c) for s in items for c in range(chunks[s]) if c % world == rank
                and not os.path.exists(os.path.join(parts_dir, f"{s}-{c:06d}.npz"))]
        log(f"prepare {cfg['source']} -> {out}: {sum(len(v) for v in items.values())} images in splits "
            + ", ".join(f"{s} {len(v)}" for s, v in items.items()) + described + f"; {sum(chunks.values())} chunk(s)"
            + (f", {len(todo)} to encode on rank 0" if master else ""))
        if cfg["source"] == "shapes" and cfg["crops"]:
            log("note: crops of the shapes can move an object out of the cell its caption names")
        bar = tqdm(todo, disable=not master, desc="encode", dynamic_ncols=True)
        for split, c in bar:
            lo = c * cfg["chunk_size"]
            chunk = items[split][lo:lo + cfg["chunk_size"]]
            arrays = encode_chunk(vae, cfg, split, chunk, lo, vcfg.image_size, device)
            runtime.write_atomic(os.path.join(parts_dir, f"{split}-{c:06d}.npz"), lambda f: np.savez(f, **arrays))
        bar.close()
        barrier()
        if master:
            counts = {s: merge(out, s, chunks[s], log) for s in items}
            meta["splits"] = {s: {k: v for k, v in c.items() if k != "skipped_files"} for s, c in counts.items()}
            meta["skipped"] = {s: c["skipped_files"] for s, c in counts.items() if c["skipped_files"]}

    if master:
        meta["plan"] = plan
        runtime.write_text(meta_path, json.dumps(meta, indent=2))
        shutil.rmtree(parts_dir)
        log(f"done in {time.time() - t0:.1f} s: " + ", ".join(
            f"{s} {c['images']} images" + (f" ({c['skipped']} skipped)" if "skipped" in c else "")
            for s, c in meta["splits"].items()) + f" -> {out}")
        log.close()
    barrier()
    if ddp:
        dist.destroy_process_group()
    return meta


if __name__ == "__main__":
    runtime.run_cli(main, "prepare.py")
