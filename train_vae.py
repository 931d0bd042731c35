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
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import augvae
import data
import runtime

FLAGS = dict(  # name: (default, help); each is the flag --name (underscores become dashes)
    init=("", "ML checkpoint to fine-tune into SL (needed by --sl unless --resume)"),
    out=(None, "output folder for ckpt.pt, log.txt, config.json and grids (default: out/vae_ml or out/vae_sl)", str),
    resume=(False, "continue exactly where OUT/ckpt.pt stopped; an error if it does not exist"),
    # model
    preset=("small", "model preset: " + ", ".join(augvae.PRESETS)),
    image_size=(None, "image resolution in pixels (default: the preset's)", int),
    codebook_size=(None, "ML: codes in the shared codebook (default: the preset's; paper 8192, small 512)", int),
    quantizer=("robust", "'robust': data-driven codebook init and dead-code restarts; 'faithful': the release's behaviour"),
    sl_quantize_finest=(False, "SL only: still quantize the 64x64 level (adds its commitment loss and codebook updates), as the released code does"),
    # data
    data=("shapes", "'shapes' for the built-in captioned shapes, 'fashion-mnist' (its official train images; validation on a "
         "slice of them, as prepare.py holds out), a folder of images (ImageNet-style or flat), or tar shards "
         "('shards/{00000..00099}.tar', globs too: img2dataset's webdataset output, streamed)"),
    fashion_root=(data.FASHION_ROOT, "--data fashion-mnist: the folder with the idx files (train-images-idx3-ubyte.gz, ...)"),
    num_objects=(1, "shapes: objects per image (1 or 2)"),
    recolour=(False, "shapes: draw each training image's objects in random colours, every colour/shape pair "
                     "included (pairs held out from BiART are then seen by the AugVAE, as pixels without captions), "
                     "so that the codes of a shape need not depend on its colour"),
    train_size=(20000, "shapes: number of training images"),
    val_size=(256, "validation images (shapes: generated; folders: at most this many evaluated)"),
    val_fraction=(0.01, "image folders without a val/ subfolder, tar shards and fashion-mnist: fraction of the training "
                 "images held out for validation (the same images prepare.py holds out with the same --seed)"),
    workers=(0, "DataLoader worker processes (0 loads in the main process); tar shards: at most one per shard of a process"),
    shuffle_buffer=(500, "tar shards: images each worker shuffles among (uint8: 500 x 196 KB at 256 px); a resume "
                         "starts at the first shard not read through"),
    # optimisation (appendix A)
    batch_size=(32, "images per process per micro-step"),
    grad_accum=(1, "micro-steps accumulated per optimizer step"),
    max_steps=(None, "total optimizer steps (a resumed run continues to this; default: 400 for --ml, 1000 for --sl, "
                     "the CPU demo's)", int),
    lr=(None, "learning rate (default: --lr-per-sample x total batch size)", float),
    lr_per_sample=(3.125e-5, "learning rate per image of the total batch: lr = this x total batch. The default (1e-3 at batch 32) "
                  "is measured on the CPU shapes demo; the paper's rule (appendix A) is 4.5e-6"),
    weight_decay=(1e-5, "AdamW weight decay (paper: 1e-5)"),
    plateau_patience=(3, "evaluations without a better validation loss before the lr is halved"),
    min_lr=(1e-6, "lower bound for the halving, and where the warmdown ends"),
    warmdown_steps=(0, "linear decay of the learning rate to --min-lr over the last this many of --max-steps "
                   "(0: none; on the CPU demo it sharpens the short SL fine-tuning)"),
    grad_clip=(1.0, "clip the gradient norm to this; 0 turns clipping off, as in the release (on the CPU demo, clipping at 1 "
              "removed the loss spikes of lr 1e-3 and gave +1.1 dB at 750 SL steps)"),
    # loss
    lpips_vgg=("", "torchvision VGG16 weights file (e.g. vgg16-397923af.pth); LPIPS needs it and --lpips-heads"),
    lpips_heads=("", "LPIPS v0.1 linear-head weights for VGG (the lpips project's weights/v0.1/vgg.pth)"),
    lpips_weight=(0.1, "weight of LPIPS in the loss (paper: 0.1)"),
    fg_weight=(None, "weight of foreground pixels (those far from the image's median colour) in the MSE "
                     "(default: 10 on shapes, 1 elsewhere)", float),
    # system
    device=("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"),
    dtype=("float32", "autocast dtype: float32 (off; the paper trains AugVAE in fp32), bfloat16 (CUDA, or CPU: about 2x faster "
          "on CPUs with AMX / AVX512-BF16), float16 with a GradScaler (CUDA), or auto (bf16 on a GPU that has it, "
          "fp32 on CPU); the quantizer always runs in fp32"),
    seed=(0, "random seed (model init, data order, augmentation)"),
    log_every=(20, "log the training loss every N steps"),
    eval_every=(250, "evaluate on the validation set and save a reconstruction grid every N steps"),
    ckpt_every=(250, "write OUT/ckpt.pt every N steps (and at the end)"),
    grid_images=(8, "images in each reconstruction grid"),
)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(
        description="Train AugVAE-ML (--ml), or fine-tune it into AugVAE-SL (--sl --init ML.pt).",
        argument_default=argparse.SUPPRESS if suppress else None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ml", dest="stage", action="store_const", const="ml", help="train the multi-level model")
    g.add_argument("--sl", dest="stage", action="store_const", const="sl", help="fine-tune the single-level model from --init")
    runtime.add_flags(p, FLAGS, suppress)
    return p


# -----------------------------------------------------------------------------------------
# data

def make_datasets(cfg: dict, image_size: int) -> tuple:
    """-> (train dataset, validation dataset) of (3, H, W) tensors in [-1, 1] (image folders:
    data.WithSkips, which also hands on what was skipped); tar shards: (the shard paths, the
    validation images)."""
    if data.is_shard_spec(cfg["data"]):
        shards = data.list_shards(cfg["data"])
        missing = [p for p in shards if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"--data: shard {missing[0]}: no such file" + (f" (and {len(missing) - 1} more)"
                                                                                   if len(missing) > 1 else ""))
        val = data.shard_validation(shards, image_size, cfg["val_size"], cfg["val_fraction"], cfg["seed"])
        return shards, val
    if cfg["data"] == "shapes":
        train = data.ShapesDataset("train", cfg["train_size"], image_size, cfg["num_objects"], cfg["seed"],
                                   cfg["recolour"])
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
    return data.WithSkips(train), data.WithSkips(val)


def images(batch, skipped: data.Skipped) -> torch.Tensor:
    """A loader's batch -> its images; what the loader skipped on the way goes to `skipped`."""
    if isinstance(batch, (list, tuple)):
        batch, lines = batch
        skipped.add(lines)
    return batch


# -----------------------------------------------------------------------------------------
# the model: fresh, fine-tuned from ML, or resumed

def build_model(cfg: dict, resume_ckpt: dict | None) -> augvae.AugVAE:
    if resume_ckpt is not None:
        return augvae.from_checkpoint(resume_ckpt)
    if cfg["stage"] == "sl":
        ml = augvae.load(cfg["init"], single_level=False, flag="--init")
        return augvae.ml_to_sl(ml, sl_quantize_finest=cfg["sl_quantize_finest"])
    overrides = dict(quantizer_mode=cfg["quantizer"])
    for key in ("image_size", "codebook_size"):
        if cfg[key] is not None:
            overrides[key] = cfg[key]
    return augvae.AugVAE(augvae.preset(cfg["preset"], **overrides))


def resolve(cfg: dict) -> tuple:
    """Flags -> (settings, checkpoint to resume or None): a resumed run takes its saved
    settings (flags given now override them); the derived defaults are filled in."""
    resume_ckpt = None
    if cfg["resume"]:
        cfg, resume_ckpt = runtime.resume_settings(cfg, augvae.CHECKPOINT_KIND)
    else:
        cfg.pop("_given")
        if cfg["stage"] is None:
            raise ValueError("say which stage: --ml (multi-level) or --sl --init ML.pt (single-level)")
        if cfg["stage"] == "sl" and not cfg["init"]:
            raise ValueError("--sl needs --init ML_CHECKPOINT (the trained AugVAE-ML)")
        cfg["out"] = cfg["out"] or os.path.join("out", f"vae_{cfg['stage']}")
    if cfg["max_steps"] is None:
        cfg["max_steps"] = {"ml": 400, "sl": 1000}[cfg["stage"]]
    runtime.require_nonnegative(cfg, ("warmdown_steps",))
    if cfg["shuffle_buffer"] < 1:
        raise ValueError(f"--shuffle-buffer must be >= 1 (images per worker), got {cfg['shuffle_buffer']}")
    if cfg["recolour"] and cfg["data"] != "shapes":
        raise ValueError(f"--recolour draws the built-in shapes in other colours; it needs --data shapes, not {cfg['data']!r}")
    if cfg["fg_weight"] is None:
        cfg["fg_weight"] = 10.0 if cfg["data"] == "shapes" else 1.0
    return cfg, resume_ckpt


@torch.no_grad()
def evaluate(model: augvae.AugVAE, loader, loss_fn, ctx, device, world: int, grid_images: int,
             skipped: data.Skipped) -> dict:
    """Validation loss, PSNR, codebook usage and perplexity per token level (summed over all
    ranks), and the first batch's inputs and reconstructions for the grid."""
    model.eval()
    mcfg = model.cfg
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, psnr, images
    counts = torch.zeros(len(mcfg.token_levels), mcfg.codebook_size, device=device)
    grid = None
    for batch in loader:
        x = images(batch, skipped).to(device)
        with ctx:
            recon, commit, stats = model(x)
        loss, _ = loss_fn(recon, x)
        sums += torch.tensor([float(loss + commit) * len(x), float(augvae.psnr(recon, x).sum()), len(x)],
                             device=device, dtype=torch.float64)
        for j, level in enumerate(mcfg.token_levels):
            counts[j] += torch.bincount(stats["indices"][level].flatten(), minlength=mcfg.codebook_size)
        if grid is None:
            grid = [x[:grid_images].cpu(), recon[:grid_images].float().clamp(-1, 1).cpu()]
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    model.train()
    n = max(float(sums[2]), 1.0)
    return {"val_loss": float(sums[0]) / n, "val_psnr": float(sums[1]) / n, "grid": grid,
            "usage": [int((c > 0).sum()) for c in counts], "perplexity": [augvae.perplexity(c) for c in counts]}


# -----------------------------------------------------------------------------------------

def main(argv: list | None = None) -> augvae.AugVAE:
    cfg = runtime.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    ddp, rank, world, device = runtime.start_processes(cfg["device"])
    master = rank == 0
    cfg, resume_ckpt = resolve(cfg)
    stage, out = cfg["stage"], cfg["out"]
    ctx, dtype, amp = runtime.autocast_context(device, cfg["dtype"])
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # -- model, loss, optimizer ---------------------------------------------------------------
    raw = build_model(cfg, resume_ckpt)
    mcfg = raw.cfg
    # buffers are kept identical by the quantizer's own all-reduce: no per-step broadcast
    model = runtime.distribute(raw, device, ddp, broadcast_buffers=False)
    lpips = None
    if cfg["lpips_vgg"] or cfg["lpips_heads"]:
        if not (cfg["lpips_vgg"] and cfg["lpips_heads"]):
            raise ValueError("LPIPS needs both --lpips-vgg and --lpips-heads")
        lpips = augvae.load_lpips(runtime.load_weights(cfg["lpips_vgg"]),
                                  runtime.load_weights(cfg["lpips_heads"])).to(device)
    loss_fn = augvae.ReconstructionLoss(lpips, cfg["lpips_weight"], cfg["fg_weight"])
    total_batch = cfg["batch_size"] * cfg["grad_accum"] * world
    optimizer = torch.optim.AdamW(raw.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg["weight_decay"], fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    state = runtime.LoopState(lr=cfg["lr"] if cfg["lr"] is not None else cfg["lr_per_sample"] * total_batch)
    if resume_ckpt is not None:
        state = runtime.restore_training(resume_ckpt, optimizer, scaler, rank)

    # -- data ---------------------------------------------------------------------------------
    train_ds, val_ds = make_datasets(cfg, mcfg.image_size)
    stream = data.is_shard_spec(cfg["data"])
    if stream:  # each rank streams shards of its own; the position is per rank, in the checkpoint's "rng"
        saved = resume_ckpt and resume_ckpt["rng"]
        start = tuple(saved[rank]["data"]) if saved and len(saved) == world and "data" in saved[rank] else (0, 0)
        loader = data.ShardBatches(data.ShardImages(train_ds, mcfg.image_size, rank, world, cfg["seed"],
                                                    cfg["val_fraction"], cfg["shuffle_buffer"], start),
                                   cfg["batch_size"], cfg["workers"], device)
        val_loader = torch.utils.data.DataLoader(val_ds[rank::world], batch_size=cfg["batch_size"])
    else:
        loader, val_loader = runtime.loaders(train_ds, val_ds, cfg["batch_size"], rank, world, cfg["seed"],
                                             state.step * cfg["grad_accum"], cfg["workers"], device)

    # -- logging ------------------------------------------------------------------------------
    ckpt_path = os.path.join(out, "ckpt.pt")
    if master:
        runtime.write_json(os.path.join(out, "config.json"),
                           {"train": cfg, "model": mcfg.to_dict(), "world_size": world})
    log = runtime.Log(out, master)
    log(f"{'resuming' if cfg['resume'] else 'training'} AugVAE-{stage.upper()} in {out}: "
        f"{augvae.count_parameters(raw):,} parameters, levels {mcfg.levels}, {world} process(es) on {device}, "
        f"batch {total_batch}, lr {state.lr:.3g}, step {state.step}/{cfg['max_steps']}")
    lpips_note = " only (LPIPS is off: give --lpips-vgg and --lpips-heads to turn it on)"
    log("loss: MSE" + (f" + {cfg['lpips_weight']} LPIPS" if lpips else lpips_note)
        + (f", foreground weight {cfg['fg_weight']:g}" if cfg["fg_weight"] != 1 else ""))
    if stream:
        log(f"data: {len(train_ds)} tar shard(s), {len(val_ds)} validation images held out; "
            + ("" if loader.start == (0, 0) else f"resuming at shard {loader.start[1]} of epoch {loader.start[0]}; ")
            + (f"the checkpoint's {len(saved)} process position(s) do not fit {world} process(es): the shard order "
               "starts again; " if saved and len(saved) != world else "")
            + f"shuffle buffer {cfg['shuffle_buffer']} per worker")
    del resume_ckpt
    skipped = data.Skipped(log)

    # -- the training loop -------------------------------------------------------------------------
    raw.train()
    bar = tqdm(total=cfg["max_steps"], initial=state.step, disable=not master, desc=f"AugVAE-{stage.upper()}",
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    try:  # the bar closes before any error message, which then stays the last line
        while state.step < cfg["max_steps"]:
            lr_now = runtime.scheduled_lr(state.lr, state.step, cfg["max_steps"], 0, cfg["warmdown_steps"],
                                          cfg["min_lr"])
            runtime.set_lr(optimizer, lr_now)
            terms_sum = {}
            for micro in range(cfg["grad_accum"]):
                x = images(next(loader), skipped).to(device, non_blocking=True)
                sync = not ddp or micro == cfg["grad_accum"] - 1  # all-reduce on the last micro-step only
                with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                    recon, commit, stats = model(x)
                    loss, terms = loss_fn(recon, x)
                    loss = loss + commit
                runtime.check_finite_loss(loss, state.step, ckpt_path, world)
                scaler.scale(loss / cfg["grad_accum"]).backward()
                for k, v in {"loss": loss, "commit": commit, **terms}.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
            runtime.optimizer_step(raw, optimizer, scaler, cfg["grad_clip"])
            state.step += 1
            seen += total_batch
            bar.update(1)
            last = state.step == cfg["max_steps"]

            if state.step % cfg["log_every"] == 0 or last:
                used = [int((c > 0).sum()) for c in stats["counts"]]
                bar.set_postfix(loss=f"{terms_sum['loss']:.4f}")
                log(f"step {state.step} " + " ".join(f"{k} {v:.4f}" for k, v in terms_sum.items())
                    + f" codes/batch {used} lr {lr_now:.3g} {seen / (time.time() - t0):.1f} img/s")

            if state.step % cfg["eval_every"] == 0 or last:
                ev = evaluate(raw, val_loader, loss_fn, ctx, device, world, cfg["grid_images"], skipped)
                log(f"eval step {state.step}: val_loss {ev['val_loss']:.4f} val_psnr {ev['val_psnr']:.2f} dB "
                    f"codebook usage {ev['usage']} of {mcfg.codebook_size} perplexity "
                    f"{[round(p, 1) for p in ev['perplexity']]}" + (f"; images {skipped.summary()}" if skipped.seen else ""))
                if master and ev["grid"] is not None:
                    data.save_grid(ev["grid"], os.path.join(out, f"recon_{state.step:06d}.png"))
                verdict = state.after_eval(ev["val_loss"], cfg["plateau_patience"], cfg["min_lr"])
                if verdict == "better" and master:  # the model to use downstream: the best so far
                    runtime.save_checkpoint({
                        "kind": augvae.CHECKPOINT_KIND, "format_version": runtime.CHECKPOINT_FORMAT,
                        "config": mcfg.to_dict(), "model": raw.state_dict(), "step": state.step,
                        "val_loss": ev["val_loss"], "val_psnr": ev["val_psnr"]}, os.path.join(out, "best.pt"))
                    log(f"new best validation loss: saved {os.path.join(out, 'best.pt')}")
                elif verdict == "halved":
                    log(f"validation loss plateaued: lr halved to {state.lr:.3g}")

            if state.step % cfg["ckpt_every"] == 0 or last:
                runtime.save_training(ckpt_path, lambda rngs: runtime.training_checkpoint(
                    augvae.CHECKPOINT_KIND, mcfg.to_dict(), raw, optimizer, scaler, state, cfg,
                    cfg["grad_accum"], rngs), master, world, log, loader.position() if stream else None)
    finally:
        bar.close()
    log(f"images: {skipped.summary()}" + (" on rank 0" if world > 1 else ""))
    del model  # the DDP wrapper goes before its process group does (runtime.end_training)
    runtime.end_training(log, state.step, t0, ddp)
    return raw


if __name__ == "__main__":
    runtime.run_cli(main, "train_vae.py")
