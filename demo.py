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

import runtime
import shapes
import evaluate
import prepare
import sample
import tokenizer
import train_gpt
import train_vae

BF16_MARGIN = 1.1  # --dtype auto on a CPU: bf16 only where the probe measures it this much faster

FLAGS = dict(  # name: (default, help); each is the flag --name (underscores become dashes)
    out=("out", "output folder for every stage"),
    num_objects=(1, "objects per image: 1 (the demo's targets) or 2 (with a spatial relation between them)"),
    codebook_size=(None, "AugVAE codebook size, which is also BiART's image vocabulary (default: the small preset's)", int),
    ml_steps=(100, "AugVAE-ML training steps (train_vae.py --ml --max-steps)"),
    sl_steps=(700, "AugVAE-SL fine-tuning steps (train_vae.py --sl --max-steps)"),
    vae_recolour=(True, "train both AugVAE stages on recoloured images (train_vae.py --recolour): the tokenizer "
                        "sees every colour/shape pair as pixels, the held-out ones never captioned (BiART never sees "
                        "them); on the Xeon it lifted held-out exact match from 46.5/62.0 to 67.0/82.0 per cent (captions/"
                        "drawings) and test from 98.0/93.0 to 100.0/98.0; --no-vae-recolour keeps them out entirely"),
    sl_warmdown=(200, "AugVAE-SL steps at the end over which the learning rate decays linearly to ~0 (train_vae.py "
                "--warmdown-steps)"),
    train_size=(10000, "shapes training images prepare.py encodes for BiART"),
    val_size=(256, "shapes validation images evaluated by each training stage"),
    bpe_vocab=(600, "vocabulary size of the BPE learned from the training captions"),
    gpt_steps=(1600, "BiART training steps (train_gpt.py --max-steps)"),
    gpt_lr=(2e-3, "BiART learning rate"),
    gpt_warmdown=(600, "BiART steps at the end over which the learning rate decays linearly to ~0 (train_gpt.py "
                 "--warmdown-steps)"),
    gpt_ref_weight=(0.2, "loss weight of each condition ([REF]) token against a target token's 1 (train_gpt.py "
                   "--ref-weight): the paper's 1 lets the 64 image tokens of an image->text sequence outweigh its "
                   "caption; 0.2 learns captions faster in the demo's budget and still models the images"),
    gpt_t2i_share=(0.667, "share of the BiART steps in text->image order (train_gpt.py --t2i-share): the paper's 0.5 "
                  "alternates; 2/3 gives drawing two steps in three, as captions are learned sooner"),
    dtype=("auto", "autocast dtype of both training stages: float32, bfloat16, or auto = bfloat16 on a GPU that has it; "
          "on a CPU, bfloat16 where a probe of a few seconds (runtime.cpu_bf16_speedup) measures a bf16 training step "
          f"over {BF16_MARGIN}x as fast as fp32, else float32; the choice and the figure go to results.json"),
    text_len=(None, "BiART text length in tokens incl. end-of-text (default: the longest training caption's + 3: "
                    "the end-of-text and 2 to spare)", int),
    eval_limit=(200, "test and held-out images evaluated in each direction"),
    caption_candidates=(8, "captions sampled per image and reranked by log p(image | caption)"),
    image_candidates=(16, "images sampled per caption and reranked by log p(caption | image)"),
    temperature=(0.5, "sampling temperature in both directions"),
    top_k=(8, "sampling top-k in both directions"),
    guidance=(1.75, "text->image guidance scale (sample.py --guidance): each image token is sampled from "
             "uncond + S x (cond - uncond) logits, uncond being BiART's image model with no caption (the "
             "condition part of its image->text order); 1 is the paper's plain sampling"),
    ckpt_every=(100, "steps between training checkpoints"),
    seed=(0, "seed of every stage"),
)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(description="Train and evaluate the whole L-Verse pipeline on the built-in shapes.",
                            argument_default=argparse.SUPPRESS if suppress else None)
    runtime.add_flags(p, FLAGS, suppress)
    return p


def _finished_step(path: str) -> int:
    """The step a training checkpoint was saved at (-1 if there is none)."""
    if not os.path.exists(path):
        return -1
    return int(runtime.load_weights(path).get("step", 0))


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
    cfg = runtime.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    if cfg["num_objects"] not in (1, 2):
        raise ValueError(f"--num-objects must be 1 or 2, got {cfg['num_objects']}")
    runtime.require_nonnegative(cfg, ("sl_warmdown", "gpt_warmdown", "gpt_ref_weight"))  # before any stage, not minutes in
    if not 0 < cfg["gpt_t2i_share"] < 1:
        raise ValueError(f"--gpt-t2i-share must be between 0 and 1, got {cfg['gpt_t2i_share']}")
    sample.check_guidance(cfg["guidance"])
    dtype, speedup = cfg["dtype"], None
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    out = cfg["out"]
    demo = os.path.join(out, "demo")
    os.makedirs(demo, exist_ok=True)
    seed, every = str(cfg["seed"]), str(cfg["ckpt_every"])
    timings_path = os.path.join(demo, "timings.json")
    timings = runtime.read_json(timings_path) if os.path.exists(timings_path) else {}

    def log(msg):
        print(f"demo.py: {msg}", flush=True)

    choice_path = os.path.join(demo, "dtype.json")  # a resumed demo keeps the dtype its first session chose
    if dtype == "auto" and os.path.exists(choice_path):
        choice = runtime.read_json(choice_path)
        dtype, speedup = choice["dtype"], choice["bf16_speedup_measured"]
    elif dtype == "auto" and torch.cuda.is_available():
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    elif dtype == "auto":  # measured here, not read off a cpuinfo flag; a margin for the noise of a 1 s probe
        speedup = runtime.cpu_bf16_speedup()
        dtype = "bfloat16" if speedup > BF16_MARGIN else "float32"
        log(f"--dtype auto: a bf16 training step ran {speedup:.2f}x as fast as fp32 here, so {dtype}")
        runtime.write_json(choice_path, {"dtype": dtype, "bf16_speedup_measured": speedup})

    def stage(name, fn):
        t0 = time.time()
        fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t0  # a resumed stage adds up its sessions
        runtime.write_json(timings_path, timings)
        log(f"{name}: {timings[name]:.0f} s")

    objects = ["--num-objects", str(cfg["num_objects"])]
    val = ["--val-size", str(cfg["val_size"])]
    amp = ["--dtype", dtype]
    codebook = [] if cfg["codebook_size"] is None else ["--codebook-size", str(cfg["codebook_size"])]
    recolour = ["--recolour"] if cfg["vae_recolour"] else []
    vae_ml, vae_sl = os.path.join(out, "vae_ml"), os.path.join(out, "vae_sl")
    stage("vae_ml", lambda: train(train_vae, ["--ml", *objects, *val, *amp, *codebook, *recolour,
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", every], vae_ml, cfg["ml_steps"], log))
    stage("vae_sl", lambda: train(train_vae, ["--sl", "--init", os.path.join(vae_ml, "best.pt"), *objects, *val, *amp,
                                              *recolour,
                                              "--warmdown-steps", str(min(cfg["sl_warmdown"], cfg["sl_steps"])),
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", str(cfg["sl_steps"])],  # one evaluation, at the end
                                  vae_sl, cfg["sl_steps"], log))
    tokens = os.path.join(out, "tokens")
    stage("prepare", lambda: prepare.main(["--vae", os.path.join(vae_sl, "best.pt"), "--out", tokens, *objects, *val,
                                           "--train-size", str(cfg["train_size"]), "--test-size", "0", "--heldout-size", "0",
                                           "--seed", seed]))
    bpe = os.path.join(out, "bpe_shapes.txt.gz")

    def learn_bpe():
        captions = os.path.join(out, "train_captions.txt")
        with open(os.path.join(tokens, "train.jsonl"), encoding="utf-8") as f:
            runtime.write_text(captions, "".join(c + "\n" for line in f for c in json.loads(line)["captions"]))
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
        "shapes", *models, *sampling, *objects, "--limit", str(cfg["eval_limit"]), "--splits", "test,heldout",
        "--caption-candidates", str(cfg["caption_candidates"]), "--image-candidates", str(cfg["image_candidates"]),
        "--seed", seed, "--json", os.path.join(demo, "shapes.json")])))

    def show():  # a few held-out images captioned and held-out captions drawn, as a user would
        image_dir = os.path.join(demo, "heldout_images")
        os.makedirs(image_dir, exist_ok=True)
        captions = []
        for i in range(4):
            ex = shapes.shapes_example(i, "heldout", 64, cfg["num_objects"])
            sample.Image.fromarray(ex.image).save(os.path.join(image_dir, f"heldout_{i}.png"))
            captions.append(shapes.shapes_example(100 + i, "heldout", 64, cfg["num_objects"]).captions[0])
        texts = os.path.join(demo, "heldout_captions.txt")
        runtime.write_text(texts, "".join(c + "\n" for c in captions))
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
        "machine": {**runtime.machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                    "dtype": dtype, "bf16_speedup_measured": speedup},
        "settings": {k: v for k, v in cfg.items() if k != "_given"},
    }
    runtime.write_json(os.path.join(demo, "results.json"), results)
    log(f"done in {seconds / 60:.1f} min: caption exact match {results['caption_exact_match']:.1%}, "
        f"image exact match {results['image_exact_match']:.1%} (test split, self-reranked); "
        f"{os.path.join(demo, 'results.json')}")
    return results


if __name__ == "__main__":
    runtime.run_cli(main, "demo.py", also=(subprocess.CalledProcessError,))
