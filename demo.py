"""
The whole L-Verse pipeline on the built-in captioned shapes, timed and measured (the README's
main job). Nothing to download; under 15 minutes on a 2-core CPU.

    python demo.py                         # out/: vae_ml, vae_sl, tokens, bpe_shapes.txt.gz, gpt, demo
    python demo.py --num-objects 2 --out out2    # the harder two-object setting

Steps, each the project's own script with the settings below:
  1. train_vae.py --ml                   AugVAE multi-level
  2. train_vae.py --sl --init ML         fine-tuned into the single-level tokenizer (8x8 tokens at 64 px)
  3. prepare.py                          every shapes image -> tokens, once
  4. tokenizer.py train                  a BPE over the training captions (every word one token)
  5. train_gpt.py                        BiART, both directions
  6. evaluate.py shapes                  caption and image attribute accuracy on the held-out test
                                         images and the held-out attribute combinations
  7. sample.py                           a few held-out images captioned, a few captions drawn
Figures go to OUT/demo/results.json (caption_exact_match and image_exact_match on the test
split, self-reranked, and seconds for the whole run) and OUT/demo/*.png.

A killed demo picks up where it stopped when run again with the same flags: a finished step is
skipped, an interrupted training resumes from its last checkpoint (--ckpt-every steps lost at
most), a half-done prepare finishes its remaining chunks.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import data
import evaluate
import prepare
import sample
import tokenizer
import train_gpt
import train_vae

# -----------------------------------------------------------------------------------------
# defaults: each is the flag of the same name (underscores become dashes)
DEFAULTS = dict(
    out="out",             # everything goes under this folder
    num_objects=1,         # objects per shapes image (1: the demo's targets; 2: with a spatial relation)
    codebook_size=0,       # AugVAE codes (= BiART's image vocabulary); 0 -> the small preset's
    ml_steps=100,          # AugVAE-ML optimizer steps
    sl_steps=700,          # AugVAE-SL fine-tuning steps
    sl_warmdown=200,       # AugVAE-SL learning rate decays linearly to ~0 over the last this many steps
    train_size=10000,      # shapes training images encoded for BiART (train_vae draws its own on the fly)
    val_size=256,          # shapes validation images of each training stage
    bpe_vocab=600,         # BPE vocabulary learned from the training captions
    gpt_steps=1600,        # BiART optimizer steps
    gpt_lr=2e-3,           # BiART learning rate (batch 32)
    gpt_warmdown=600,      # BiART learning rate decays linearly to ~0 over the last this many steps
    gpt_ref_weight=0.2,    # BiART loss weight of condition tokens (train_gpt.py --ref-weight; paper 1)
    gpt_t2i_share=0.667,   # BiART steps in text->image order (train_gpt.py --t2i-share; paper 0.5)
    dtype="auto",          # training autocast: 'auto' -> bfloat16 where it is fast (see HELP), else float32
    text_len=0,            # BiART text tokens incl. end-of-text; 0 -> the longest training caption + 3
    eval_limit=200,        # images (and captions) evaluated per split
    caption_candidates=8,  # captions sampled per image, reranked by BiART itself
    image_candidates=16,   # images sampled per caption, reranked by BiART itself
    temperature=0.5,       # sampling temperature, both directions
    top_k=8,               # sampling top-k, both directions
    guidance=1.75,         # text -> image guidance scale (sample.py --guidance; 1: off, the paper)
    ckpt_every=100,        # training checkpoints (what a kill can lose)
    seed=0,
)

HELP = dict(
    out="output folder for every stage",
    num_objects="objects per image: 1 (the demo's targets) or 2 (with a spatial relation between them)",
    codebook_size="AugVAE codebook size, which is also BiART's image vocabulary; 0 takes the small preset's",
    ml_steps="AugVAE-ML training steps (train_vae.py --ml --max-steps)",
    sl_steps="AugVAE-SL fine-tuning steps (train_vae.py --sl --max-steps)",
    sl_warmdown="AugVAE-SL steps at the end over which the learning rate decays linearly to ~0 (train_vae.py "
                "--warmdown-steps)",
    train_size="shapes training images prepare.py encodes for BiART",
    val_size="shapes validation images evaluated by each training stage",
    bpe_vocab="vocabulary size of the BPE learned from the training captions",
    gpt_steps="BiART training steps (train_gpt.py --max-steps)",
    gpt_lr="BiART learning rate",
    gpt_warmdown="BiART steps at the end over which the learning rate decays linearly to ~0 (train_gpt.py "
                 "--warmdown-steps)",
    gpt_ref_weight="loss weight of each condition ([REF]) token against a target token's 1 (train_gpt.py "
                   "--ref-weight): the paper's 1 lets the 64 image tokens of an image->text sequence outweigh its "
                   "caption; 0.2 learns captions faster in the demo's budget and still models the images",
    gpt_t2i_share="share of the BiART steps in text->image order (train_gpt.py --t2i-share): the paper's 0.5 "
                  "alternates; 2/3 gives drawing two steps in three, as captions are learned sooner",
    dtype="autocast dtype of both training stages: float32, bfloat16, or auto = bfloat16 on a GPU that has it "
          "or on a CPU with AMX / AVX512-BF16 instructions (AugVAE steps about 2x, BiART steps 1.6x faster "
          "there), else float32",
    text_len="BiART text length in tokens incl. end-of-text; 0 -> the longest training caption's + 3 "
             "(the end-of-text and 2 to spare)",
    eval_limit="test and held-out images evaluated in each direction",
    caption_candidates="captions sampled per image and reranked by log p(image | caption)",
    image_candidates="images sampled per caption and reranked by log p(caption | image)",
    temperature="sampling temperature in both directions",
    top_k="sampling top-k in both directions",
    guidance="text->image guidance scale (sample.py --guidance): each image token is sampled from "
             "uncond + S x (cond - uncond) logits, uncond being BiART's image model with no caption (the "
             "condition part of its image->text order); 1 is the paper's plain sampling",
    ckpt_every="steps between training checkpoints",
    seed="seed of every stage",
)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = data.ArgumentParser(description="Train and evaluate the whole L-Verse pipeline on the built-in shapes.",
                            argument_default=argparse.SUPPRESS if suppress else None)
    data.add_flags(p, DEFAULTS, HELP, suppress)
    return p


def _finished_step(path: str) -> int:
    """The step a training checkpoint was saved at (-1 if there is none)."""
    if not os.path.exists(path):
        return -1
    return int(data.load_weights(path).get("step", 0))


def longest_caption(jsonl: str, bpe: str) -> int:
    """Tokens in the longest caption of a prepare.py split file."""
    tok = tokenizer.Tokenizer(bpe)
    with open(jsonl, encoding="utf-8") as f:
        return max(len(tok.encode(c)) for line in f for c in json.loads(line)["captions"])


def train(script, flags: list, out: str, steps: int, log) -> None:
    """Run a training script's main() unless its run in `out` is done; resume a half-done one."""
    step = _finished_step(os.path.join(out, "ckpt.pt"))
    if step >= steps:
        log(f"{out}: already trained ({step} steps), skipped")
        return
    resume = ["--resume"] if step >= 0 else []
    if resume:
        log(f"{out}: resuming at step {step}")
    script.main([*flags, "--out", out, "--max-steps", str(steps), *resume])


def main(argv: list | None = None) -> dict:
    cfg = data.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    if cfg["num_objects"] not in (1, 2):
        raise ValueError(f"--num-objects must be 1 or 2, got {cfg['num_objects']}")
    data.require_nonnegative(cfg, ("sl_warmdown", "gpt_warmdown", "gpt_ref_weight"))  # before any stage, not minutes in
    if not 0 < cfg["gpt_t2i_share"] < 1:
        raise ValueError(f"--gpt-t2i-share must be between 0 and 1, got {cfg['gpt_t2i_share']}")
    sample.check_guidance(cfg["guidance"])
    dtype = cfg["dtype"]
    if dtype == "auto":
        fast = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else data.cpu_has_fast_bf16()
        dtype = "bfloat16" if fast else "float32"
    elif dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    out = cfg["out"]
    demo = os.path.join(out, "demo")
    os.makedirs(demo, exist_ok=True)
    seed, every = str(cfg["seed"]), str(cfg["ckpt_every"])
    timings_path = os.path.join(demo, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

    def log(msg):
        print(f"demo.py: {msg}", flush=True)

    def stage(name, fn):
        t0 = time.time()
        fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t0  # a resumed stage adds up its sessions
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=2)
        log(f"{name}: {timings[name]:.0f} s")

    shapes = ["--num-objects", str(cfg["num_objects"])]
    val = ["--val-size", str(cfg["val_size"])]
    amp = ["--dtype", dtype]
    vae_ml, vae_sl = os.path.join(out, "vae_ml"), os.path.join(out, "vae_sl")
    stage("vae_ml", lambda: train(train_vae, ["--ml", *shapes, *val, *amp, "--codebook-size", str(cfg["codebook_size"]),
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", every], vae_ml, cfg["ml_steps"], log))
    stage("vae_sl", lambda: train(train_vae, ["--sl", "--init", os.path.join(vae_ml, "best.pt"), *shapes, *val, *amp,
                                              "--warmdown-steps", str(min(cfg["sl_warmdown"], cfg["sl_steps"])),
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", str(cfg["sl_steps"])],  # one evaluation, at the end
                                  vae_sl, cfg["sl_steps"], log))
    tokens = os.path.join(out, "tokens")
    stage("prepare", lambda: prepare.main(["--vae", os.path.join(vae_sl, "best.pt"), "--out", tokens, *shapes, *val,
                                           "--train-size", str(cfg["train_size"]), "--test-size", "0", "--heldout-size", "0",
                                           "--seed", seed]))
    bpe = os.path.join(out, "bpe_shapes.txt.gz")

    def learn_bpe():
        captions = os.path.join(out, "train_captions.txt")
        with open(os.path.join(tokens, "train.jsonl"), encoding="utf-8") as f, open(captions, "w") as g:
            for line in f:
                g.writelines(c + "\n" for c in json.loads(line)["captions"])
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.py"),
                        "train", captions, "--vocab-size", str(cfg["bpe_vocab"]), "--out", bpe], check=True)
    stage("bpe", lambda: None if os.path.exists(bpe) else learn_bpe())
    gpt = os.path.join(out, "gpt")
    text_len = cfg["text_len"] or longest_caption(os.path.join(tokens, "train.jsonl"), bpe) + 3
    stage("gpt", lambda: train(train_gpt, ["--tokens", tokens, "--bpe", bpe, "--text-len", str(text_len),
                                           "--bpe-dropout", "0", "--lr", str(cfg["gpt_lr"]), "--seed", seed,
                                           "--warmdown-steps", str(min(cfg["gpt_warmdown"], cfg["gpt_steps"])),
                                           "--ref-weight", str(cfg["gpt_ref_weight"]),
                                           "--t2i-share", str(cfg["gpt_t2i_share"]), *amp,
                                           "--ckpt-every", every, "--eval-every", str(cfg["gpt_steps"])],
                                   gpt, cfg["gpt_steps"], log))

    models = ["--vae", os.path.join(vae_sl, "best.pt"), "--gpt", os.path.join(gpt, "ckpt.pt")]
    sampling = ["--temperature", str(cfg["temperature"]), "--top-k", str(cfg["top_k"]),
                "--guidance", str(cfg["guidance"])]
    res = {}
    stage("evaluate", lambda: res.update(evaluate.main([
        "shapes", *models, *sampling, *shapes, "--limit", str(cfg["eval_limit"]), "--splits", "test,heldout",
        "--caption-candidates", str(cfg["caption_candidates"]), "--image-candidates", str(cfg["image_candidates"]),
        "--seed", seed, "--json", os.path.join(demo, "shapes.json")])))

    def show():  # a few held-out images captioned and held-out captions drawn, as a user would
        image_dir = os.path.join(demo, "heldout_images")
        os.makedirs(image_dir, exist_ok=True)
        captions = []
        for i in range(4):
            ex = data.shapes_example(i, "heldout", 64, cfg["num_objects"])
            sample.Image.fromarray(ex.image).save(os.path.join(image_dir, f"heldout_{i}.png"))
            captions.append(data.shapes_example(100 + i, "heldout", 64, cfg["num_objects"]).captions[0])
        texts = os.path.join(demo, "heldout_captions.txt")
        with open(texts, "w") as f:
            f.writelines(c + "\n" for c in captions)
        sample.main([*models, *sampling, "--images", image_dir, "--texts", texts,
                     "--keep", str(min(4, cfg["image_candidates"])),
                     "--num-candidates", str(cfg["image_candidates"]), "--seed", seed, "--out", demo])
    stage("sample", show)

    seconds = sum(timings.values())
    test = res["test"]
    results = {
        "caption_exact_match": test["i2t"]["self"]["exact"],
        "image_exact_match": test["t2i"]["self"]["exact"],
        "seconds": seconds,
        "num_objects": cfg["num_objects"],
        "stage_seconds": timings,
        "shapes": res,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in cfg.items() if k != "_given"},
    }
    with open(os.path.join(demo, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log(f"done in {seconds / 60:.1f} min: caption exact match {results['caption_exact_match']:.1%}, "
        f"image exact match {results['image_exact_match']:.1%} (test split, self-reranked); "
        f"{os.path.join(demo, 'results.json')}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, data.ImageError, data.CheckpointError, subprocess.CalledProcessError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        sys.exit(2)
