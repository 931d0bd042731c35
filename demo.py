"""
The whole L-Verse pipeline in one command, timed and measured (the README's main job): on the
built-in captioned shapes (nothing to download), or on Fashion-MNIST's real photos.

    python demo.py                         # out/: vae_ml, vae_sl, tokens, bpe_shapes.txt.gz, gpt, demo
    python demo.py --num-objects 2 --out out2    # the harder two-object setting
    python demo.py --data fashion-mnist --out out/fashion   # real images (apt-get install dataset-fashion-mnist)

Steps, each the project's own script with the settings below:
  1. train_vae.py --ml                   AugVAE multi-level
  2. train_vae.py --sl --init ML         fine-tuned into the single-level tokenizer (8x8 tokens)
  3. prepare.py                          every training image -> tokens, once
  4. tokenizer.py train                  a BPE over the training captions (every word one token)
  5. train_gpt.py                        BiART, both directions
  6. evaluate.py shapes | fashion        shapes: exact attribute accuracy of captions and drawings on
                                         the test split and on the held-out colour/shape pairs;
                                         fashion: the class named by the captions of the 10,000 test
                                         images, the class a judging CNN reads in drawings of held-out
                                         paraphrases, their Frechet distance and diversity
  7. sample.py                           a few unseen images captioned, a few unseen captions drawn
Figures go to OUT/demo/results.json (the headline figures, self-reranked, with the first-sample
ones beside them, the seconds of each stage, the machine) and OUT/demo/*.png.

A killed demo picks up where it stopped when run again with the same flags: a finished step is
skipped, an interrupted training resumes from its last checkpoint (--ckpt-every steps lost at
most), a half-done prepare finishes its remaining chunks.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

import data
import runtime
import shapes
import evaluate
import prepare
import sample
import tokenizer
import train_gpt
import train_vae

BF16_MARGIN = 1.1  # --dtype auto on a CPU: bf16 only where the probe measures it this much faster
DATA = ("shapes", "fashion-mnist")
# Defaults that depend on --data: (shapes, fashion-mnist). The shapes ones are the demo's (docs/
# results.md, 2026-11-26 and 27); the Fashion-MNIST ones its recipe's (docs/results.md, 2026-11-27:
# a sweep of nine BiART variants on an H100, then the CPU): a narrower, 4-head BiART at batch 64
# trained mostly image->text, captions at temperature 0.25, drawings unguided.
BY_DATA = dict(
    ml_steps=(100, 600), sl_steps=(700, 1500), sl_warmdown=(200, 400),
    gpt_steps=(1600, 6000), gpt_lr=(2e-3, 3e-3), gpt_warmdown=(600, 2000), gpt_ref_weight=(0.2, 0.05),
    gpt_t2i_share=(0.667, 0.25), gpt_n_embd=(256, 128), gpt_n_head=(8, 4), gpt_batch_size=(32, 64),
    eval_limit=(200, 0), caption_candidates=(16, 4), image_candidates=(16, 8),
    caption_temperature=(1.0, 0.25), caption_edits=(1, 0), top_k=(8, 0), guidance=(1.75, 1.0),
)
ONLY = {"shapes": ("num_objects", "vae_recolour", "train_size"),  # flags that mean nothing for the other data
        "fashion-mnist": ("fashion_root", "per_class")}

FLAGS = dict(  # name: (default, help[, type]); each is the flag --name (underscores become dashes)
    data=("shapes", "'shapes': the built-in captioned shapes, nothing to download; 'fashion-mnist': Fashion-MNIST's "
                    "real photos, 10 classes captioned from templates (the idx files in --fashion-root)", DATA),
    out=("out", "output folder for every stage"),
    num_objects=(1, "shapes: objects per image: 1 (the demo's targets) or 2 (with a spatial relation between them)"),
    fashion_root=(data.FASHION_ROOT, "fashion-mnist: the folder of the idx files (apt-get install dataset-fashion-mnist)"),
    codebook_size=(None, "AugVAE codebook size, which is also BiART's image vocabulary (default: the preset's)", int),
    ml_steps=(None, "AugVAE-ML training steps (train_vae.py --ml --max-steps)", int),
    sl_steps=(None, "AugVAE-SL fine-tuning steps (train_vae.py --sl --max-steps)", int),
    vae_recolour=(True, "shapes: train both AugVAE stages on recoloured images (train_vae.py --recolour): the "
                        "tokenizer sees every colour/shape pair as pixels, the held-out ones never captioned (BiART "
                        "never sees them); on the Xeon it lifted held-out exact match from 46.5/62.0 to 67.0/82.0 per "
                        "cent (captions/drawings) and test from 98.0/93.0 to 100.0/98.0; --no-vae-recolour keeps "
                        "them out entirely"),
    sl_warmdown=(None, "AugVAE-SL steps at the end over which the learning rate decays linearly to ~0 (train_vae.py "
                       "--warmdown-steps)", int),
    train_size=(10000, "shapes: training images prepare.py encodes for BiART (fashion-mnist: the 60,000 less the "
                       "1 in 100 held out for validation)"),
    val_size=(256, "validation images evaluated by each AugVAE stage (shapes: also by BiART)"),
    bpe_vocab=(600, "vocabulary size of the BPE learned from the training captions"),
    gpt_steps=(None, "BiART training steps (train_gpt.py --max-steps)", int),
    gpt_lr=(None, "BiART learning rate", float),
    gpt_warmdown=(None, "BiART steps at the end over which the learning rate decays linearly to ~0 (train_gpt.py "
                        "--warmdown-steps)", int),
    gpt_ref_weight=(None, "loss weight of each condition ([REF]) token against a target token's 1 (train_gpt.py "
                          "--ref-weight): the paper's 1 lets the 64 image tokens of an image->text sequence outweigh "
                          "its caption; less learns captions faster in a small budget and still models the images",
                    float),
    gpt_t2i_share=(None, "share of the BiART steps in text->image order (train_gpt.py --t2i-share): the paper's 0.5 "
                         "alternates; shapes draws two steps in three, as its captions are learned sooner; "
                         "Fashion-MNIST captions one step in four", float),
    gpt_n_layer=(4, "BiART transformer blocks"),
    gpt_n_embd=(None, "BiART width", int),
    gpt_n_head=(None, "BiART attention heads", int),
    gpt_batch_size=(None, "BiART sequences per step", int),
    dtype=("auto", "autocast dtype of both training stages: float32, bfloat16, or auto = bfloat16 on a GPU that has it; "
          "on a CPU, bfloat16 where a probe of a few seconds (runtime.cpu_bf16_speedup) measures a bf16 training step "
          f"over {BF16_MARGIN}x as fast as fp32, else float32; the choice and the figure go to results.json"),
    text_len=(None, "BiART text length in tokens incl. end-of-text (default: the longest training caption's + 3: "
                    "the end-of-text and 2 to spare)", int),
    eval_limit=(None, "images captioned and captions drawn per evaluated split (fashion-mnist: test images "
                      "captioned, 0 = all 10,000)", int),
    per_class=(100, "fashion-mnist: images drawn per class from the held-out paraphrases"),
    caption_candidates=(None, "captions sampled per image and reranked by log p(image | caption) + log p(caption | "
                              "image)", int),
    image_candidates=(None, "images sampled per caption and reranked by log p(caption | image)", int),
    temperature=(0.5, "the drawings' sampling temperature"),
    caption_temperature=(None, "the captions' sampling temperature: on shapes 1.0 samples varied candidates, among "
                               "them the shape an unseen colour/shape pair shows, which the reranker then picks "
                               "(docs/results.md, 2026-12-07)", float),
    caption_edits=(None, "rounds of one-token edits of each image's best caption (sample.py --caption-edits): on "
                         "shapes one round took the held-out pairs' captions from 77.5% to 94.5% exact (docs/"
                         "results.md, 2026-12-07 night)", int),
    top_k=(None, "sampling top-k in both directions (0: off)", int),
    guidance=(None, "text->image guidance scale (sample.py --guidance): each image token is sampled from "
                    "uncond + S x (cond - uncond) logits, uncond being BiART's image model with no caption (the "
                    "condition part of its image->text order); 1 is the paper's plain sampling", float),
    ckpt_every=(100, "steps between training checkpoints"),
    seed=(0, "seed of every stage"),
)
for _name, _pair in BY_DATA.items():  # the help says what None stands for
    _default, _text, *_kind = FLAGS[_name]
    FLAGS[_name] = (_default, f"{_text} (default: {_pair[0]} for shapes, {_pair[1]} for fashion-mnist)", *_kind)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(description="Train and evaluate the whole L-Verse pipeline, on the built-in shapes "
                                           "or on Fashion-MNIST.",
                               argument_default=argparse.SUPPRESS if suppress else None)
    runtime.add_flags(p, FLAGS, suppress)
    return p


def settings(argv: list) -> dict:
    """The command line -> every setting, the --data defaults filled in; a ValueError for a flag
    out of range or one that means nothing for this --data, before any stage runs."""
    cfg = runtime.parse_flags(build_parser, argv)
    which = DATA.index(cfg["data"])
    for name, pair in BY_DATA.items():
        if cfg[name] is None:
            cfg[name] = pair[which]
    for other, names in ONLY.items():
        wrong = [n for n in names if n in cfg["_given"] and other != cfg["data"]]
        if wrong:
            raise ValueError(f"--{wrong[0].replace('_', '-')} is for --data {other}, not {cfg['data']}")
    if cfg["num_objects"] not in (1, 2):
        raise ValueError(f"--num-objects must be 1 or 2, got {cfg['num_objects']}")
    runtime.require_nonnegative(cfg, ("sl_warmdown", "gpt_warmdown", "gpt_ref_weight", "eval_limit"))
    if not 0 < cfg["gpt_t2i_share"] < 1:
        raise ValueError(f"--gpt-t2i-share must be between 0 and 1, got {cfg['gpt_t2i_share']}")
    sample.check_guidance(cfg["guidance"])  # and what evaluate.py and sample.py would refuse only after the training
    for name in ("temperature", "caption_temperature"):
        if not cfg[name] > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {cfg[name]}")
    for name, least in (("caption_candidates", 1), ("image_candidates", 1), ("per_class", 2), ("top_k", 0),
                        ("caption_edits", 0)):
        if cfg[name] < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {cfg[name]}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {cfg['dtype']!r}")
    if cfg["data"] == "fashion-mnist":  # the idx files, read now: a missing one is one line, not minutes in
        for split in ("train", "test"):
            data.read_fashion_mnist(cfg["fashion_root"], split)
    return cfg


def _finished_step(path: str) -> int:
    """The step a training checkpoint was saved at (-1 if there is none)."""
    if not os.path.exists(path):
        return -1
    return int(runtime.load_weights(path).get("step", 0))


def longest_caption(jsonl: str, bpe: str) -> int:
    """Tokens in the longest caption of a prepare.py split file."""
    tok = tokenizer.Tokenizer(bpe)
    return max(len(tok.encode(c)) for caps in data.CaptionLines([jsonl]) for c in caps)


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


def showcase(cfg: dict, folder: str) -> tuple:
    """Four images and four captions no stage trained on, as a user would bring them: the images
    saved as PNGs in `folder` -> (folder, the captions)."""
    os.makedirs(folder, exist_ok=True)
    if cfg["data"] == "shapes":
        for i in range(4):
            ex = shapes.shapes_example(i, "heldout", 64, cfg["num_objects"])
            sample.Image.fromarray(ex.image).save(os.path.join(folder, f"heldout_{i}.png"))
        return folder, [shapes.shapes_example(100 + i, "heldout", 64, cfg["num_objects"]).captions[0]
                        for i in range(4)]
    pixels, labels = data.read_fashion_mnist(cfg["fashion_root"], "test")
    for i in range(4):
        data.fashion_image(pixels[i]).save(os.path.join(folder, f"test_{i}_{labels[i]}.png"))
    classes = np.random.default_rng(cfg["seed"]).choice(len(data.FASHION_CLASSES), 4, replace=False)
    return folder, [data.fashion_caption(int(c), data.FASHION_HELDOUT_TEMPLATES[k])
                    for k, c in enumerate(classes)]


def headline(cfg: dict, res: dict) -> tuple:
    """The figures a reader looks for first, self-reranked with the first sample beside them,
    and the line that says the two main ones."""
    if cfg["data"] == "shapes":
        test = res["test"]
        head = {"caption_exact_match": test["i2t"]["self"]["exact"], "image_exact_match": test["t2i"]["self"]["exact"],
                "caption_exact_match_first_sample": test["i2t"]["none"]["exact"],
                "image_exact_match_first_sample": test["t2i"]["none"]["exact"]}
        return head, (f"caption exact match {head['caption_exact_match']:.1%}, image exact match "
                      f"{head['image_exact_match']:.1%} (test split, self-reranked)")
    i2t, t2i = res["i2t"], res["t2i"]
    head = {"caption_accuracy": i2t["self"]["accuracy"], "image_accuracy": t2i["self"]["accuracy"],
            "caption_accuracy_first_sample": i2t["none"]["accuracy"],
            "image_accuracy_first_sample": t2i["none"]["accuracy"],
            "image_fd": t2i["self"]["fd"], "image_diversity": t2i["self"]["diversity"],
            "judge_accuracy_on_real_test_images": res["classifier"]["test_accuracy"],
            "judge_accuracy_on_reconstructions": res["classifier"]["reconstructions_accuracy"]}
    return head, (f"captions name the class of {head['caption_accuracy']:.1%} of the test images, drawings "
                  f"judged the asked class {head['image_accuracy']:.1%} (self-reranked)")


def main(argv: list | None = None) -> dict:
    cfg = settings(sys.argv[1:] if argv is None else argv)
    shapes_data = cfg["data"] == "shapes"
    out, dtype, speedup = cfg["out"], cfg["dtype"], None
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

    if shapes_data:
        source = ["--num-objects", str(cfg["num_objects"])]  # train_vae's and prepare's --data / --source default
        vae_data = [*source, *(["--recolour"] if cfg["vae_recolour"] else [])]
    else:
        source = ["--source", "fashion-mnist", "--fashion-root", cfg["fashion_root"]]
        vae_data = ["--data", "fashion-mnist", "--fashion-root", cfg["fashion_root"]]
    preset = [] if shapes_data else ["--preset", "fashion"]  # ML only: SL takes the model from its --init
    val = ["--val-size", str(cfg["val_size"])]
    amp = ["--dtype", dtype]
    codebook = [] if cfg["codebook_size"] is None else ["--codebook-size", str(cfg["codebook_size"])]
    vae_ml, vae_sl = os.path.join(out, "vae_ml"), os.path.join(out, "vae_sl")
    stage("vae_ml", lambda: train(train_vae, ["--ml", *preset, *vae_data, *val, *amp, *codebook,
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", every], vae_ml, cfg["ml_steps"], log))
    stage("vae_sl", lambda: train(train_vae, ["--sl", "--init", os.path.join(vae_ml, "best.pt"), *vae_data, *val, *amp,
                                              "--warmdown-steps", str(min(cfg["sl_warmdown"], cfg["sl_steps"])),
                                              "--seed", seed, "--ckpt-every", every,
                                              "--eval-every", str(cfg["sl_steps"])],  # one evaluation, at the end
                                  vae_sl, cfg["sl_steps"], log))
    tokens = os.path.join(out, "tokens")
    sizes = (["--train-size", str(cfg["train_size"]), "--test-size", "0", "--heldout-size", "0", *val]
             if shapes_data else [])
    stage("prepare", lambda: prepare.main(["--vae", os.path.join(vae_sl, "best.pt"), "--out", tokens, *source, *sizes,
                                           "--seed", seed]))
    bpe = os.path.join(out, "bpe_shapes.txt.gz" if shapes_data else "bpe_fashion.txt.gz")

    def learn_bpe():
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.py"),
                        "train", os.path.join(tokens, "train.jsonl"), "--vocab-size", str(cfg["bpe_vocab"]),
                        "--out", bpe], check=True)
    stage("bpe", lambda: None if os.path.exists(bpe) else learn_bpe())
    gpt = os.path.join(out, "gpt")
    text_len = cfg["text_len"] or longest_caption(os.path.join(tokens, "train.jsonl"), bpe) + 3
    stage("gpt", lambda: train(train_gpt, ["--tokens", tokens, "--bpe", bpe, "--text-len", str(text_len),
                                           "--n-layer", str(cfg["gpt_n_layer"]), "--n-embd", str(cfg["gpt_n_embd"]),
                                           "--n-head", str(cfg["gpt_n_head"]),
                                           "--batch-size", str(cfg["gpt_batch_size"]),
                                           "--bpe-dropout", "0", "--lr", str(cfg["gpt_lr"]), "--seed", seed,
                                           "--warmdown-steps", str(min(cfg["gpt_warmdown"], cfg["gpt_steps"])),
                                           "--ref-weight", str(cfg["gpt_ref_weight"]),
                                           "--t2i-share", str(cfg["gpt_t2i_share"]), *amp,
                                           "--ckpt-every", every, "--eval-every", str(cfg["gpt_steps"])],
                                   gpt, cfg["gpt_steps"], log))

    models = ["--vae", os.path.join(vae_sl, "best.pt"), "--gpt", os.path.join(gpt, "ckpt.pt")]
    drawing = ["--temperature", str(cfg["temperature"]), "--top-k", str(cfg["top_k"]),
               "--guidance", str(cfg["guidance"])]
    res = {}

    def evaluation():
        if shapes_data:
            res.update(evaluate.main([
                "shapes", *models, *drawing, *source, "--limit", str(cfg["eval_limit"]), "--splits", "test,heldout",
                "--caption-temperature", str(cfg["caption_temperature"]), "--caption-edits", str(cfg["caption_edits"]),
                "--caption-candidates", str(cfg["caption_candidates"]),
                "--image-candidates", str(cfg["image_candidates"]), "--seed", seed,
                "--json", os.path.join(demo, "shapes.json")]))
            return
        res.update(evaluate.main([  # both directions, each with its own generator seeded with --seed
            "fashion", *models, *drawing, "--fashion-root", cfg["fashion_root"], "--seed", seed,
            "--classifier", os.path.join(demo, "fashion_classifier.pt"), "--limit", str(cfg["eval_limit"]),
            "--caption-temperature", str(cfg["caption_temperature"]), "--caption-edits", str(cfg["caption_edits"]),
            "--caption-candidates", str(cfg["caption_candidates"]), "--per-class", str(cfg["per_class"]),
            "--image-candidates", str(cfg["image_candidates"]), "--out", demo,
            "--json", os.path.join(demo, "fashion.json")]))
    stage("evaluate", evaluation)

    def show():
        images, captions = showcase(cfg, os.path.join(demo, "unseen_images"))
        texts = os.path.join(demo, "unseen_captions.txt")
        runtime.write_text(texts, "".join(c + "\n" for c in captions))
        sample.main([*models, *drawing, "--caption-temperature", str(cfg["caption_temperature"]),
                     "--caption-edits", str(cfg["caption_edits"]),
                     "--images", images, "--texts", texts,
                     "--keep", str(min(4, cfg["image_candidates"])),
                     "--num-candidates", str(cfg["image_candidates"]), "--seed", seed, "--out", demo])
    stage("sample", show)

    seconds = sum(timings.values())
    head, said = headline(cfg, res)
    results = {
        **head,
        "seconds": seconds,
        "data": cfg["data"],
        "num_objects": cfg["num_objects"] if shapes_data else None,
        "stage_seconds": timings,
        ("shapes" if shapes_data else "fashion"): res,
        "machine": {**runtime.machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                    "dtype": dtype, "bf16_speedup_measured": speedup},
        "settings": {k: v for k, v in cfg.items() if k != "_given"},
    }
    runtime.write_json(os.path.join(demo, "results.json"), results)
    log(f"done in {seconds / 60:.1f} min: {said}; {os.path.join(demo, 'results.json')}")
    return results


if __name__ == "__main__":
    runtime.run_cli(main, "demo.py", also=(subprocess.CalledProcessError,))
