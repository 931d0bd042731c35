"""
Train AugVAE (stage 1 of L-Verse): multi-level first, then fine-tune the single-level model.

    python train_vae.py --ml                                   # built-in shapes, CPU size
    python train_vae.py --sl --init out/vae_ml/best.pt
    torchrun --nproc_per_node 8 train_vae.py --ml --preset paper --data /data/imagenet \
        --batch-size 8 --dtype float32 --lpips-vgg vgg16.pth --lpips-heads lpips_vgg.pth

One script for CPU, one GPU and many (torchrun: gloo on CPU, NCCL on CUDA). Every setting
below is a command-line flag (`--help`); the resolved settings go to OUT/config.json.
OUT/ckpt.pt is the latest state, for --resume; OUT/best.pt holds the weights with the best
validation loss so far: the model to fine-tune (--sl --init) or to tokenize with (prepare.py).
A kill at any point loses at most `--ckpt-every` steps: `--resume` picks up from OUT/ckpt.pt
and, on CPU, reproduces the uninterrupted run bit for bit.
"""

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import augvae
import data

# -----------------------------------------------------------------------------------------
# defaults: each is the flag of the same name (underscores become dashes)
DEFAULTS = dict(
    stage=None,            # 'ml' or 'sl' (the --ml / --sl switches)
    init="",               # SL: the ML checkpoint to fine-tune from
    out="",                # output folder; '' -> out/vae_ml or out/vae_sl
    resume=False,          # continue from OUT/ckpt.pt (fails if there is none)
    # model
    preset="small",        # 'small' (64 px CPU demo) or 'paper' (256 px, 8192 x 256 codebook)
    image_size=0,          # 0 -> the preset's
    codebook_size=0,       # 0 -> the preset's (paper 8192, small 512)
    quantizer="robust",    # 'robust' (data init + dead-code restarts) or 'faithful' (the release)
    sl_quantize_finest=False,  # SL: also quantize the unused 64x64 level like the release
    # data
    data="shapes",         # 'shapes' (built in), 'fashion-mnist', or an image folder (with train/ and val/, or split)
    fashion_root=data.FASHION_ROOT,  # fashion-mnist: the folder of the idx files
    num_objects=1,         # shapes: objects per image
    train_size=20000,      # shapes: training images (generated on the fly)
    val_size=256,          # shapes: validation images; folders: at most this many are evaluated
    val_fraction=0.01,     # folders without val/, fashion-mnist: share of train held out for validation
    workers=0,             # DataLoader worker processes
    # optimisation (appendix A)
    batch_size=32,         # images per process per micro-step
    grad_accum=1,          # micro-steps per optimizer step
    max_steps=0,           # optimizer steps in all; 0 -> 400 for --ml, 1000 for --sl (the CPU demo)
    lr=0.0,                # 0 -> lr_per_sample x total batch
    lr_per_sample=3.125e-5,  # lr = this x total batch; the paper's 4.5e-6 is for paper scale
    weight_decay=1e-5,
    plateau_patience=3,    # halve the lr after this many evaluations without a better val loss
    min_lr=1e-6,           # never halve below this
    warmdown_steps=0,      # linear decay to min_lr over the last this many of max_steps (0: none)
    grad_clip=1.0,         # clip the gradient norm (0: off, as in the release)
    # loss
    lpips_vgg="",          # torchvision vgg16 weights (.pth); with --lpips-heads turns LPIPS on
    lpips_heads="",        # LPIPS v0.1 linear heads for vgg (.pth)
    lpips_weight=0.1,
    fg_weight=-1.0,        # <0 -> 10 on the built-in shapes, 1 (plain MSE) elsewhere
    # system
    device="auto",         # 'auto', 'cpu', 'cuda', 'cuda:N'
    dtype="float32",       # autocast: 'float32' (the paper), 'bfloat16' (CUDA or CPU), 'float16' (CUDA), 'auto'
    seed=0,
    log_every=20,
    eval_every=250,        # evaluate, save a reconstruction grid and checkpoint every N steps
    ckpt_every=250,
    grid_images=8,
)

HELP = dict(
    init="ML checkpoint to fine-tune into SL (needed by --sl unless --resume)",
    out="output folder for ckpt.pt, log.txt, config.json and grids (default out/vae_ml or out/vae_sl)",
    resume="continue exactly where OUT/ckpt.pt stopped; an error if it does not exist",
    preset="model preset: " + ", ".join(augvae.PRESETS),
    image_size="image resolution in pixels; 0 takes the preset's",
    codebook_size="ML: codes in the shared codebook; 0 takes the preset's (paper 8192, small 512)",
    quantizer="'robust': data-driven codebook init and dead-code restarts; 'faithful': the release's behaviour",
    sl_quantize_finest="SL only: still quantize the 64x64 level (adds its commitment loss and codebook updates), as the released code does",
    data="'shapes' for the built-in captioned shapes, 'fashion-mnist' (its official train images; validation on a "
         "slice of them, as prepare.py holds out), or a folder of images (ImageNet-style or flat)",
    fashion_root="--data fashion-mnist: the folder with the idx files (train-images-idx3-ubyte.gz, ...)",
    num_objects="shapes: objects per image (1 or 2)",
    train_size="shapes: number of training images",
    val_size="validation images (shapes: generated; folders: at most this many evaluated)",
    val_fraction="image folders without a val/ subfolder, and fashion-mnist: fraction of the training images held out "
                 "for validation (the same slice prepare.py holds out with the same --seed)",
    workers="DataLoader worker processes (0 loads in the main process)",
    batch_size="images per process per micro-step",
    grad_accum="micro-steps accumulated per optimizer step",
    max_steps="total optimizer steps (a resumed run continues to this); 0: 400 for --ml, 1000 for --sl, the CPU demo's",
    lr="learning rate; 0 derives it as --lr-per-sample x total batch size",
    lr_per_sample="learning rate per image of the total batch: lr = this x total batch. The default (1e-3 at batch 32) "
                  "is measured on the CPU shapes demo; the paper's rule (appendix A) is 4.5e-6",
    weight_decay="AdamW weight decay (paper: 1e-5)",
    plateau_patience="evaluations without a better validation loss before the lr is halved",
    min_lr="lower bound for the halving, and where the warmdown ends",
    warmdown_steps="linear decay of the learning rate to --min-lr over the last this many of --max-steps "
                   "(0: none; on the CPU demo it sharpens the short SL fine-tuning)",
    grad_clip="clip the gradient norm to this; 0 turns clipping off, as in the release (on the CPU demo, clipping at 1 "
              "removed the loss spikes of lr 1e-3 and gave +1.1 dB at 750 SL steps)",
    lpips_vgg="torchvision VGG16 weights file (e.g. vgg16-397923af.pth); LPIPS needs it and --lpips-heads",
    lpips_heads="LPIPS v0.1 linear-head weights for VGG (the lpips project's weights/v0.1/vgg.pth)",
    lpips_weight="weight of LPIPS in the loss (paper: 0.1)",
    fg_weight="weight of foreground pixels (those far from the image's median colour) in the MSE; <0: 10 on shapes, 1 elsewhere",
    device="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'",
    dtype="autocast dtype: float32 (off; the paper trains AugVAE in fp32), bfloat16 (CUDA, or CPU: about 2x faster "
          "on CPUs with AMX / AVX512-BF16), float16 with a GradScaler (CUDA), or auto (bf16 on a GPU that has it, "
          "fp32 on CPU); the quantizer always runs in fp32",
    seed="random seed (model init, data order, augmentation)",
    log_every="log the training loss every N steps",
    eval_every="evaluate on the validation set and save a reconstruction grid every N steps",
    ckpt_every="write OUT/ckpt.pt every N steps (and at the end)",
    grid_images="images in each reconstruction grid",
)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = data.ArgumentParser(
        description="Train AugVAE-ML (--ml), or fine-tune it into AugVAE-SL (--sl --init ML.pt).",
        argument_default=argparse.SUPPRESS if suppress else None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ml", dest="stage", action="store_const", const="ml", help="train the multi-level model")
    g.add_argument("--sl", dest="stage", action="store_const", const="sl", help="fine-tune the single-level model from --init")
    data.add_flags(p, {k: v for k, v in DEFAULTS.items() if k != "stage"}, HELP, suppress)
    return p


# -----------------------------------------------------------------------------------------
# data

def make_datasets(cfg: dict, image_size: int) -> tuple:
    """-> (train dataset, validation dataset) of (3, H, W) tensors in [-1, 1]."""
    if cfg["data"] == "shapes":
        train = data.ShapesDataset("train", cfg["train_size"], image_size, cfg["num_objects"], cfg["seed"])
        val = data.ShapesDataset("val", cfg["val_size"], image_size, cfg["num_objects"], cfg["seed"])
        return train, val
    if cfg["data"] == "fashion-mnist":  # the official test images are never read here
        n = len(data.read_fashion_mnist(cfg["fashion_root"], "train")[0])
        train_idx, val_idx = data.split_indices(n, cfg["val_fraction"], cfg["seed"])
        train = data.FashionMNIST(cfg["fashion_root"], "train", image_size, train_idx)
        val = data.FashionMNIST(cfg["fashion_root"], "train", image_size, val_idx[:cfg["val_size"]])
        return train, val
    root = cfg["data"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r}: no such folder (use 'shapes' for the built-in data)")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train = data.ImageFolder(os.path.join(root, "train"), image_size, train=True, seed=cfg["seed"])
        val = data.ImageFolder(os.path.join(root, "val"), image_size, train=False, seed=cfg["seed"])
        val_idx = list(range(len(val)))
    else:
        train = data.ImageFolder(root, image_size, train=True, seed=cfg["seed"])
        val = data.ImageFolder(root, image_size, train=False, seed=cfg["seed"])
        train_idx, val_idx = data.split_indices(len(train), cfg["val_fraction"], cfg["seed"])
        train = torch.utils.data.Subset(train, train_idx)
    val = torch.utils.data.Subset(val, val_idx[:cfg["val_size"]])
    return train, val


# -----------------------------------------------------------------------------------------
# checkpoints

def load_ml_for_sl(path: str, cfg: dict) -> augvae.AugVAE:
    ckpt = data.load_checkpoint(path, augvae.CHECKPOINT_KIND)
    mcfg = augvae.AugVAEConfig.from_dict(ckpt["config"])
    if mcfg.single_level:
        raise ValueError(f"--init {path}: is already a single-level (SL) checkpoint; give the ML one")
    ml = augvae.AugVAE(mcfg)
    ml.load_state_dict(ckpt["model"], strict=True)
    return augvae.ml_to_sl(ml, sl_quantize_finest=cfg["sl_quantize_finest"])


# -----------------------------------------------------------------------------------------

def main(argv: list | None = None) -> augvae.AugVAE:
    cfg = data.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)

    # -- processes, device, precision ----------------------------------------------------
    ddp, rank, world, device = data.start_processes(cfg["device"])
    master = rank == 0

    # -- the run: fresh or resumed ----------------------------------------------------------
    resume_ckpt = None
    if cfg["resume"]:
        cfg, resume_ckpt = data.resume_settings(cfg, augvae.CHECKPOINT_KIND)
    else:
        cfg.pop("_given")
        if cfg["stage"] is None:
            raise ValueError("say which stage: --ml (multi-level) or --sl --init ML.pt (single-level)")
        cfg["out"] = cfg["out"] or os.path.join("out", f"vae_{cfg['stage']}")
    stage, out = cfg["stage"], cfg["out"]
    ctx, dtype, amp = data.autocast_context(device, cfg["dtype"])
    if stage == "sl" and not cfg["resume"] and not cfg["init"]:
        raise ValueError("--sl needs --init ML_CHECKPOINT (the trained AugVAE-ML)")
    if cfg["max_steps"] <= 0:
        cfg["max_steps"] = {"ml": 400, "sl": 1000}[stage]
    data.require_nonnegative(cfg, ("warmdown_steps",))
    if cfg["fg_weight"] < 0:
        cfg["fg_weight"] = 10.0 if cfg["data"] == "shapes" else 1.0

    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # -- model --------------------------------------------------------------------------------
    if resume_ckpt is not None:
        mcfg = augvae.AugVAEConfig.from_dict(resume_ckpt["config"])
        model = augvae.AugVAE(mcfg)
        model.load_state_dict(resume_ckpt["model"], strict=True)
    elif stage == "sl":
        model = load_ml_for_sl(cfg["init"], cfg)
        mcfg = model.cfg
    else:
        overrides = dict(quantizer_mode=cfg["quantizer"])
        if cfg["image_size"]:
            overrides["image_size"] = cfg["image_size"]
        if cfg["codebook_size"]:
            overrides["codebook_size"] = cfg["codebook_size"]
        mcfg = augvae.preset(cfg["preset"], **overrides)
        model = augvae.AugVAE(mcfg)
    model.to(device)  # first: NCCL broadcasts CUDA tensors only
    if ddp:  # every rank starts from rank 0's weights and buffers
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)
    raw = model
    if ddp:
        # buffers are kept identical by the quantizer's own all-reduce: no per-step broadcast
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False)

    lpips = None
    if cfg["lpips_vgg"] or cfg["lpips_heads"]:
        if not (cfg["lpips_vgg"] and cfg["lpips_heads"]):
            raise ValueError("LPIPS needs both --lpips-vgg and --lpips-heads")
        lpips = augvae.load_lpips(data.load_weights(cfg["lpips_vgg"]), data.load_weights(cfg["lpips_heads"])).to(device)
    loss_fn = augvae.ReconstructionLoss(lpips, cfg["lpips_weight"], cfg["fg_weight"])

    total_batch = cfg["batch_size"] * cfg["grad_accum"] * world
    lr = cfg["lr"] or cfg["lr_per_sample"] * total_batch
    optimizer = torch.optim.AdamW(raw.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg["weight_decay"], fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    step, best_val, bad_evals = 0, math.inf, 0
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        step, best_val, bad_evals = resume_ckpt["step"], resume_ckpt["best_val"], resume_ckpt["bad_evals"]
        data.set_rng_state(resume_ckpt["rng"][rank] if rank < len(resume_ckpt["rng"]) else resume_ckpt["rng"][0])
        lr = optimizer.param_groups[0]["lr"]
        del resume_ckpt

    # -- data ---------------------------------------------------------------------------------
    train_ds, val_ds = make_datasets(cfg, mcfg.image_size)
    sampler = data.MicroBatches(len(train_ds), cfg["batch_size"], rank, world, cfg["seed"], step * cfg["grad_accum"])
    loader = iter(torch.utils.data.DataLoader(data.EpochIndexed(train_ds, len(train_ds)), batch_sampler=sampler,
                                              num_workers=cfg["workers"], pin_memory=device.type == "cuda",
                                              generator=torch.Generator().manual_seed(cfg["seed"])))
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world))),
        batch_size=cfg["batch_size"], num_workers=cfg["workers"],
        generator=torch.Generator().manual_seed(cfg["seed"]))  # keeps the global RNG untouched

    # -- logging ------------------------------------------------------------------------------
    log_file = None
    if master:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"train": cfg, "model": mcfg.to_dict(), "world_size": world}, f, indent=2)
        log_file = open(os.path.join(out, "log.txt"), "a")

    def log(msg: str):
        if master:
            tqdm.write(msg)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"{'resuming' if cfg['resume'] else 'training'} AugVAE-{stage.upper()} in {out}: "
        f"{augvae.count_parameters(raw):,} parameters, levels {mcfg.levels}, {world} process(es) on {device}, "
        f"batch {total_batch}, lr {lr:.3g}, step {step}/{cfg['max_steps']}")
    log("loss: MSE" + (f" + {cfg['lpips_weight']} LPIPS" if lpips else
                       " only (LPIPS is off: give --lpips-vgg and --lpips-heads to turn it on)")
        + (f", foreground weight {cfg['fg_weight']:g}" if cfg["fg_weight"] != 1 else ""))
    for name, ds in (("train", train_ds), ("val", val_ds)):
        bad = getattr(getattr(ds, "dataset", ds), "bad_files", None)
        if bad:
            log(f"{name}: {len(bad)} unreadable image(s) skipped so far: " + "; ".join(f"{p} ({r})" for p, r in bad[:20]))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate() -> dict:
        raw.eval()
        sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, psnr, images
        counts = torch.zeros(len(mcfg.token_levels), mcfg.codebook_size, device=device)
        grid = None
        for x in val_loader:
            x = x.to(device)
            with ctx:
                recon, commit, stats = raw(x)
            loss, _ = loss_fn(recon, x)
            sums += torch.tensor([float(loss + commit) * len(x), float(augvae.psnr(recon, x).sum()), len(x)],
                                 device=device, dtype=torch.float64)
            for j, l in enumerate(mcfg.token_levels):
                counts[j] += torch.bincount(stats["indices"][l].flatten(), minlength=mcfg.codebook_size)
            if grid is None:
                grid = [x[:cfg["grid_images"]].cpu(), recon[:cfg["grid_images"]].float().clamp(-1, 1).cpu()]
        if ddp:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        raw.train()
        n = max(float(sums[2]), 1.0)
        res = {"val_loss": float(sums[0]) / n, "val_psnr": float(sums[1]) / n, "grid": grid}
        res["usage"] = [int((c > 0).sum()) for c in counts]
        res["perplexity"] = [augvae.perplexity(c) for c in counts]
        return res

    def save_checkpoint():
        ckpt = {
            "kind": augvae.CHECKPOINT_KIND, "format_version": data.CHECKPOINT_FORMAT,
            "config": mcfg.to_dict(), "model": raw.state_dict(),
            "train": {k: v for k, v in cfg.items() if k not in ("resume",)},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "data_position": step * cfg["grad_accum"],
            "best_val": best_val, "bad_evals": bad_evals, "rng": rngs,
        }
        data.save_checkpoint(ckpt, os.path.join(out, "ckpt.pt"))

    # -- the training loop -------------------------------------------------------------------------
    raw.train()
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, desc=f"AugVAE-{stage.upper()}",
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    try:  # the bar closes before any error message, which then stays the last line
        while step < cfg["max_steps"]:
            lr_now = data.scheduled_lr(lr, step, cfg["max_steps"], 0, cfg["warmdown_steps"], cfg["min_lr"])
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            terms_sum = {}
            for micro in range(cfg["grad_accum"]):
                x = next(loader).to(device, non_blocking=True)
                sync = not ddp or micro == cfg["grad_accum"] - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                    recon, commit, stats = model(x)
                    loss, terms = loss_fn(recon, x)
                    loss = loss + commit
                data.check_finite_loss(loss, step, os.path.join(out, "ckpt.pt"), world)
                scaler.scale(loss / cfg["grad_accum"]).backward()
                for k, v in {"loss": loss, "commit": commit, **terms}.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
            if cfg["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += total_batch
            bar.update(1)

            if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
                used = [int((c > 0).sum()) for c in stats["counts"]]
                bar.set_postfix(loss=f"{terms_sum['loss']:.4f}")
                log(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in terms_sum.items())
                    + f" codes/batch {used} lr {lr_now:.3g} {seen / (time.time() - t0):.1f} img/s")

            last = step == cfg["max_steps"]
            if step % cfg["eval_every"] == 0 or last:
                ev = evaluate()
                log(f"eval step {step}: val_loss {ev['val_loss']:.4f} val_psnr {ev['val_psnr']:.2f} dB "
                    f"codebook usage {ev['usage']} of {mcfg.codebook_size} perplexity "
                    f"{[round(p, 1) for p in ev['perplexity']]}")
                if master and ev["grid"] is not None:
                    data.save_grid(ev["grid"], os.path.join(out, f"recon_{step:06d}.png"))
                if ev["val_loss"] < best_val:
                    best_val, bad_evals = ev["val_loss"], 0
                    if master:  # the model to use downstream: the best validation loss so far
                        data.save_checkpoint({
                            "kind": augvae.CHECKPOINT_KIND, "format_version": data.CHECKPOINT_FORMAT,
                            "config": mcfg.to_dict(), "model": raw.state_dict(), "step": step,
                            "val_loss": ev["val_loss"], "val_psnr": ev["val_psnr"]}, os.path.join(out, "best.pt"))
                        log(f"new best validation loss: saved {os.path.join(out, 'best.pt')}")
                else:
                    bad_evals += 1
                    if bad_evals >= cfg["plateau_patience"] and lr / 2 >= cfg["min_lr"]:
                        lr, bad_evals = lr / 2, 0
                        log(f"validation loss plateaued: lr halved to {lr:.3g}")
            if step % cfg["ckpt_every"] == 0 or last:
                rngs = data.all_rng_states(world)
                if master:
                    save_checkpoint()
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
        print(f"train_vae.py: error: {e}", file=sys.stderr)
        sys.exit(2)
