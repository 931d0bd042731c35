"""
Train BiART (stage 2 of L-Verse) on the token arrays prepare.py writes.

    python prepare.py --vae out/vae_sl/best.pt                 # once: images -> out/tokens
    python tokenizer.py train captions.txt --vocab-size 600 --out out/bpe_shapes.txt.gz   # optional
    python train_gpt.py --bpe out/bpe_shapes.txt.gz            # small preset, CPU size
    torchrun --nproc_per_node 8 train_gpt.py --preset paper --tokens /data/coco_tokens \
        --batch-size 16 --lr-per-sample 4.5e-7 --workers 4 --dtype float16

One script for CPU, one GPU and many (torchrun: gloo on CPU, NCCL on CUDA). Every setting
below is a command-line flag (`--help`); the resolved settings go to OUT/config.json.
The model's layout follows the data: image_vocab and image_len from the tokens' meta.json,
text_vocab and the end-of-text id from the tokenizer (--bpe, CLIP's by default), text_len from
the preset or --text-len. The checkpoint records the tokenizer file's path and sha256, and the
tokens' meta.json, so a sampler can rebuild and verify both.

Training (SPEC 2): each optimizer step is one direction, alternating text->image and
image->text (--mix puts half of every batch in each direction; --t2i-share other than 0.5
gives text->image that share of the steps or rows instead); the loss is the NLL of both
the condition ([REF]) and the target ([GEN]) part, each condition token weighted by
--ref-weight (1: one mean over all tokens). Every draw of a training image picks one
of its captions and one of its views (the centre one or a prepare.py --crops crop) from a
random.Random seeded by (seed, epoch, index), and tokenizes the caption with BPE-dropout from
the same generator, so a resumed run draws exactly what the uninterrupted one would have.
A kill loses at most `--ckpt-every` steps: `--resume --out DIR` continues from DIR/ckpt.pt and,
on CPU, reproduces the uninterrupted run bit for bit.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import biart
import data
import tokenizer

CHECKPOINT_KIND = "biart"

# -----------------------------------------------------------------------------------------
# defaults: each is the flag of the same name (underscores become dashes)
DEFAULTS = dict(
    tokens="out/tokens",   # prepare.py's output folder
    bpe="",                # tokenizer merges file; '' -> CLIP's (assets/bpe_simple_vocab_16e6.txt.gz)
    out="out/gpt",         # output folder
    resume=False,          # continue from OUT/ckpt.pt (fails if there is none)
    init="",               # start from the weights of this BiART checkpoint (same layout)
    # model
    preset="small",        # 'small' (CPU), 'medium', 'paper' (32 layers, d 1024)
    text_len=0,            # text tokens per caption incl. end-of-text; 0 -> the preset's
    n_layer=0,             # 0 -> the preset's (the next three too)
    n_head=0,
    n_embd=0,
    dropout=-1.0,          # <0 -> the preset's (paper 0.1)
    positions="",          # '' -> the preset's; 'sequence' (minGPT) or 'canonical' (BiARTConfig.positions)
    truncate=False,        # cut captions longer than text_len instead of stopping with an error
    # data
    bpe_dropout=0.1,       # BPE-dropout on training captions (appendix B.2); validation uses none
    mix=False,             # both directions in every batch (half each) instead of alternating per step
    t2i_share=0.5,         # share of the training sequences in text->image order (paper: 0.5, alternating)
    eval_images=512,       # validation images evaluated (0: all of the val split)
    workers=0,             # DataLoader worker processes
    # optimisation (appendix B.2)
    batch_size=32,         # sequences per process per micro-step
    total_batch=0,         # sequences per optimizer step over all processes; 0 -> batch_size x world
    max_steps=750,         # optimizer steps in all (resume continues to this); 750 = about 10 CPU minutes on shapes
    lr=0.0,                # 0 -> lr_per_sample x total batch
    lr_per_sample=3.125e-5,  # lr = this x total batch; the paper's rule is 4.5e-7 (for paper scale)
    warmup_steps=50,       # linear warmup from 0 over this many steps
    warmdown_steps=0,      # linear decay to min_lr over the last this many of max_steps (0: none)
    weight_decay=0.01,     # not on embeddings, LayerNorms or biases (biart.configure_optimizers)
    plateau_patience=3,    # halve the lr after this many evaluations without a better val loss
    min_lr=1e-6,           # never halve below this
    grad_clip=1.0,         # clip the gradient norm (0: off)
    ref_weight=1.0,        # weight of each condition ([REF]) token in the loss against a target token's 1
    # system
    device="auto",         # 'auto', 'cpu', 'cuda', 'cuda:N'
    dtype="auto",          # autocast: 'auto' (CUDA: bfloat16 if supported, else float16; CPU: fp32), 'float32',
                           # 'bfloat16' (also on CPU), 'float16' (CUDA, GradScaler; the paper's FP16)
    seed=0,
    log_every=20,
    eval_every=200,        # evaluate on the val split every N steps
    ckpt_every=200,        # write OUT/ckpt.pt every N steps (and at the end)
)

HELP = dict(
    tokens="folder written by prepare.py ({split}.npy, {split}.jsonl, meta.json)",
    bpe="tokenizer merges file (.txt.gz); default CLIP's. A small one from `python tokenizer.py train` is much faster on shapes",
    out="output folder for ckpt.pt, log.txt and config.json",
    resume="continue exactly where OUT/ckpt.pt stopped; an error if it does not exist",
    init="BiART checkpoint whose weights start this run (fine-tuning); its layout must match the data and tokenizer",
    preset="model preset: " + ", ".join(biart.PRESETS),
    text_len="text positions per caption, end-of-text included; 0 takes the preset's",
    n_layer="transformer blocks; 0 takes the preset's",
    n_head="attention heads; 0 takes the preset's",
    n_embd="width of the residual stream; 0 takes the preset's",
    dropout="residual, embedding and attention dropout; <0 takes the preset's (paper: 0.1)",
    positions="position embeddings: 'sequence' (minGPT: by place in the sequence, so the image grid sits at "
              "two places, one per direction) or 'canonical' (each token at its text->image place in both "
              "directions); '' takes the preset's",
    truncate="cut captions that do not fit text_len (default: stop and name the caption)",
    bpe_dropout="BPE-dropout probability on training captions (paper: 0.1)",
    mix="put both directions in every batch, half each (default: alternate t2i / i2t every optimizer step)",
    t2i_share="share of the training in text->image order, the rest image->text: 0.5 (paper) alternates the "
              "steps; 2/3 makes two of every three steps text->image (with --mix: that share of each batch)",
    eval_images="validation images per evaluation (0: the whole val split)",
    workers="DataLoader worker processes (0 loads in the main process)",
    batch_size="sequences per process per micro-step",
    total_batch="sequences per optimizer step over all processes (gradient accumulation makes up the rest); 0: one micro-step",
    max_steps="total optimizer steps",
    lr="learning rate; 0 derives it as --lr-per-sample x total batch size",
    lr_per_sample="learning rate per sequence of the total batch: lr = this x total batch. The default (1e-3 at "
                  "batch 32) is measured on the CPU shapes demo; the paper's rule (appendix B.2) is 4.5e-7",
    warmup_steps="linear learning-rate warmup over this many steps (0: none)",
    warmdown_steps="linear decay of the learning rate to --min-lr over the last this many of --max-steps "
                   "(0: none; short fixed budgets such as demo.py's end better with it)",
    weight_decay="AdamW weight decay on Linear weights (paper: 0.01)",
    plateau_patience="evaluations without a better validation loss before the lr is halved",
    min_lr="lower bound for the halving",
    grad_clip="clip the gradient norm to this (0: off)",
    ref_weight="loss weight of each condition ([REF]) token relative to a target ([GEN]) token: 1 is the "
               "paper's mean over both parts, 0 trains on the target part alone",
    device="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'",
    dtype="autocast dtype: auto (CUDA: bfloat16 where supported, else float16; CPU: float32), float32, "
          "bfloat16 (CUDA or CPU), float16 (CUDA, with a GradScaler)",
    seed="random seed (model init, data order, caption and crop draws, dropout)",
    log_every="log the training losses every N steps",
    eval_every="evaluate on the validation split every N steps",
    ckpt_every="write OUT/ckpt.pt every N steps (and at the end)",
)

MODEL_FLAGS = ("text_len", "n_layer", "n_head", "n_embd")  # 0 -> the preset's value


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = data.ArgumentParser(description="Train BiART on prepare.py's tokens (text->image and image->text).",
                            argument_default=argparse.SUPPRESS if suppress else None)
    data.add_flags(p, DEFAULTS, HELP, suppress)
    return p


# -----------------------------------------------------------------------------------------
# data

def read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--tokens {folder}: no such folder (run prepare.py first)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokens {folder}: no meta.json (is prepare.py finished there?)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version", 0) > data.TOKENS_FORMAT:
        raise ValueError(f"{path}: format {meta['format_version']} is newer than this code understands")
    for split in ("train", "val"):
        if split not in meta["splits"]:
            raise ValueError(f"--tokens {folder}: has no {split!r} split")
    return meta


def tokenizer_info(tok: tokenizer.Tokenizer) -> dict:
    return {"path": os.path.abspath(tok.bpe_path), "sha256": data.sha256_file(tok.bpe_path),
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


class TokenCaptions(torch.utils.data.Dataset):
    """One split of a prepare.py folder -> (text (text_len,), image (image_len,)) LongTensors in
    BiART's id space. Training (`train=True`): each call draws, from random.Random(seed, epoch,
    index), one caption of the image, one view (centre or crop), and the caption's BPE-dropout
    segmentation. A dropout segmentation too long for text_len falls back to the plain one
    (checked to fit when the set is loaded). Validation: view 0, caption index % count, no dropout."""

    def __init__(self, folder: str, split: str, tok: tokenizer.Tokenizer, config: biart.BiARTConfig,
                 train: bool, bpe_dropout: float, seed: int, truncate: bool):
        self.tok, self.config, self.train = tok, config, train
        self.bpe_dropout, self.seed, self.truncate = bpe_dropout, seed, truncate
        self.tokens = np.load(os.path.join(folder, f"{split}.npy"), mmap_mode="r")  # (N, image_len) uint16
        crops = os.path.join(folder, f"{split}_crops.npy")
        self.crops = np.load(crops, mmap_mode="r") if train and os.path.exists(crops) else None  # (N, K, L)
        with open(os.path.join(folder, f"{split}.jsonl"), encoding="utf-8") as f:
            self.captions = [json.loads(line)["captions"] for line in f if line.strip()]
        if len(self.captions) != len(self.tokens):
            raise ValueError(f"{folder}: {split}.jsonl has {len(self.captions)} lines for {len(self.tokens)} images")
        if self.tokens.ndim != 2 or self.tokens.shape[1] != config.image_len:
            raise ValueError(f"{folder}/{split}.npy: shape {self.tokens.shape}, expected (N, {config.image_len})")
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


def step_direction(step: int, t2i_share: float) -> str:
    """The direction of optimizer step `step`: text->image on t2i_share of the steps, spread evenly
    (0.5: t2i, i2t, t2i, ... as the paper alternates; 2/3: t2i, t2i, i2t, ...)."""
    return "t2i" if math.ceil((step + 1) * t2i_share - 1e-9) > math.ceil(step * t2i_share - 1e-9) else "i2t"


def batch_sequences(text: torch.Tensor, image: torch.Tensor, direction: str,
                    config: biart.BiARTConfig, t2i_share: float = 0.5) -> tuple:
    """(idx, seg, targets) for one direction, or 'mix': the first t2i_share of the rows t2i, the rest i2t."""
    if direction != "mix":
        return biart.build_sequence(text, image, direction, config)
    h = round(text.size(0) * t2i_share)
    a = biart.build_sequence(text[:h], image[:h], "t2i", config)
    b = biart.build_sequence(text[h:], image[h:], "i2t", config)
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


# -----------------------------------------------------------------------------------------
# the model: its layout comes from the data and the tokenizer

def model_config(cfg: dict, meta: dict, tok: tokenizer.Tokenizer) -> biart.BiARTConfig:
    overrides = dict(image_vocab=meta["codebook_size"], image_len=meta["image_len"],
                     text_vocab=tok.vocab_size, eot_token=tok.eot_id)
    overrides.update({k: cfg[k] for k in MODEL_FLAGS if cfg[k]})
    if cfg["dropout"] >= 0:
        overrides["dropout"] = cfg["dropout"]
    if cfg["positions"]:
        overrides["positions"] = cfg["positions"]
    return biart.BiARTConfig.preset(cfg["preset"], **overrides)


def check_layout(path: str, saved: biart.BiARTConfig, meta: dict, tok: tokenizer.Tokenizer):
    want = dict(image_vocab=meta["codebook_size"], image_len=meta["image_len"],
                text_vocab=tok.vocab_size, eot_token=tok.eot_id)
    wrong = [f"{k} {getattr(saved, k)} vs {v}" for k, v in want.items() if getattr(saved, k) != v]
    if wrong:
        raise ValueError(f"{path}: its layout does not match the tokens and tokenizer ({'; '.join(wrong)})")


# -----------------------------------------------------------------------------------------

def main(argv: list | None = None) -> biart.BiART:
    cfg = data.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)

    # -- processes, device, precision ----------------------------------------------------
    ddp, rank, world, device = data.start_processes(cfg["device"])
    master = rank == 0

    # -- the run: fresh or resumed ----------------------------------------------------------
    resume_ckpt = None
    if cfg["resume"]:
        cfg, resume_ckpt = data.resume_settings(cfg, CHECKPOINT_KIND)
    else:
        cfg.pop("_given")
    # --dtype auto: bf16 where the GPU has it, else fp16 (the paper's FP16) with a GradScaler
    ctx, dtype, amp = data.autocast_context(device, cfg["dtype"])
    out = cfg["out"]
    for key in ("batch_size", "max_steps", "log_every", "eval_every", "ckpt_every"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    data.require_nonnegative(cfg, ("warmup_steps", "warmdown_steps", "ref_weight"))
    if not 0.0 <= cfg["bpe_dropout"] < 1.0:
        raise ValueError(f"--bpe-dropout must be in [0, 1), got {cfg['bpe_dropout']}")
    if not 0.0 < cfg["t2i_share"] < 1.0:
        raise ValueError(f"--t2i-share must be between 0 and 1 (both directions train), got {cfg['t2i_share']}")
    if cfg["mix"] and not 0 < round(cfg["batch_size"] * cfg["t2i_share"]) < cfg["batch_size"]:
        raise ValueError(f"--mix with --t2i-share {cfg['t2i_share']} leaves one direction no row of "
                         f"--batch-size {cfg['batch_size']}")
    total_batch = cfg["total_batch"] or cfg["batch_size"] * world
    if total_batch % (cfg["batch_size"] * world):
        raise ValueError(f"--total-batch {total_batch} is not a multiple of --batch-size {cfg['batch_size']} "
                         f"x {world} process(es)")
    grad_accum = total_batch // (cfg["batch_size"] * world)

    meta = read_meta(cfg["tokens"])
    tok = tokenizer.Tokenizer(cfg["bpe"] or None)
    tok_info = tokenizer_info(tok)

    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # -- model --------------------------------------------------------------------------------
    if resume_ckpt is not None:
        mcfg = biart.BiARTConfig.from_dict(resume_ckpt["config"])
        check_layout(os.path.join(out, "ckpt.pt"), mcfg, meta, tok)
        if resume_ckpt["tokenizer"]["sha256"] != tok_info["sha256"]:
            raise ValueError(f"--resume: the run used tokenizer {resume_ckpt['tokenizer']['path']} "
                             f"(sha256 {resume_ckpt['tokenizer']['sha256'][:12]}...), not {tok_info['path']}")
        if resume_ckpt["tokens_meta"]["vae_sha256"] != meta["vae_sha256"]:
            raise ValueError(f"--resume: {cfg['tokens']} was re-encoded with another AugVAE since this run started")
        model = biart.BiART(mcfg)
        model.load_state_dict(resume_ckpt["model"], strict=True)
    else:
        mcfg = model_config(cfg, meta, tok)
        model = biart.BiART(mcfg)
        if cfg["init"]:
            init = data.load_checkpoint(cfg["init"], CHECKPOINT_KIND)
            saved = biart.BiARTConfig.from_dict(init["config"])
            check_layout(cfg["init"], saved, meta, tok)
            diff = [k for k, v in mcfg.to_dict().items() if k != "dropout" and saved.to_dict()[k] != v]
            if diff:
                raise ValueError(f"--init {cfg['init']}: its model differs in {', '.join(diff)} "
                                 f"(give the matching --preset / --text-len / sizes)")
            if init.get("tokenizer", {}).get("sha256") != tok_info["sha256"]:
                raise ValueError(f"--init {cfg['init']}: was trained with another tokenizer than {tok_info['path']}")
            model.load_state_dict(init["model"], strict=True)
            del init
    model.to(device)  # first: NCCL broadcasts CUDA tensors only
    if ddp:  # every rank starts from rank 0's weights
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)
    raw = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    lr = cfg["lr"] or cfg["lr_per_sample"] * total_batch
    optimizer = raw.configure_optimizers(cfg["weight_decay"], lr, (0.9, 0.95), 1e-8, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    step, best_val, bad_evals = 0, math.inf, 0
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        step, best_val, bad_evals, lr = (resume_ckpt[k] for k in ("step", "best_val", "bad_evals", "lr"))
        data.set_rng_state(resume_ckpt["rng"][rank] if rank < len(resume_ckpt["rng"]) else resume_ckpt["rng"][0])
        del resume_ckpt

    # -- data ---------------------------------------------------------------------------------
    common = dict(tok=tok, config=mcfg, seed=cfg["seed"], truncate=cfg["truncate"])
    train_ds = TokenCaptions(cfg["tokens"], "train", train=True, bpe_dropout=cfg["bpe_dropout"], **common)
    val_ds = TokenCaptions(cfg["tokens"], "val", train=False, bpe_dropout=0.0, **common)
    sampler = data.MicroBatches(len(train_ds), cfg["batch_size"], rank, world, cfg["seed"], step * grad_accum)
    loader = iter(torch.utils.data.DataLoader(data.EpochIndexed(train_ds, len(train_ds)), batch_sampler=sampler,
                                              num_workers=cfg["workers"], pin_memory=device.type == "cuda",
                                              generator=torch.Generator().manual_seed(cfg["seed"])))
    n_val = min(len(val_ds), cfg["eval_images"] or len(val_ds))
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_ds, list(range(rank, n_val, world))),
        batch_size=cfg["batch_size"], num_workers=cfg["workers"],
        generator=torch.Generator().manual_seed(cfg["seed"]))  # keeps the global RNG untouched

    # -- logging ------------------------------------------------------------------------------
    log_file = None
    if master:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"train": cfg, "model": mcfg.to_dict(), "world_size": world, "tokenizer": tok_info,
                       "tokens": {k: meta[k] for k in ("vae", "vae_sha256", "source", "splits")}}, f, indent=2)
        log_file = open(os.path.join(out, "log.txt"), "a")

    def log(msg: str):
        if master:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"{'resuming' if cfg['resume'] else 'training'} BiART in {out}: {raw.get_num_params():,} parameters "
        f"({mcfg.n_layer} layers, d {mcfg.n_embd}, {mcfg.n_head} heads), text_len {mcfg.text_len} + image_len "
        f"{mcfg.image_len}, vocab {mcfg.vocab_size} (image {mcfg.image_vocab}, text {mcfg.text_vocab}); "
        f"{world} process(es) on {device}, {str(dtype).replace('torch.', '')}, batch {total_batch} (accumulation {grad_accum}), "
        f"lr {lr:.3g}, step {step}/{cfg['max_steps']}, "
        + ("both directions per batch" if cfg["mix"]
           else "alternating t2i / i2t per step" if cfg["t2i_share"] == 0.5 else "one direction per step")
        + (f", text->image share {cfg['t2i_share']:g}" if cfg["t2i_share"] != 0.5 else ""))
    log(f"data: {len(train_ds)} training images ({sum(map(len, train_ds.captions))} captions"
        + (f", {train_ds.crops.shape[1]} crops each" if train_ds.crops is not None else "")
        + f"), {n_val} validation images; tokenizer {tok_info['path']} ({tok.vocab_size} ids)"
        + (f"; {train_ds.truncated + val_ds.truncated} caption(s) truncated to text_len" if cfg["truncate"] else ""))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate() -> dict:
        """Mean NLL per direction and part over the val images (token-weighted, all ranks); each
        direction's loss weights the condition part by --ref-weight, as training does."""
        raw.eval()
        sums = torch.zeros(8, device=device, dtype=torch.float64)  # per direction: ref sum, n, gen sum, n
        for text, image in val_loader:
            text, image = text.to(device), image.to(device)
            n_text = float((text != mcfg.pad_id).sum())  # text targets: caption ids and end-of-text
            n_image = float(image.numel())
            for d, direction in enumerate(biart.DIRECTIONS):
                idx, seg, targets = biart.build_sequence(text, image, direction, mcfg)
                with ctx:
                    _, _, parts = raw(idx, seg, targets)
                n_ref, n_gen = (n_text, n_image) if direction == "t2i" else (n_image, n_text)
                sums[4 * d:4 * d + 4] += torch.tensor([float(parts["ref"]) * n_ref, n_ref,
                                                       float(parts["gen"]) * n_gen, n_gen],
                                                      device=device, dtype=torch.float64)
        if ddp:
            dist.all_reduce(sums)
        raw.train()
        res, w = {}, cfg["ref_weight"]
        for d, direction in enumerate(biart.DIRECTIONS):
            s = sums[4 * d:4 * d + 4].tolist()
            res[direction] = {"ref": s[0] / max(s[1], 1), "gen": s[2] / max(s[3], 1),
                              "loss": (w * s[0] + s[2]) / max(w * s[1] + s[3], 1)}
        res["val_loss"] = sum(res[d]["loss"] for d in biart.DIRECTIONS) / len(biart.DIRECTIONS)
        return res

    def save_checkpoint(rngs):
        ckpt = {
            "kind": CHECKPOINT_KIND, "format_version": data.CHECKPOINT_FORMAT,
            "config": mcfg.to_dict(), "model": raw.state_dict(),
            "train": {k: v for k, v in cfg.items() if k not in ("resume",)},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "data_position": step * grad_accum, "lr": lr,
            "best_val": best_val, "bad_evals": bad_evals, "rng": rngs,
            "tokenizer": tok_info, "tokens_meta": {k: v for k, v in meta.items() if k not in ("skipped", "plan")},
        }
        data.save_checkpoint(ckpt, os.path.join(out, "ckpt.pt"))

    def eval_and_log() -> dict:
        ev = evaluate()
        log(f"eval step {step}: val_loss {ev['val_loss']:.4f} | "
            + " | ".join(f"{d} loss {ev[d]['loss']:.4f} [REF] {ev[d]['ref']:.4f} [GEN] {ev[d]['gen']:.4f}"
                         for d in biart.DIRECTIONS))
        return ev

    # -- the training loop -------------------------------------------------------------------------
    if step == 0:  # the starting point (changes no state: eval mode draws no random numbers)
        best_val = eval_and_log()["val_loss"]
    raw.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc="BiART", dynamic_ncols=True)
    t0, seen, train_time = time.time(), 0, 0.0
    window = torch.zeros(2, 4, dtype=torch.float64)  # per direction: loss, ref, gen, micro-steps
    tokens_per_seq = mcfg.block_size - 1
    try:  # the bar closes before any error message, which then stays the last line
        while step < cfg["max_steps"]:
            lr_now = data.scheduled_lr(lr, step, cfg["max_steps"], cfg["warmup_steps"], cfg["warmdown_steps"],
                                       cfg["min_lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            t_step = time.time()
            direction = "mix" if cfg["mix"] else step_direction(step, cfg["t2i_share"])  # SPEC 2: alternate
            for micro in range(grad_accum):
                text, image = next(loader)
                text, image = text.to(device, non_blocking=True), image.to(device, non_blocking=True)
                idx, seg, targets = batch_sequences(text, image, direction, mcfg, cfg["t2i_share"])
                sync = not ddp or micro == grad_accum - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                    _, loss, parts = model(idx, seg, targets, ref_weight=cfg["ref_weight"])
                data.check_finite_loss(loss, step, os.path.join(out, "ckpt.pt"), world)
                scaler.scale(loss / grad_accum).backward()
                d = 0 if direction in ("t2i", "mix") else 1
                terms = [loss.detach(), parts["ref"].detach(), parts["gen"].detach()]
                window[d] += torch.tensor([float(t) for t in terms] + [1.0], dtype=torch.float64)
            if cfg["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += total_batch
            train_time += time.time() - t_step
            bar.update(1)

            if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
                if ddp:  # every logged number is the mean over all ranks
                    w = window.to(device)
                    dist.all_reduce(w)
                    window = w.cpu() / world
                names = ("mix",) if cfg["mix"] else biart.DIRECTIONS
                parts_msg = " | ".join(f"{name} loss {w[0] / w[3]:.4f} ref {w[1] / w[3]:.4f} gen {w[2] / w[3]:.4f}"
                                       for name, w in zip(names, window) if w[3] > 0)
                bar.set_postfix(loss=f"{float(window[:, 0].sum() / window[:, 3].sum()):.4f}")
                log(f"step {step} {parts_msg} lr {lr_now:.3g} "
                    f"{seen * tokens_per_seq / train_time:.0f} tok/s")
                window.zero_()

            last = step == cfg["max_steps"]
            if step % cfg["eval_every"] == 0 or last:
                ev = eval_and_log()
                if ev["val_loss"] < best_val:
                    best_val, bad_evals = ev["val_loss"], 0
                elif step >= cfg["warmup_steps"]:
                    bad_evals += 1
                    if bad_evals >= cfg["plateau_patience"] and lr / 2 >= cfg["min_lr"]:
                        lr, bad_evals = lr / 2, 0
                        log(f"validation loss plateaued: lr halved to {lr:.3g}")
            if step % cfg["ckpt_every"] == 0 or last:
                rngs = data.all_rng_states(world)
                if master:
                    save_checkpoint(rngs)
                    log(f"saved checkpoint step {step} to {os.path.join(out, 'ckpt.pt')}")
                if ddp:
                    dist.barrier()
    finally:
        bar.close()
    if master:
        log(f"done: {step} steps in {time.time() - t0:.0f} s this session")
        log_file.close()
    if ddp:
        dist.destroy_process_group()
    return raw


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, data.TrainingError) as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
