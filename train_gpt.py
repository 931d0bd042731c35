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

Training (paper section 3.4, appendix B.2): each optimizer step is one direction, alternating text->image and
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
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import biart
import data
import runtime
import tokenizer

CHECKPOINT_KIND = "biart"

FLAGS = dict(  # name: (default, help); each is the flag --name (underscores become dashes)
    tokens=("out/tokens", "folder written by prepare.py ({split}.npy, {split}.jsonl, meta.json)"),
    bpe=(None, "tokenizer merges file (.txt.gz; default: CLIP's). A small one from `python tokenizer.py train` is much "
               "faster on shapes", str),
    out=("out/gpt", "output folder for ckpt.pt, log.txt and config.json"),
    resume=(False, "continue exactly where OUT/ckpt.pt stopped; an error if it does not exist"),
    init=("", "BiART checkpoint whose weights start this run (fine-tuning); its layout must match the data and tokenizer"),
    # model
    preset=("small", "model preset: " + ", ".join(biart.PRESETS)),
    text_len=(None, "text positions per caption, end-of-text included (default: the preset's)", int),
    n_layer=(None, "transformer blocks (default: the preset's)", int),
    n_head=(None, "attention heads (default: the preset's)", int),
    n_embd=(None, "width of the residual stream (default: the preset's)", int),
    dropout=(None, "residual, embedding and attention dropout (default: the preset's; paper 0.1)", float),
    positions=(None, "position embeddings: 'sequence' (minGPT: by place in the sequence, so the image grid sits at "
              "two places, one per direction) or 'canonical' (each token at its text->image place in both "
              "directions) (default: the preset's)", str),
    truncate=(False, "cut captions that do not fit text_len (default: stop and name the caption)"),
    # data
    bpe_dropout=(0.1, "BPE-dropout probability on training captions (paper: 0.1)"),
    mix=(False, "put both directions in every batch, half each (default: alternate t2i / i2t every optimizer step)"),
    t2i_share=(0.5, "share of the training in text->image order, the rest image->text: 0.5 (paper) alternates the "
              "steps; 2/3 makes two of every three steps text->image (with --mix: that share of each batch)"),
    eval_images=(512, "validation images per evaluation (0: the whole val split)"),
    workers=(0, "DataLoader worker processes (0 loads in the main process)"),
    # optimisation (appendix B.2)
    batch_size=(32, "sequences per process per micro-step"),
    total_batch=(None, "sequences per optimizer step over all processes, gradient accumulation making up the rest "
                       "(default: one micro-step, --batch-size x processes)", int),
    max_steps=(750, "total optimizer steps"),
    lr=(None, "learning rate (default: --lr-per-sample x total batch size)", float),
    lr_per_sample=(3.125e-5, "learning rate per sequence of the total batch: lr = this x total batch. The default (1e-3 at "
                  "batch 32) is measured on the CPU shapes demo; the paper's rule (appendix B.2) is 4.5e-7"),
    warmup_steps=(50, "linear learning-rate warmup over this many steps (0: none)"),
    warmdown_steps=(0, "linear decay of the learning rate to --min-lr over the last this many of --max-steps "
                   "(0: none; short fixed budgets such as demo.py's end better with it)"),
    weight_decay=(0.01, "AdamW weight decay on Linear weights (paper: 0.01)"),
    plateau_patience=(3, "evaluations without a better validation loss before the lr is halved"),
    min_lr=(1e-6, "lower bound for the halving"),
    grad_clip=(1.0, "clip the gradient norm to this (0: off)"),
    ref_weight=(1.0, "loss weight of each condition ([REF]) token relative to a target ([GEN]) token: 1 is the "
               "paper's mean over both parts, 0 trains on the target part alone"),
    # system
    device=("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"),
    dtype=("auto", "autocast dtype: auto (CUDA: bfloat16 where supported, else float16; CPU: float32), float32, "
          "bfloat16 (CUDA or CPU), float16 (CUDA, with a GradScaler)"),
    seed=(0, "random seed (model init, data order, caption and crop draws, dropout)"),
    log_every=(20, "log the training losses every N steps"),
    eval_every=(200, "evaluate on the validation split every N steps"),
    ckpt_every=(200, "write OUT/ckpt.pt every N steps (and at the end)"),
)

MODEL_FLAGS = ("text_len", "n_layer", "n_head", "n_embd", "dropout", "positions")  # None: the preset's value


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(description="Train BiART on prepare.py's tokens (text->image and image->text).",
                            argument_default=argparse.SUPPRESS if suppress else None)
    runtime.add_flags(p, FLAGS, suppress)
    return p


# -----------------------------------------------------------------------------------------
# data

def tokenizer_info(tok: tokenizer.Tokenizer) -> dict:
    return {"path": os.path.abspath(tok.bpe_path), "sha256": runtime.sha256_file(tok.bpe_path),
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


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
    overrides.update({k: cfg[k] for k in MODEL_FLAGS if cfg[k] is not None})
    return biart.BiARTConfig.preset(cfg["preset"], **overrides)


def check_layout(path: str, saved: biart.BiARTConfig, meta: dict, tok: tokenizer.Tokenizer):
    want = dict(image_vocab=meta["codebook_size"], image_len=meta["image_len"],
                text_vocab=tok.vocab_size, eot_token=tok.eot_id)
    wrong = [f"{k} {getattr(saved, k)} vs {v}" for k, v in want.items() if getattr(saved, k) != v]
    if wrong:
        raise ValueError(f"{path}: its layout does not match the tokens and tokenizer ({'; '.join(wrong)})")


# -----------------------------------------------------------------------------------------

def resolve(cfg: dict, world: int) -> tuple:
    """Flags -> (settings, checkpoint to resume or None, micro-steps per optimizer step): a
    resumed run takes its saved settings (flags given now override them); every value is checked."""
    resume_ckpt = None
    if cfg["resume"]:
        cfg, resume_ckpt = runtime.resume_settings(cfg, CHECKPOINT_KIND)
    else:
        cfg.pop("_given")
    for key in ("batch_size", "max_steps", "log_every", "eval_every", "ckpt_every"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    runtime.require_nonnegative(cfg, ("warmup_steps", "warmdown_steps", "ref_weight"))
    if not 0.0 <= cfg["bpe_dropout"] < 1.0:
        raise ValueError(f"--bpe-dropout must be in [0, 1), got {cfg['bpe_dropout']}")
    if not 0.0 < cfg["t2i_share"] < 1.0:
        raise ValueError(f"--t2i-share must be between 0 and 1 (both directions train), got {cfg['t2i_share']}")
    if cfg["mix"] and not 0 < round(cfg["batch_size"] * cfg["t2i_share"]) < cfg["batch_size"]:
        raise ValueError(f"--mix with --t2i-share {cfg['t2i_share']} leaves one direction no row of "
                         f"--batch-size {cfg['batch_size']}")
    total_batch = cfg["total_batch"] or cfg["batch_size"] * world  # None: one micro-step
    if total_batch % (cfg["batch_size"] * world):
        raise ValueError(f"--total-batch {total_batch} is not a multiple of --batch-size {cfg['batch_size']} "
                         f"x {world} process(es)")
    return cfg, resume_ckpt, total_batch // (cfg["batch_size"] * world)


def build_model(cfg: dict, resume_ckpt: dict | None, meta: dict, tok: tokenizer.Tokenizer,
                tok_info: dict) -> biart.BiART:
    """A fresh model laid out for the data and tokenizer, the --init weights, or the resumed run's."""
    if resume_ckpt is not None:
        mcfg = biart.BiARTConfig.from_dict(resume_ckpt["config"])
        check_layout(os.path.join(cfg["out"], "ckpt.pt"), mcfg, meta, tok)
        if resume_ckpt["tokenizer"]["sha256"] != tok_info["sha256"]:
            raise ValueError(f"--resume: the run used tokenizer {resume_ckpt['tokenizer']['path']} "
                             f"(sha256 {resume_ckpt['tokenizer']['sha256'][:12]}...), not {tok_info['path']}")
        if resume_ckpt["tokens_meta"]["vae_sha256"] != meta["vae_sha256"]:
            raise ValueError(f"--resume: {cfg['tokens']} was re-encoded with another AugVAE since this run started")
        return biart.from_checkpoint(resume_ckpt)
    mcfg = model_config(cfg, meta, tok)
    model = biart.BiART(mcfg)
    if cfg["init"]:
        init = runtime.load_checkpoint(cfg["init"], CHECKPOINT_KIND)
        saved = biart.BiARTConfig.from_dict(init["config"])
        check_layout(cfg["init"], saved, meta, tok)
        diff = [k for k, v in mcfg.to_dict().items() if k != "dropout" and saved.to_dict()[k] != v]
        if diff:
            raise ValueError(f"--init {cfg['init']}: its model differs in {', '.join(diff)} "
                             f"(give the matching --preset / --text-len / sizes)")
        if init.get("tokenizer", {}).get("sha256") != tok_info["sha256"]:
            raise ValueError(f"--init {cfg['init']}: was trained with another tokenizer than {tok_info['path']}")
        model.load_state_dict(init["model"], strict=True)
    return model


@torch.no_grad()
def evaluate(model: biart.BiART, loader, ctx, device, world: int, ref_weight: float) -> dict:
    """Mean NLL per direction and part over the val images (token-weighted, all ranks); each
    direction's loss weights the condition part by ref_weight, as training does."""
    model.eval()
    mcfg = model.config
    sums = torch.zeros(8, device=device, dtype=torch.float64)  # per direction: ref sum, n, gen sum, n
    for text, image in loader:
        text, image = text.to(device), image.to(device)
        n_text = float((text != mcfg.pad_id).sum())  # text targets: caption ids and end-of-text
        n_image = float(image.numel())
        for d, direction in enumerate(biart.DIRECTIONS):
            idx, seg, targets = biart.build_sequence(text, image, direction, mcfg)
            with ctx:
                _, _, parts = model(idx, seg, targets)
            n_ref, n_gen = (n_text, n_image) if direction == "t2i" else (n_image, n_text)
            sums[4 * d:4 * d + 4] += torch.tensor([float(parts["ref"]) * n_ref, n_ref,
                                                   float(parts["gen"]) * n_gen, n_gen],
                                                  device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    res = {}
    for d, direction in enumerate(biart.DIRECTIONS):
        s = sums[4 * d:4 * d + 4].tolist()
        res[direction] = {"ref": s[0] / max(s[1], 1), "gen": s[2] / max(s[3], 1),
                          "loss": (ref_weight * s[0] + s[2]) / max(ref_weight * s[1] + s[3], 1)}
    res["val_loss"] = sum(res[d]["loss"] for d in biart.DIRECTIONS) / len(biart.DIRECTIONS)
    return res


def eval_line(step: int, ev: dict) -> str:
    return f"eval step {step}: val_loss {ev['val_loss']:.4f} | " + " | ".join(
        f"{d} loss {ev[d]['loss']:.4f} [REF] {ev[d]['ref']:.4f} [GEN] {ev[d]['gen']:.4f}" for d in biart.DIRECTIONS)


def schedule_words(cfg: dict) -> str:
    """How the two directions share the training, for the start-up line."""
    if cfg["mix"]:
        words = "both directions per batch"
    elif cfg["t2i_share"] == 0.5:
        words = "alternating t2i / i2t per step"
    else:
        words = "one direction per step"
    return words + (f", text->image share {cfg['t2i_share']:g}" if cfg["t2i_share"] != 0.5 else "")


# -----------------------------------------------------------------------------------------

def main(argv: list | None = None) -> biart.BiART:
    cfg = runtime.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    ddp, rank, world, device = runtime.start_processes(cfg["device"])
    master = rank == 0
    cfg, resume_ckpt, grad_accum = resolve(cfg, world)
    out = cfg["out"]
    # --dtype auto: bf16 where the GPU has it, else fp16 (the paper's FP16) with a GradScaler
    ctx, dtype, amp = runtime.autocast_context(device, cfg["dtype"])
    meta = data.read_meta(cfg["tokens"])
    tok = tokenizer.Tokenizer(cfg["bpe"] or None)  # a checkpoint before None defaults holds ""
    tok_info = tokenizer_info(tok)
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # -- model and optimizer ------------------------------------------------------------------
    raw = build_model(cfg, resume_ckpt, meta, tok, tok_info)
    mcfg = raw.config
    model = runtime.distribute(raw, device, ddp)
    total_batch = grad_accum * cfg["batch_size"] * world
    optimizer = raw.configure_optimizers(cfg["weight_decay"], 0.0, (0.9, 0.95), 1e-8, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    state = runtime.LoopState(lr=cfg["lr"] if cfg["lr"] is not None else cfg["lr_per_sample"] * total_batch)
    if resume_ckpt is not None:
        state = runtime.restore_training(resume_ckpt, optimizer, scaler, rank)
        del resume_ckpt

    # -- data ---------------------------------------------------------------------------------
    common = dict(tok=tok, config=mcfg, seed=cfg["seed"], truncate=cfg["truncate"])
    train_ds = data.TokenCaptions(cfg["tokens"], "train", train=True, bpe_dropout=cfg["bpe_dropout"], **common)
    val_ds = data.TokenCaptions(cfg["tokens"], "val", train=False, bpe_dropout=0.0, **common)
    n_val = min(len(val_ds), cfg["eval_images"] or len(val_ds))
    loader, val_loader = runtime.loaders(train_ds, torch.utils.data.Subset(val_ds, range(n_val)), cfg["batch_size"],
                                         rank, world, cfg["seed"], state.step * grad_accum, cfg["workers"], device)

    # -- logging ------------------------------------------------------------------------------
    ckpt_path = os.path.join(out, "ckpt.pt")
    tokens_meta = {k: v for k, v in meta.items() if k not in ("skipped", "plan")}
    if master:
        runtime.write_json(os.path.join(out, "config.json"), {
            "train": cfg, "model": mcfg.to_dict(), "world_size": world, "tokenizer": tok_info,
            "tokens": {k: meta[k] for k in ("vae", "vae_sha256", "source", "splits")}})
    log = runtime.Log(out, master)
    log(f"{'resuming' if cfg['resume'] else 'training'} BiART in {out}: {raw.get_num_params():,} parameters "
        f"({mcfg.n_layer} layers, d {mcfg.n_embd}, {mcfg.n_head} heads), text_len {mcfg.text_len} + image_len "
        f"{mcfg.image_len}, vocab {mcfg.vocab_size} (image {mcfg.image_vocab}, text {mcfg.text_vocab}); "
        f"{world} process(es) on {device}, {str(dtype).replace('torch.', '')}, batch {total_batch} "
        f"(accumulation {grad_accum}), lr {state.lr:.3g}, step {state.step}/{cfg['max_steps']}, "
        + schedule_words(cfg))
    log(f"data: {len(train_ds)} training images ({sum(map(len, train_ds.captions))} captions"
        + (f", {train_ds.crops.shape[1]} crops each" if train_ds.crops is not None else "")
        + f"), {n_val} validation images; tokenizer {tok_info['path']} ({tok.vocab_size} ids)"
        + (f"; {train_ds.truncated + val_ds.truncated} caption(s) truncated to text_len" if cfg["truncate"] else ""))

    # -- the training loop -------------------------------------------------------------------------
    if state.step == 0:  # the starting point (changes no state: eval mode draws no random numbers)
        ev = evaluate(raw, val_loader, ctx, device, world, cfg["ref_weight"])
        log(eval_line(0, ev))
        state.best_val = ev["val_loss"]
    raw.train()
    bar = tqdm(total=cfg["max_steps"], initial=state.step, disable=not master, desc="BiART", dynamic_ncols=True)
    t0, seen, train_time = time.time(), 0, 0.0
    window = torch.zeros(2, 4, dtype=torch.float64)  # per direction: loss, ref, gen, micro-steps
    try:  # the bar closes before any error message, which then stays the last line
        while state.step < cfg["max_steps"]:
            lr_now = runtime.scheduled_lr(state.lr, state.step, cfg["max_steps"], cfg["warmup_steps"],
                                          cfg["warmdown_steps"], cfg["min_lr"])
            runtime.set_lr(optimizer, lr_now)
            t_step = time.time()
            direction = "mix" if cfg["mix"] else step_direction(state.step, cfg["t2i_share"])
            for micro in range(grad_accum):
                text, image = next(loader)
                text, image = text.to(device, non_blocking=True), image.to(device, non_blocking=True)
                idx, seg, targets = batch_sequences(text, image, direction, mcfg, cfg["t2i_share"])
                sync = not ddp or micro == grad_accum - 1  # all-reduce on the last micro-step only
                with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                    _, loss, parts = model(idx, seg, targets, ref_weight=cfg["ref_weight"])
                runtime.check_finite_loss(loss, state.step, ckpt_path, world)
                scaler.scale(loss / grad_accum).backward()
                terms = [loss.detach(), parts["ref"].detach(), parts["gen"].detach()]
                window[0 if direction in ("t2i", "mix") else 1] += torch.tensor(
                    [float(t) for t in terms] + [1.0], dtype=torch.float64)
            runtime.optimizer_step(raw, optimizer, scaler, cfg["grad_clip"])
            state.step += 1
            seen += total_batch
            train_time += time.time() - t_step
            bar.update(1)
            last = state.step == cfg["max_steps"]

            if state.step % cfg["log_every"] == 0 or last:
                if ddp:  # every logged number is the mean over all ranks
                    w = window.to(device)
                    dist.all_reduce(w)
                    window = w.cpu() / world
                names = ("mix",) if cfg["mix"] else biart.DIRECTIONS
                parts_msg = " | ".join(f"{name} loss {w[0] / w[3]:.4f} ref {w[1] / w[3]:.4f} gen {w[2] / w[3]:.4f}"
                                       for name, w in zip(names, window) if w[3] > 0)
                bar.set_postfix(loss=f"{float(window[:, 0].sum() / window[:, 3].sum()):.4f}")
                log(f"step {state.step} {parts_msg} lr {lr_now:.3g} "
                    f"{seen * (mcfg.block_size - 1) / train_time:.0f} tok/s")
                window.zero_()

            if state.step % cfg["eval_every"] == 0 or last:
                ev = evaluate(raw, val_loader, ctx, device, world, cfg["ref_weight"])
                log(eval_line(state.step, ev))
                counting = state.step >= cfg["warmup_steps"]  # no plateau is counted during the warmup
                if state.after_eval(ev["val_loss"], cfg["plateau_patience"], cfg["min_lr"], counting) == "halved":
                    log(f"validation loss plateaued: lr halved to {state.lr:.3g}")

            if state.step % cfg["ckpt_every"] == 0 or last:
                runtime.save_training(ckpt_path, lambda rngs: runtime.training_checkpoint(
                    CHECKPOINT_KIND, mcfg.to_dict(), raw, optimizer, scaler, state, cfg, grad_accum, rngs,
                    tokenizer=tok_info, tokens_meta=tokens_meta), master, world, log)
    finally:
        bar.close()
    del model  # the DDP wrapper goes before its process group does (runtime.end_training)
    runtime.end_training(log, state.step, t0, ddp)
    return raw


if __name__ == "__main__":
    runtime.run_cli(main, "train_gpt.py")
