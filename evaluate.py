"""
Evaluate L-Verse the way the paper does (section 4), one subcommand per kind of result:

    python evaluate.py recon --vae out/vae_sl/best.pt            # AugVAE on the built-in shapes test split
    python evaluate.py recon --vae sl.pt --source folder --data /data/imagenet/val --limit 50000 \
        --inception pt_inception-2015-12-05-6726825d.pth --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth
    python evaluate.py fid REAL_DIR GENERATED_DIR --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py caption-metrics candidates.jsonl dataset_coco.json --split test
    python evaluate.py fashion --vae sl.pt --gpt gpt.pt          # Fashion-MNIST, both directions, by class
    python evaluate.py SUBCOMMAND --help                        # every flag, explained

Each prints a table and writes its results as JSON (--json, default out/eval/SUBCOMMAND.json);
main(argv) returns the same dict. The metrics themselves (caption metrics, SSIM, the FID-k
blur, the FID Inception and the Frechet distance, the Fashion-MNIST judge) are metrics.py;
read_captions, folder_features and shapes_metrics here feed them from files and models. The
flags are declared once, in dicts at the top (the shared groups, then each subcommand's); a new
subcommand is an X_FLAGS dict + run_X(args) -> dict pair registered in SUBCOMMANDS.
`--inception random` (random weights) exists for tests only.

What each number is
- PSNR (dB): per image, the float reconstruction clamped to [-1, 1] against the input
  (augvae.psnr, peak-to-peak 2: the 8-bit PSNR without rounding), then the mean over images.
- SSIM: per image on data in [0, 1] (data range 1): 11x11 Gaussian window with sigma 1.5,
  K1 = 0.01, K2 = 0.03, windows fully inside the image, averaged over positions and the three
  channels (as pytorch-msssim and torchmetrics compute it), then the mean over images.
- LPIPS: augvae.LPIPS (VGG16, LPIPS v0.1 heads) per image, mean; absent without the two weight files.
- rFID: FID between the inputs and their reconstructions, both as 8-bit images.
- codebook usage: distinct codes among all tokens of the evaluated images / codebook size
  (all levels together for an ML model, each level also in the JSON); perplexity: exp of the
  entropy of that token histogram (augvae.perplexity).
- FID: the Frechet distance between Gaussians fitted to Inception-v3 pool3 features (2048-d),
  with pytorch-fid's conventions: the FID Inception weights, images resized to 299 x 299
  bilinearly, mean and covariance in float64 (np.cov, rowvar=False). The square-root term is
  computed without scipy (metrics.trace_sqrt_product; with fewer images than dimensions, the
  exact low-rank form in metrics.fid_from_features). Below 2,048 images the covariances are
  singular and the FID is biased upwards: compare numbers only at the same image count.
- FID-k (Table 3): before Inception, BOTH image sets are blurred with PIL's
  ImageFilter.GaussianBlur(radius=k) on the 8-bit image, k = 0 (no blur), 1, 2, 4, 8. PIL's
  radius is the Gaussian's standard deviation in pixels of the image as given, so bring both
  sets to one resolution (--image-size) before comparing across models.
- Captions (Table 2): as the COCO caption toolkit (pycocoevalcap) computes them, reported as
  fractions (the paper prints x100): its PTB tokenization (emulated, see metrics.ptb_tokenize),
  corpus BLEU-1..4 with the closest reference length, ROUGE-L (beta 1.2), CIDEr-D (sigma 6,
  clipping, x10, document frequencies from the references). BLEU, ROUGE-L and CIDEr-D are
  written in metrics.py; METEOR and SPICE are Java programs and run only when pycocoevalcap is
  installed and `java` is on PATH, otherwise they are reported as absent (null), never as 0.
- fashion (Fashion-MNIST): caption accuracy = the share of test images whose caption names
  their class (data.parse_fashion_caption; a caption naming none or two classes is wrong).
  Drawn images are judged by a small CNN (metrics.FashionClassifier) trained here on the
  60,000 real training images only (its accuracy on the real test images comes first; below
  90% the verdict is void): class accuracy, the Frechet distance between its 128-d
  penultimate features of the drawn and of the real test images (metrics.fid_from_features;
  overall and per class), and the diversity: the mean pairwise feature distance within a
  class, drawn over real (1: as varied as the real images, 0: one image repeated). 'none' is
  the first sample, 'self' the self-reranked best of the same candidates.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import augvae
import data
import runtime
import shapes
import metrics
import sample


# -----------------------------------------------------------------------------------------
# flags, as every script declares them: name=(default, help) or (default, help, kind), read by
# runtime.add_flags (--name, underscores becoming dashes; `kind`: the type, or a tuple of the
# allowed values). The groups several subcommands share come first (a function where the
# default differs per subcommand), then each subcommand's flags as the merge of its groups;
# POSITIONALS holds the two subcommands' positional arguments. A None default is a required
# flag, checked at the start of its subcommand.

SHAPES_EVAL_SIZE = 500  # the built-in shapes have no end: --limit 0 evaluates this many (prepare.py's test size)

DEVICE_FLAGS = dict(device=("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"))


def system_flags(batch_size: int) -> dict:
    return dict(batch_size=(batch_size, "images per forward pass"),
                workers=(0, "DataLoader processes decoding images (0: the main process)"), **DEVICE_FLAGS)


BIART_SYSTEM_FLAGS = dict(batch_size=(128, "sequences per BiART forward pass"), **DEVICE_FLAGS)

INCEPTION_FLAGS = dict(
    inception=("", f"the FID Inception weights file: {metrics.INCEPTION_SOURCE}. '{metrics.RANDOM_INCEPTION}' uses "
                   "random weights (for tests of the plumbing only; the numbers mean nothing)"),
    inception_size=(metrics.INCEPTION_SIZE, "Inception input resolution; 299 is the standard FID, smaller values are "
                                            "for tests only"),
)

BLUR_FLAGS = dict(blur=(",".join(map(str, metrics.FID_BLUR_RADII)), "comma-separated Gaussian blur radii k for FID-k "
                        "(PIL GaussianBlur, sigma in pixels, applied to both image sets; 0 = plain FID)"))

JAVA_FLAGS = dict(java=(True, "METEOR and SPICE, which run java (without java and pycocoevalcap they are absent); "
                              "--no-java skips them"))

FASHION_ROOT_FLAGS = dict(fashion_root=(data.FASHION_ROOT, "the folder of the Fashion-MNIST idx files "
                                        "(train-images-idx3-ubyte.gz, t10k-..., and the labels)"))

NUM_OBJECTS_FLAGS = dict(num_objects=(1, "shapes: objects per image (1 or 2, as the models were trained)"))

DATASET_FLAGS = dict(  # the images (and captions) to evaluate on: the sources prepare.py reads, or a folder
    source=("shapes", "the images: built-in 'shapes', a 'coco'/'cc'/'jsonl' caption file as prepare.py reads it, "
                      "'fashion-mnist', or any image 'folder' (--data)", (*data.SOURCES, "folder")),
    split=("auto", "which split of the source: shapes train/val/test/heldout, coco train/val/test, cc/jsonl "
                   "train/val; 'auto' takes test where there is one, else val"),
    data=("", "--source folder: the image folder (any depth; e.g. ImageNet val)"),
    captions=("", "coco/cc/jsonl: the caption file (as prepare.py --captions)"),
    val_captions=("", "cc/jsonl: a validation caption file (as prepare.py)"),
    image_root=("", "folder the caption file's image paths are relative to"),
    val_fraction=(0.01, "cc/jsonl without --val-captions: held-out fraction"),
    **FASHION_ROOT_FLAGS,
    **NUM_OBJECTS_FLAGS,
    seed=(0, "shapes dataset seed; also the cc/jsonl/fashion-mnist hold-out seed"),
    limit=(0, f"evaluate the first N images of the split (0: all of them; for shapes, {SHAPES_EVAL_SIZE})"),
)

MODEL_FLAGS = dict(
    vae=("out/vae_sl/best.pt", "AugVAE-SL checkpoint"),
    gpt=("out/gpt/ckpt.pt", "BiART checkpoint"),
    bpe=("", "tokenizer merges file; '' -> the one the BiART checkpoint records"),
)


def temperature_flags(temperature: float, top_k: int) -> dict:
    return dict(temperature=(temperature, "sampling temperature"), top_k=(top_k, "sampling top-k (0: off)"))


GUIDANCE_FLAGS = dict(guidance=(1.0, sample.GUIDANCE_HELP))


def sampling_flags(num_candidates: int) -> dict:
    """captions, t2i: one direction, reranked by sample.Sampler."""
    return dict(
        num_candidates=(num_candidates, "candidates sampled per input"),
        rerank=("self", "'self': by the other direction's likelihood; 'clip' (needs --clip-model); 'none'",
                sample.RERANKERS),
        clip_model=("", "--rerank clip: a CLIP TorchScript file (e.g. OpenAI's ViT-B-32.pt)"),
        **temperature_flags(1.0, 0),
        top_p=(0.0, "nucleus sampling threshold (0: off)"),
        sample_seed=(0, "seed of the sampling"),
    )


DIRECTIONS_FLAGS = dict(directions=("i2t,t2i", "comma-separated: i2t (caption the images), t2i (draw from "
                                               "captions), or both"))


def both_ways_flags(caption_candidates: int, top_k: int) -> dict:
    """shapes, fashion: both directions, the first sample and the self-reranked best of the candidates."""
    return dict(
        caption_candidates=(caption_candidates, "captions sampled per image (each is scored by the other direction: "
                                                "the cost of captioning grows with this)"),
        image_candidates=(8, "images sampled per caption"),
        **temperature_flags(0.5, top_k),
        caption_temperature=(None, "image -> text sampling temperature (default: --temperature): more varied "
                                   "candidates give the reranker more to choose from", float),
        caption_edits=(0, sample.CAPTION_EDITS_HELP),
        **GUIDANCE_FLAGS,
        seed=(0, "sampling seed"),
    )


def json_flags(subcommand: str) -> dict:
    return dict(json=(os.path.join("out", "eval", f"{subcommand}.json"), "write the results here as JSON"))


RECON_FLAGS = dict(
    vae=(None, "the AugVAE checkpoint to evaluate, ML or SL (required; train_vae.py writes out/vae_sl/best.pt)", str),
    **DATASET_FLAGS,
    lpips_vgg=("", "torchvision's vgg16-397923af.pth, for LPIPS (with --lpips-heads)"),
    lpips_heads=("", "the LPIPS v0.1 VGG heads (lpips project's weights/v0.1/vgg.pth)"),
    **INCEPTION_FLAGS,
    **system_flags(32),
    **json_flags("recon"),
)

FID_FLAGS = dict(
    **BLUR_FLAGS,
    image_size=(0, "centre-crop and resize every image to this size before blurring (0: as given); use the "
                   "generated size, e.g. 256, so that k means the same"),
    limit=(0, "use the first N images of each folder (0: all)"),
    **INCEPTION_FLAGS,
    **system_flags(50),
    **json_flags("fid"),
)

CAPTION_METRICS_FLAGS = dict(
    split=("test", "Karpathy references: which split (train, val, test)"),
    **JAVA_FLAGS,
    **json_flags("caption-metrics"),
)

CAPTIONS_FLAGS = dict(
    **MODEL_FLAGS,
    **DATASET_FLAGS,
    **sampling_flags(16),
    caption_len=(32, "tokens sampled per caption, cut at the first full stop"),
    out=(os.path.join("out", "eval", "captions.jsonl"),
         "the generated captions, one JSON line per image (the caption-metrics input format)"),
    **JAVA_FLAGS,
    **system_flags(64),
    **json_flags("captions"),
)

T2I_FLAGS = dict(
    **MODEL_FLAGS,
    **DATASET_FLAGS,
    **sampling_flags(64),
    **GUIDANCE_FLAGS,
    out=(os.path.join("out", "eval", "t2i"),
         "folder for the drawn images (OUT/generated) and the real ones at the same size (OUT/real)"),
    **BLUR_FLAGS,
    **INCEPTION_FLAGS,
    **system_flags(64),
    **json_flags("t2i"),
)

SHAPES_FLAGS = dict(
    **MODEL_FLAGS,
    splits=("test,heldout", "comma-separated shapes splits: test (unseen images), heldout (unseen colour/shape "
                            "combinations), val"),
    **NUM_OBJECTS_FLAGS,
    limit=(200, "examples per split"),
    **DIRECTIONS_FLAGS,
    **both_ways_flags(caption_candidates=8, top_k=8),
    **BIART_SYSTEM_FLAGS,
    **json_flags("shapes"),
)

SHAPES_TOKENS_FLAGS = dict(
    vae=("out/vae_sl/best.pt", "AugVAE-SL checkpoint"),
    limit=(400, "examples of each evaluated split (test: seen colour/shape pairs, heldout: unseen ones)"),
    probe_size=(2000, "training-split images the linear probes are fitted on"),
    batch_size=(64, "images per forward pass"),
    **DEVICE_FLAGS,
    **json_flags("shapes_tokens"),
)

FASHION_FLAGS = dict(
    **MODEL_FLAGS,
    **FASHION_ROOT_FLAGS,
    classifier=(os.path.join("out", "eval", "fashion_classifier.pt"),
                "the judging CNN: loaded from here if it was trained on the same training files with the same "
                "settings, otherwise trained on the real training images and saved here"),
    classifier_epochs=(3, "epochs of the judging CNN's training"),
    **DIRECTIONS_FLAGS,
    limit=(0, "image->text: caption the first N test images (0: all 10,000)"),
    per_class=(100, "text->image: images drawn per class, from the held-out paraphrases in turn"),
    **both_ways_flags(caption_candidates=4, top_k=0),
    grid_columns=(10, "images per class row in the grids"),
    out=(os.path.join("out", "eval", "fashion"),
         "folder for the grids: t2i_self.png, t2i_none.png (one row per class), real.png"),
    **BIART_SYSTEM_FLAGS,
    **json_flags("fashion"),
)

POSITIONALS = {  # subcommand: {name: help}
    "fid": dict(real="folder of real images (any depth)", generated="folder of generated images (any depth)"),
    "caption-metrics": dict(
        candidates="the captions to score, one per image: JSON {id: caption}, COCO results [{image_id, caption}] "
                   "or JSONL {\"image\": id, \"caption\": text}",
        references="reference captions: JSON {id: [captions]}, JSONL {\"image\": id, \"captions\": [...]} "
                   "(prepare.py / shapes.py export), COCO annotations or Karpathy dataset_coco.json"),
}


# -----------------------------------------------------------------------------------------
# CLI helpers

def _fmt(value, digits: int = 4) -> str:
    return "absent" if value is None else f"{value:.{digits}f}"


def _unit_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> the 8-bit images they are saved as, back in [0, 1] (data.to_uint8 / 255)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def _check_system_args(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


# -----------------------------------------------------------------------------------------
# recon: AugVAE reconstruction quality (Tables 1 and 4)

def _recon_items(args) -> tuple:
    """-> (split name, [(name, path or shapes index, captions)]) for data.Views."""
    if args.source == "folder":
        if not args.data or not os.path.isdir(args.data):
            raise ValueError(f"--source folder needs --data FOLDER, an existing folder (got {args.data!r})")
        # data.Views reads any non-shapes item as (name, path, captions) and wants a caption
        items = [(os.path.relpath(p, args.data), p, [""]) for p in data.list_images(args.data)]
        split = "folder"
    else:
        if args.source == "shapes":
            wanted = "test" if args.split == "auto" else args.split
            if wanted not in shapes.SPLITS:
                raise ValueError(f"--split {wanted}: the shapes splits are {', '.join(shapes.SPLITS)}")
        splits = data.list_items(args.source, captions=args.captions, val_captions=args.val_captions,
                                 image_root=args.image_root, val_fraction=args.val_fraction, seed=args.seed,
                                 fashion_root=args.fashion_root,
                                 shapes_sizes={wanted: args.limit or SHAPES_EVAL_SIZE} if args.source == "shapes" else None)
        split = ("test" if "test" in splits else "val") if args.split == "auto" else args.split
        if split not in splits:
            raise ValueError(f"--split {split}: the source has splits {', '.join(splits) or 'none'}")
        items = splits[split]
    items = items[:args.limit] if args.limit else items
    if not items:
        raise ValueError(f"no images to evaluate in {args.data or args.captions or args.source}")
    return split, items


def _load_lpips(args):
    if bool(args.lpips_vgg) != bool(args.lpips_heads):
        raise ValueError("LPIPS needs both --lpips-vgg and --lpips-heads")
    if not args.lpips_vgg:
        return None
    return augvae.load_lpips(runtime.load_weights(args.lpips_vgg), runtime.load_weights(args.lpips_heads))


@torch.no_grad()
def run_recon(args) -> dict:
    if args.vae is None:
        raise ValueError("--vae is required: the AugVAE checkpoint to evaluate "
                         "(train_vae.py writes out/vae_sl/best.pt)")
    _check_system_args(args)
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    device = runtime.resolve_device(args.device)
    vae = augvae.load(args.vae).to(device)
    vcfg = vae.cfg
    lpips = _load_lpips(args)
    lpips = lpips.to(device) if lpips is not None else None
    inception = metrics.load_inception(args.inception, args.inception_size).to(device) if args.inception else None
    split, items = _recon_items(args)
    kind = "SL" if vcfg.single_level else "ML"
    print(f"recon: {len(items)} images of {args.source}/{split} through AugVAE-{kind} at {vcfg.image_size} px "
          f"({args.vae}) on {device}")

    views = data.Views(args.source, split, items, 0, vcfg.image_size, 0, args.num_objects, args.seed)
    loader = torch.utils.data.DataLoader(views, batch_size=args.batch_size, num_workers=args.workers)
    K = vcfg.codebook_size
    counts = {level: torch.zeros(K, dtype=torch.long) for level in vcfg.token_levels}
    psnr, ssims, lpips_values, real_feats, fake_feats, skipped = [], [], [], [], [], []
    for k, (x, _, ok, err, _) in enumerate(tqdm(loader, desc="recon", dynamic_ncols=True)):
        names = [it[0] for it in items[k * args.batch_size:(k + 1) * args.batch_size]]
        skipped += [[n, e] for n, o, e in zip(names, ok.tolist(), err) if not o]
        x = x[ok].to(device)
        if len(x) == 0:
            continue
        tokens = vae.encode_levels(x)  # one (B, h, w) grid per level, finest first
        recon = vae.decode_levels(tokens).float()  # (B, 3, H, W), unclamped
        for level, t in zip(vcfg.token_levels, tokens):
            counts[level] += torch.bincount(t.flatten().cpu(), minlength=K)
        psnr += augvae.psnr(recon, x).tolist()
        ssims += metrics.ssim((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2).tolist()
        if lpips is not None:
            lpips_values += lpips(recon.clamp(-1, 1), x).tolist()
        if inception is not None:
            real_feats.append(inception(_unit_8bit(x)).cpu())
            fake_feats.append(inception(_unit_8bit(recon)).cpu())
    if not psnr:
        raise ValueError(f"every image was unreadable ({len(skipped)} skipped, e.g. {skipped[0][1]})")
    n = len(psnr)
    total = sum(counts.values())
    rfid = metrics.fid_from_features(torch.cat(real_feats).numpy(), torch.cat(fake_feats).numpy()) \
        if inception is not None and n >= 2 else None
    results = {
        "images": n, "skipped": len(skipped), "skipped_files": skipped,
        "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssims)),
        "lpips": float(np.mean(lpips_values)) if lpips is not None else None,
        "rfid": rfid,
        "codebook_size": K, "codes_used": int((total > 0).sum()),
        "codebook_usage": int((total > 0).sum()) / K, "perplexity": augvae.perplexity(total.float()),
        "levels": {str(level): {"grid": vcfg.grid(level), "codes_used": int((c > 0).sum()),
                                "codebook_usage": int((c > 0).sum()) / K, "perplexity": augvae.perplexity(c.float())}
                   for level, c in counts.items()},
        "absent": {name: why for name, why in (
            ("lpips", None if lpips is not None else "give --lpips-vgg and --lpips-heads"),
            ("rfid", None if rfid is not None else (f"give --inception {metrics.INCEPTION_FILE}" if inception is None
                                                    else "needs at least 2 images"))) if why},
        "settings": {"vae": os.path.abspath(args.vae), "model": kind, "image_size": vcfg.image_size,
                     "source": args.source, "split": split, "data": args.data, "captions": args.captions,
                     "limit": args.limit, "inception": args.inception, "inception_size": args.inception_size,
                     "ssim": "Gaussian 11x11 sigma 1.5, K1 0.01 K2 0.03, data range 1 ([0, 1] images)",
                     "psnr": "float reconstruction clamped to [-1, 1] vs input, peak-to-peak 2"},
    }
    print(f"  {'PSNR (dB)':<16} {results['psnr']:.3f}")
    print(f"  {'SSIM':<16} {results['ssim']:.4f}")
    for label, key, digits in (("LPIPS", "lpips", 4), ("rFID", "rfid", 3)):
        why = f"  ({results['absent'][key]})" if key in results["absent"] else ""
        print(f"  {label:<16} {_fmt(results[key], digits)}{why}")
    print(f"  {'codebook usage':<16} {results['codes_used']} / {K} = {results['codebook_usage']:.4f}")
    print(f"  {'perplexity':<16} {results['perplexity']:.2f}")
    if len(counts) > 1:
        for level, s in results["levels"].items():
            print(f"    level {level} ({s['grid']}x{s['grid']}): {s['codes_used']} codes, "
                  f"perplexity {s['perplexity']:.2f}")
    if skipped:
        print(f"  skipped {len(skipped)} unreadable images (listed in the JSON)")
    if rfid is not None and n < metrics.INCEPTION_DIM:
        print(f"  note: rFID from {n} images (< {metrics.INCEPTION_DIM}) is biased upwards; compare at equal counts only")
    return results


# -----------------------------------------------------------------------------------------
# fid: FID-k between two image folders (Table 3)

class BlurredImages(torch.utils.data.Dataset):
    """Image files -> (R, 3, S, S) Inception inputs, one per blur radius, ok flag, error text.
    With image_size > 0 each image is first centre-cropped and resized to image_size."""

    def __init__(self, paths: list, radii: tuple, input_size: int, image_size: int = 0):
        self.paths, self.radii, self.input_size, self.image_size = paths, radii, input_size, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = data.load_image(self.paths[i])
        except data.ImageError as e:
            return torch.zeros(len(self.radii), 3, self.input_size, self.input_size), False, str(e)
        if self.image_size:
            img = data.center_crop_resize(img, self.image_size)
        return torch.stack([metrics.inception_input(metrics.blur(img, r), self.input_size) for r in self.radii]), True, ""


@torch.no_grad()
def folder_features(model: metrics.InceptionV3FID, folder: str, radii: tuple, batch_size: int = 50, workers: int = 0,
                    image_size: int = 0, limit: int = 0, device="cpu", desc: str = "") -> dict:
    """Inception features of every image under `folder` at each blur radius:
    {"features": {radius: (N, 2048) float32 array}, "images": N, "skipped_files": [[path, why]]}."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    paths = data.list_images(folder)
    paths = paths[:limit] if limit else paths
    if not paths:
        raise ValueError(f"{folder}: holds no images ({', '.join(data.IMAGE_EXTENSIONS)})")
    ds = BlurredImages(paths, radii, model.input_size, image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    feats, skipped = {r: [] for r in radii}, []
    for k, (x, ok, err) in enumerate(tqdm(loader, desc=desc or folder, dynamic_ncols=True)):
        batch = paths[k * batch_size:(k + 1) * batch_size]
        skipped += [[p, e] for p, o, e in zip(batch, ok.tolist(), err) if not o]
        x = x[ok].to(device)  # (B, R, 3, S, S)
        if len(x):
            for j, r in enumerate(radii):
                feats[r].append(model(x[:, j]).cpu())
    n = len(paths) - len(skipped)
    if n < 2:
        raise ValueError(f"{folder}: FID needs at least 2 readable images, found {n}")
    return {"features": {r: torch.cat(f).numpy() for r, f in feats.items()}, "images": n, "skipped_files": skipped}


def _parse_radii(text: str) -> tuple:
    try:
        radii = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--blur expects radii like 0,1,2,4,8, got {text!r}") from None
    if any(r < 0 or not math.isfinite(r) for r in radii) or len(set(radii)) != len(radii):
        raise ValueError(f"--blur radii must be distinct and >= 0, got {text!r}")
    return tuple(int(r) if r == int(r) else r for r in radii)


def run_fid(args) -> dict:
    _check_system_args(args)
    radii = _parse_radii(args.blur)
    if args.image_size < 0 or args.limit < 0:
        raise ValueError("--image-size and --limit must be >= 0")
    device = runtime.resolve_device(args.device)
    model = metrics.load_inception(args.inception, args.inception_size).to(device)
    sets = {}
    for name in ("real", "generated"):
        sets[name] = folder_features(model, getattr(args, name), radii, args.batch_size, args.workers,
                                     args.image_size, args.limit, device, desc=name)
    fids = {str(r): metrics.fid_from_features(sets["real"]["features"][r], sets["generated"]["features"][r]) for r in radii}
    results = {
        "fid": fids,
        **{name: {"folder": os.path.abspath(getattr(args, name)), "images": s["images"],
                  "skipped": len(s["skipped_files"]), "skipped_files": s["skipped_files"]} for name, s in sets.items()},
        "settings": {"blur": list(radii), "blur_filter": "PIL ImageFilter.GaussianBlur(radius=k) on 8-bit images",
                     "image_size": args.image_size, "limit": args.limit, "inception": args.inception,
                     "inception_size": args.inception_size},
    }
    print("FID-k: " + " vs ".join(
        f"{s['images']} {name} ({getattr(args, name)}" + (f"; {len(s['skipped_files'])} unreadable skipped)"
                                                         if s["skipped_files"] else ")") for name, s in sets.items()))
    print("  " + "  ".join(f"{'k=' + str(r):>9}" for r in radii))
    print("  " + "  ".join(f"{fids[str(r)]:9.3f}" for r in radii))
    if min(sets["real"]["images"], sets["generated"]["images"]) < metrics.INCEPTION_DIM:
        print(f"  note: fewer than {metrics.INCEPTION_DIM} images per set: FID is biased upwards; "
              "compare at equal counts only")
    return results


# -----------------------------------------------------------------------------------------
# caption-metrics: a candidates file against a references file (Table 2)

def _json_records(path: str):
    """A JSON document, or the records of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: neither JSON nor JSONL ({e.msg})") from None
    return records


def read_captions(path: str, split: str = "test") -> dict:
    """{image id (str): [captions]} from any of: a JSON object {id: caption or [captions]}; a list
    (JSON or JSONL) of records with an id ("image_id", "image" or "id") and "caption" or
    "captions" (the COCO results format, prepare.py's {split}.jsonl, shapes.py export's
    captions.jsonl); a COCO annotations file ({"annotations": [...]}); a Karpathy
    dataset_coco.json (the images of `split`, named filepath/filename as prepare.py names them)."""
    obj = _json_records(path)
    if isinstance(obj, dict) and "annotations" in obj:
        obj = obj["annotations"]
    elif isinstance(obj, dict) and "images" in obj:
        out = {}
        for k, im in enumerate(obj["images"]):
            try:
                if data.COCO_SPLITS.get(im["split"]) == split:
                    out[os.path.join(im.get("filepath", ""), im["filename"])] = [s["raw"] for s in im["sentences"]]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}: image entry {k} lacks {e} (a Karpathy file has split, filename, "
                                 f"sentences)") from None
        if not out:
            raise ValueError(f"{path}: no images in split {split!r}")
        return out
    elif isinstance(obj, dict):
        obj = [{"id": k, "captions": v} for k, v in obj.items()]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected caption records, got a JSON {type(obj).__name__}")
    out = {}
    for k, rec in enumerate(obj):
        key = next((rec[n] for n in ("image_id", "image", "id") if n in rec), None) if isinstance(rec, dict) else None
        caps = rec.get("caption", rec.get("captions")) if isinstance(rec, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if key is None or not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: record {k} needs an id (image_id, image or id) and a caption string or "
                             f"a list of them")
        out.setdefault(str(key), []).extend(caps)
    return out


def run_caption_metrics(args) -> dict:
    cands = read_captions(args.candidates, args.split)
    refs = read_captions(args.references, args.split)
    many = [k for k, v in cands.items() if len(v) != 1]
    if many:
        raise ValueError(f"{args.candidates}: image {many[0]!r} has {len(cands[many[0]])} candidate captions; "
                         f"give one per image")
    candidates = {k: v[0] for k, v in cands.items()}
    scores = metrics.caption_metrics(candidates, refs, java=args.java)
    status = metrics.java_metric_status() if args.java else {"METEOR": "--no-java", "SPICE": "--no-java"}
    absent = {k: status[k] for k in ("METEOR", "SPICE") if scores[k] is None}
    results = {"metrics": scores, "absent": absent, "images": len(candidates),
               "references": sum(len(refs[k]) for k in candidates),
               "unused_reference_images": len(set(refs) - set(cands)),
               "settings": {"candidates": os.path.abspath(args.candidates),
                            "references": os.path.abspath(args.references), "split": args.split,
                            "scale": "fractions, as pycocoevalcap; the paper prints x100"}}
    print(f"caption metrics: {len(candidates)} images, {results['references']} references")
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
             "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D", "SPICE": "SPICE"}
    print(f"  {'metric':<9} {'score':>8} {'x100':>7}")
    for key, label in names.items():
        v = scores[key]
        print(f"  {label:<9} {_fmt(v):>8} {'' if v is None else f'{100 * v:7.2f}'}"
              + (f"  ({absent[key]})" if key in absent else ""))
    return results


# -----------------------------------------------------------------------------------------
# captions, t2i, shapes: BiART sampled through sample.Sampler, then scored

def _sampler(args, device) -> sample.Sampler:
    if args.num_candidates < 1:
        raise ValueError(f"--num-candidates must be >= 1, got {args.num_candidates}")
    s = sample.Sampler(args.vae, args.gpt, args.bpe, str(device), "auto", args.batch_size)
    if args.rerank == "clip":
        s.load_clip(args.clip_model)
    return s


def _sampling_kw(args, s: sample.Sampler) -> dict:
    return dict(rerank=args.rerank, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                generator=torch.Generator(device=s.device).manual_seed(args.sample_seed))


@torch.no_grad()
def run_captions(args) -> dict:
    _check_system_args(args)
    s = _sampler(args, runtime.resolve_device(args.device))
    split, items = _recon_items(args)
    views = data.Views(args.source, split, items, 0, s.image_size, 0, args.num_objects, args.seed)
    kw = _sampling_kw(args, s)
    candidates, references, skipped, rows = {}, {}, [], []
    per = max(1, args.batch_size // args.num_candidates)  # images per BiART call
    loader = torch.utils.data.DataLoader(views, batch_size=per, num_workers=args.workers)
    for k, (x, _, ok, err, caps) in enumerate(tqdm(loader, desc="captions", dynamic_ncols=True)):
        batch = items[k * per:(k + 1) * per]
        skipped += [[it[0], e] for it, o, e in zip(batch, ok.tolist(), err) if not o]
        batch = [(it[0], json.loads(c)) for it, o, c in zip(batch, ok.tolist(), caps) if o]
        if not batch:
            continue
        ids = s.vae.encode(x[ok].to(s.device)).flatten(1)
        pil = [Image.fromarray(a) for a in data.to_uint8(x[ok])] if args.rerank == "clip" else None
        for it, cands in zip(batch, s.caption(ids, args.num_candidates, caption_len=args.caption_len,
                                              views=pil, **kw)):
            best = cands[sample.best_first([sc for _, sc in cands])[0]][0]
            name = str(it[0])
            candidates[name], references[name] = best, it[1]
            rows.append({"image": name, "caption": best, "candidates": [[c, sc] for c, sc in cands]})
    if not candidates:
        raise ValueError(f"every image was unreadable ({len(skipped)} skipped)")
    runtime.write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    scores = metrics.caption_metrics(candidates, references, java=args.java)
    status = metrics.java_metric_status() if args.java else {"METEOR": "--no-java", "SPICE": "--no-java"}
    absent = {k: status[k] for k in ("METEOR", "SPICE") if scores[k] is None}
    results = {"metrics": scores, "absent": absent, "images": len(candidates), "skipped": len(skipped),
               "skipped_files": skipped, "captions_file": os.path.abspath(args.out),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json",)}}
    print(f"captions: {len(candidates)} images of {args.source}/{split}, {args.num_candidates} candidates each, "
          f"rerank {args.rerank}; captions in {args.out}")
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"):
        print(f"  {key:<8} {_fmt(scores[key])}" + (f"  ({absent[key]})" if key in absent else ""))
    return results


@torch.no_grad()
def run_t2i(args) -> dict:
    """One image per dataset item, drawn from the item's first caption (the paper draws one per
    MS-COCO val caption, 30,000 of them), best of --num-candidates; FID-k against the items' own
    images, both at the AugVAE's resolution."""
    _check_system_args(args)
    sample.check_guidance(args.guidance)
    radii = _parse_radii(args.blur)
    if not args.inception:  # fail before hours of sampling
        raise ValueError(f"t2i needs --inception: {metrics.INCEPTION_SOURCE}")
    device = runtime.resolve_device(args.device)
    inception = metrics.load_inception(args.inception, args.inception_size).to(device)
    s = _sampler(args, device)
    split, items = _recon_items(args)
    views = data.Views(args.source, split, items, 0, s.image_size, 0, args.num_objects, args.seed)
    real_dir, gen_dir = os.path.join(args.out, "real"), os.path.join(args.out, "generated")
    os.makedirs(real_dir, exist_ok=True)
    os.makedirs(gen_dir, exist_ok=True)
    kw = _sampling_kw(args, s)
    skipped, rows = [], []
    for k in tqdm(range(len(items)), desc="t2i", dynamic_ncols=True):
        x, _, ok, err, caps = views[k]
        name = str(items[k][0])
        if not ok:
            skipped.append([name, err])
            continue
        caption = json.loads(caps)[0]
        try:
            text = s.caption_ids(caption)[None]
        except ValueError as e:
            skipped.append([name, str(e)])
            continue
        ids, scores = s.draw(text, args.num_candidates, captions=[caption], guidance=args.guidance, **kw)[0]
        pick = sample.best_first(scores.tolist())[0] if scores is not None else 0
        stem = f"{len(rows):06d}"
        Image.fromarray(data.to_uint8(s.decode_images(ids[pick:pick + 1]))[0]).save(os.path.join(gen_dir, stem + ".png"))
        Image.fromarray(data.to_uint8(x[None])[0]).save(os.path.join(real_dir, stem + ".png"))
        rows.append({"image": name, "caption": caption, "file": stem + ".png"})
    if len(rows) < 2:
        raise ValueError(f"FID needs at least 2 drawn images, got {len(rows)} ({len(skipped)} skipped)")
    runtime.write_text(os.path.join(args.out, "captions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    feats = {name: folder_features(inception, folder, radii, args.batch_size, args.workers, 0, 0, device, desc=name)
             for name, folder in (("real", real_dir), ("generated", gen_dir))}
    fids = {str(r): metrics.fid_from_features(feats["real"]["features"][r], feats["generated"]["features"][r])
            for r in radii}
    results = {"fid": fids, "images": len(rows), "skipped": len(skipped), "skipped_files": skipped,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json",)}}
    print(f"t2i: {len(rows)} captions of {args.source}/{split} drawn, best of {args.num_candidates} "
          f"(rerank {args.rerank}); images in {args.out}")
    print("  " + "  ".join(f"{'FID-' + str(r):>9}" for r in radii))
    print("  " + "  ".join(f"{fids[str(r)]:9.3f}" for r in radii))
    return results


def _mean_matches(matches: list) -> dict:
    return {k: float(np.mean([m[k] for m in matches])) for k in matches[0]} if matches else {}


@torch.no_grad()
def shapes_metrics(sampler: sample.Sampler, split: str = "test", num_objects: int = 1, limit: int = 200,
                   caption_candidates: int = 8, image_candidates: int = 8, temperature: float = 0.5,
                   top_k: int = 8, seed: int = 0, directions=("i2t", "t2i"), group: int = 8,
                   guidance: float = 1.0, caption_temperature: float | None = None, caption_edits: int = 0) -> dict:
    """Exact attribute accuracy of BiART on the first `limit` examples of a shapes split, per
    attribute and all-correct ('exact'), both for the first sample ('none': no reranking) and
    the self-reranked best ('self') of the same candidates. Image -> text: the caption is
    parsed back (shapes.parse_caption); text -> image: the drawn image is read back by the
    analyzer (shapes.analyze_image); example i draws its caption number i mod 5. Captions are
    sampled at caption_temperature (None: temperature), the best refined by caption_edits rounds
    of one-token edits (sample.Sampler.caption)."""
    size = sampler.image_size
    examples = [shapes.shapes_example(i, split, size, num_objects) for i in range(limit)]
    truths = [{"objects": e.objects, "relation": e.relation} for e in examples]
    g = torch.Generator(device=sampler.device).manual_seed(seed)
    kw = dict(rerank="self", temperature=temperature, top_k=top_k, generator=g)
    caption_kw = {**kw, "temperature": sample.caption_temperature(temperature, caption_temperature),
                  "edits": caption_edits}
    out = {}
    if "i2t" in directions:
        t0, res, shown = time.time(), {"none": [], "self": []}, []
        for i in tqdm(range(0, limit, group), desc=f"{split} image->text", leave=False, dynamic_ncols=True):
            views = [Image.fromarray(e.image) for e in examples[i:i + group]]
            for j, cands in enumerate(sampler.caption(sampler.encode_images(views), caption_candidates,
                                                      **caption_kw)):
                first, best = cands[0][0], cands[sample.best_first([sc for _, sc in cands])[0]][0]
                res["none"].append(shapes.match_attributes(shapes.parse_caption(first), truths[i + j]))
                res["self"].append(shapes.match_attributes(shapes.parse_caption(best), truths[i + j]))
                if len(shown) < 5:
                    shown.append({"truth": examples[i + j].captions[0], "caption": best})
        out["i2t"] = {**{k: _mean_matches(v) for k, v in res.items()}, "seconds": time.time() - t0, "examples": shown}
    if "t2i" in directions:
        t0, res = time.time(), {"none": [], "self": []}
        for i in tqdm(range(0, limit, group), desc=f"{split} text->image", leave=False, dynamic_ncols=True):
            captions = [e.captions[(i + j) % len(e.captions)] for j, e in enumerate(examples[i:i + group])]
            text = torch.stack([sampler.caption_ids(c) for c in captions])
            for j, (ids, scores) in enumerate(sampler.draw(text, image_candidates, guidance=guidance, **kw)):
                pick = sample.best_first(scores.tolist())[0]
                first, best = data.to_uint8(sampler.decode_images(ids[[0, pick]]))
                res["none"].append(shapes.match_attributes(shapes.analyze_image(first, num_objects), truths[i + j]))
                res["self"].append(shapes.match_attributes(shapes.analyze_image(best, num_objects), truths[i + j]))
        out["t2i"] = {**{k: _mean_matches(v) for k, v in res.items()}, "seconds": time.time() - t0}
    return out


def run_shapes(args) -> dict:
    splits = [x for x in args.splits.split(",") if x]
    directions = [x for x in args.directions.split(",") if x]
    if not splits or set(splits) - set(shapes.SPLITS):
        raise ValueError(f"--splits must name shapes splits ({', '.join(shapes.SPLITS)}), got {args.splits!r}")
    if not directions or set(directions) - {"i2t", "t2i"}:
        raise ValueError(f"--directions must be i2t, t2i or both, got {args.directions!r}")
    if args.limit < 1 or args.caption_candidates < 1 or args.image_candidates < 1:
        raise ValueError("--limit, --caption-candidates and --image-candidates must be >= 1")
    sample.check_caption_edits(args.caption_edits)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sample.check_guidance(args.guidance)
    captions_at = sample.caption_temperature(args.temperature, args.caption_temperature)
    s = sample.Sampler(args.vae, args.gpt, args.bpe, str(runtime.resolve_device(args.device)), "auto", args.batch_size)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    for split in splits:
        results[split] = shapes_metrics(s, split, args.num_objects, args.limit, args.caption_candidates,
                                        args.image_candidates, args.temperature, args.top_k, args.seed, directions,
                                        guidance=args.guidance, caption_temperature=captions_at,
                                        caption_edits=args.caption_edits)
    keys = ["shape", "colour", "size", "position"] + (["relation"] if args.num_objects == 2 else []) + ["exact"]
    print(f"shapes: {args.limit} examples per split, {args.num_objects} object(s); exact = every attribute right; "
          f"candidates {args.caption_candidates} captions / {args.image_candidates} images, "
          f"temperature {args.temperature}"
          + ("" if args.caption_temperature is None else f" (captions {args.caption_temperature})")
          + f", top-k {args.top_k}" + (f", caption edits {args.caption_edits}" if args.caption_edits else ""))
    print(f"  {'split':<8} {'direction':<12} {'rerank':<6} " + " ".join(f"{k:>8}" for k in keys))
    for split in splits:
        for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
            for r in ("none", "self") if d in results[split] else ():
                print(f"  {split:<8} {label:<12} {r:<6} "
                      + " ".join(f"{100 * results[split][d][r][k]:7.1f}%" for k in keys))
    return results


@torch.no_grad()
def shapes_tokens(vae: augvae.AugVAE, split: str, count: int, batch_size: int, device) -> tuple:
    """The first `count` one-object images of a shapes split -> (their AugVAE-SL tokens (N, L),
    the analyzer's per-attribute accuracy on their reconstructions, the examples)."""
    examples = [shapes.shapes_example(i, split, vae.cfg.image_size, 1) for i in range(count)]
    tokens, matches = [], []
    for i in range(0, count, batch_size):
        batch = examples[i:i + batch_size]
        x = torch.stack([data.to_tensor(Image.fromarray(e.image)) for e in batch]).to(device)
        t = vae.encode(x)
        tokens.append(t.flatten(1).cpu().numpy())
        for e, r in zip(batch, data.to_uint8(vae.decode(t).clamp(-1, 1).float())):
            matches.append(shapes.match_attributes(shapes.analyze_image(r, 1), {"objects": e.objects, "relation": None}))
    return np.concatenate(tokens), _mean_matches(matches), examples


def run_shapes_tokens(args) -> dict:
    """Where composition can be lost in the tokenizer: does AugVAE-SL reconstruct unseen
    colour/shape pairs (heldout) as well as seen ones (test), read back by the analyzer? And does
    a reader fitted on seen pairs transfer: a linear probe on each image's bag of codes, fitted on
    training images (seen pairs only, as BiART's captions are), reads each attribute off test and
    heldout images. On heldout, shape far below chance while colour holds means the reader took
    colour as a cue for shape (in the seen pairs colour narrows the shape down), which the codes
    allow; it does not by itself say that a shape's codes depend on its colour."""
    if min(args.limit, args.probe_size) < 1:
        raise ValueError("--limit and --probe-size must be >= 1")
    device = runtime.resolve_device(args.device)
    vae = augvae.load(args.vae, single_level=True).to(device).eval()
    train_tokens, _, train_examples = shapes_tokens(vae, "train", args.probe_size, args.batch_size, device)
    values = {"shape": list(shapes.SHAPES), "colour": sorted(shapes.COLOURS)}
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    print(f"shapes-tokens: {args.vae}, probes fitted on {args.probe_size} training images")
    for split in ("test", "heldout"):
        tokens, recon, examples = shapes_tokens(vae, split, args.limit, args.batch_size, device)
        probe = {attr: metrics.bag_of_codes_probe(
            train_tokens, [vals.index(e.objects[0][attr]) for e in train_examples],
            tokens, [vals.index(e.objects[0][attr]) for e in examples], vae.cfg.codebook_size)
            for attr, vals in values.items()}
        results[split] = {"recon": recon, "probe": probe}
        print(f"  {split:<8} reconstructions read right: " + " ".join(f"{k} {100 * v:.1f}%" for k, v in recon.items())
              + "; linear probe on the codes: " + " ".join(f"{k} {100 * v:.1f}%" for k, v in probe.items()))
    return results


# -----------------------------------------------------------------------------------------
# fashion: Fashion-MNIST in both directions, judged by class. Image -> text: does the caption
# of a test image name its class (data.parse_fashion_caption)? Text -> image: is an image drawn
# from a held-out caption paraphrase of a class classified as that class by an independent CNN
# trained here on the real training images only? Plus a Frechet distance and a diversity
# figure in that CNN's feature space, so that one perfect image per class does not win.

FASHION_CLASSIFIER_KIND = "fashion-classifier"
FASHION_MIN_CLASSIFIER_ACCURACY = 0.90  # below this on the real test images the text->image verdict is void
FASHION_TARGETS = {"caption_accuracy": 0.92, "image_accuracy": 0.94}  # self-reranked; a small CNN on the real images reads ~92%
# the judging CNN, measured on 1 CPU thread: width 16 for 3 epochs 91.4% in 134 s (width 16 x 2 epochs:
# 90.8% in 85 s; width 32 x 2: 91.1-91.3% in about 180 s; width 32 x 1: 89.5%)
FASHION_CLASSIFIER = dict(width=16, features=128, batch_size=128, lr=2e-3, seed=0)


def load_or_train_classifier(path: str, root: str, epochs: int, device: torch.device) -> tuple:
    """The judging CNN from `path` if it was trained on these training files with these settings,
    else trained now on the official training images (never the test ones) and saved there.
    -> (model, whether it was trained now)."""
    settings = {**FASHION_CLASSIFIER, "epochs": epochs}
    train_sha256 = [runtime.sha256_file(p) for p in data.fashion_files(root, "train")]
    if os.path.exists(path):
        ckpt = runtime.load_checkpoint(path, FASHION_CLASSIFIER_KIND)
        if ckpt["config"] == settings and ckpt.get("train_sha256") == train_sha256:
            model = metrics.FashionClassifier(settings["width"], settings["features"])
            model.load_state_dict(ckpt["model"], strict=True)
            return model.to(device).eval(), False
        print(f"fashion: {path} was trained on other images or with other settings; training a new classifier")
    pixels, labels = data.read_fashion_mnist(root, "train")
    bar = None

    def on_step(step, steps):  # the training's progress bar
        nonlocal bar
        if bar is None:
            bar = tqdm(total=steps, desc="classifier", dynamic_ncols=True, leave=False)
        bar.update(1)

    model = metrics.train_fashion_classifier(pixels, labels, epochs, device, **FASHION_CLASSIFIER, on_step=on_step)
    if bar is not None:
        bar.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runtime.save_checkpoint({"kind": FASHION_CLASSIFIER_KIND, "format_version": runtime.CHECKPOINT_FORMAT,
                          "config": settings, "model": model.state_dict(), "train_sha256": train_sha256}, path)
    return model, True




@torch.no_grad()
def fashion_i2t(s: sample.Sampler, pixels: np.ndarray, labels: np.ndarray, candidates: int, kw: dict,
                group: int = 64) -> dict:
    """Caption every image; per rerank mode ('none': the first sample, 'self': the reranked best
    of the same candidates) the class accuracy and the confusion matrix (rows: true class,
    columns: the class the caption names) with, per true class, the captions naming none."""
    n_cls = len(data.FASHION_CLASSES)
    confusion = {r: np.zeros((n_cls, n_cls), dtype=np.int64) for r in ("none", "self")}
    unparsed = {r: np.zeros(n_cls, dtype=np.int64) for r in ("none", "self")}
    examples = []
    for i in tqdm(range(0, len(pixels), group), desc="fashion image->text", leave=False, dynamic_ncols=True):
        x = metrics.fashion_batch(pixels[i:i + group], s.image_size).expand(-1, 3, -1, -1)
        ids = s.vae.encode(x.to(s.device)).flatten(1)  # (B, g*g)
        for j, cands in enumerate(s.caption(ids, candidates, **kw)):
            truth = int(labels[i + j])
            picks = {"none": cands[0][0], "self": cands[sample.best_first([sc for _, sc in cands])[0]][0]}
            for r, caption in picks.items():
                named = data.parse_fashion_caption(caption)
                if named is None:
                    unparsed[r][truth] += 1
                else:
                    confusion[r][truth, named] += 1
            if len(examples) < 10:
                examples.append({"class": data.FASHION_CLASSES[truth], "caption": picks["self"]})
    out = {}
    for r in ("none", "self"):
        per = confusion[r].diagonal() / np.maximum(confusion[r].sum(1) + unparsed[r], 1)
        out[r] = {"accuracy": float(confusion[r].trace() / len(pixels)),
                  "per_class": dict(zip(data.FASHION_CLASSES, per.tolist())),
                  "confusion": confusion[r].tolist(), "no_class": unparsed[r].tolist()}
    return {**out, "images": len(pixels), "examples": examples}


@torch.no_grad()
def fashion_reconstructions(s: sample.Sampler, real: torch.Tensor, group: int = 256) -> torch.Tensor:
    """(N, 1, S, S) images in [-1, 1] -> their AugVAE-SL reconstructions (N, 3, S, S) as saved
    8-bit images in [-1, 1]: what the tokens keep of each, all a caption can be read from."""
    out = []
    for i in range(0, len(real), group):
        ids = s.vae.encode(real[i:i + group].expand(-1, 3, -1, -1).to(s.device)).flatten(1)
        out.append(_unit_8bit(s.decode_images(ids)).cpu() * 2 - 1)
    return torch.cat(out)


def heldout_prompts(s: sample.Sampler, per_class: int) -> tuple:
    """per_class captions of every class, caption k of a class being held-out paraphrase k mod 4
    -> (captions, classes (n,), model text ids (n, text_len)); a ValueError if one does not fit."""
    captions, classes = [], []
    for c in range(len(data.FASHION_CLASSES)):
        for k in range(per_class):
            captions.append(data.fashion_caption(c, data.FASHION_HELDOUT_TEMPLATES[k % len(data.FASHION_HELDOUT_TEMPLATES)]))
            classes.append(c)
    try:
        ids = {c: s.caption_ids(c) for c in dict.fromkeys(captions)}
    except ValueError as e:
        raise ValueError(f"a held-out caption does not fit the BiART ({e}); train it with a larger --text-len") from None
    return captions, torch.tensor(classes), torch.stack([ids[c] for c in captions])


@torch.no_grad()
def fashion_t2i(s: sample.Sampler, text: torch.Tensor, candidates: int, kw: dict, group: int = 16,
                guidance: float = 1.0) -> dict:
    """Draw one image per caption (rows of `text`, model ids) -> {'none': the first sample of
    each, 'self': the self-reranked best of the same candidates}, each (n, 3, S, S) in [-1, 1]
    holding what a saved 8-bit PNG would."""
    picked = {"none": [], "self": []}
    for i in tqdm(range(0, len(text), group), desc="fashion text->image", leave=False, dynamic_ncols=True):
        for ids, scores in s.draw(text[i:i + group], candidates, guidance=guidance, **kw):
            picked["none"].append(ids[0])
            picked["self"].append(ids[sample.best_first(scores.tolist())[0]])
    images = {}
    for r, ids in picked.items():
        ids = torch.stack(ids)
        x = torch.cat([s.decode_images(ids[i:i + 256]) for i in range(0, len(ids), 256)]).cpu()
        images[r] = _unit_8bit(x) * 2 - 1
    return images


def run_fashion(args) -> dict:
    directions = [x for x in args.directions.split(",") if x]
    if not directions or set(directions) - {"i2t", "t2i"}:
        raise ValueError(f"--directions must be i2t, t2i or both, got {args.directions!r}")
    if args.limit < 0 or args.per_class < 2 or args.caption_candidates < 1 or args.image_candidates < 1:
        raise ValueError("--limit must be >= 0, --per-class >= 2, --caption-candidates and --image-candidates >= 1")
    if args.batch_size < 1 or args.classifier_epochs < 1 or args.grid_columns < 1 or args.temperature <= 0:
        raise ValueError("--batch-size, --classifier-epochs and --grid-columns must be >= 1, --temperature > 0")
    sample.check_guidance(args.guidance)
    sample.check_caption_edits(args.caption_edits)
    captions_at = sample.caption_temperature(args.temperature, args.caption_temperature)
    device = runtime.resolve_device(args.device)
    test_pixels, test_labels = data.read_fashion_mnist(args.fashion_root, "test")
    s = sample.Sampler(args.vae, args.gpt, args.bpe, str(device), "auto", args.batch_size)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "targets": FASHION_TARGETS}
    kw = dict(rerank="self", temperature=args.temperature, top_k=args.top_k)
    if "t2i" in directions:  # before minutes of work: the held-out captions must fit the model
        captions, classes, text = heldout_prompts(s, args.per_class)

    # the judge first: an independent CNN, trained on the real training images only
    t0 = time.time()
    clf, trained = load_or_train_classifier(args.classifier, args.fashion_root, args.classifier_epochs, device)
    real = metrics.fashion_batch(test_pixels, s.image_size)  # (N, 1, S, S): the real images at the models' size
    real_preds, real_feats = metrics.classify(clf, real.to(device))
    clf_acc = float((real_preds.numpy() == test_labels).mean())
    void = clf_acc < FASHION_MIN_CLASSIFIER_ACCURACY
    results["classifier"] = {"test_accuracy": clf_acc, "void": void, "path": os.path.abspath(args.classifier),
                             "trained_now": trained, "seconds": time.time() - t0}
    print(f"fashion: judging classifier ({'trained now on' if trained else 'loaded; trained on'} the "
          f"{len(data.read_fashion_mnist(args.fashion_root, 'train')[0])} real training images only): "
          f"{100 * clf_acc:.1f}% on the {len(test_labels)} real test images"
          + (f" -- below {100 * FASHION_MIN_CLASSIFIER_ACCURACY:.0f}%: its text->image verdict is VOID" if void else ""))

    names = [n[:6] for n in data.FASHION_CLASSES]
    if "i2t" in directions:
        t0 = time.time()
        n = args.limit or len(test_pixels)
        recon_preds, _ = metrics.classify(clf, fashion_reconstructions(s, real[:n]).to(device))
        results["classifier"]["reconstructions_accuracy"] = float((recon_preds.numpy() == test_labels[:n]).mean())
        print(f"fashion: the judge reads {100 * results['classifier']['reconstructions_accuracy']:.1f}% of the "
              f"AugVAE-SL reconstructions of the first {n} test images right (what the tokens keep of the class)")
        g = torch.Generator(device=s.device).manual_seed(args.seed)
        res = fashion_i2t(s, test_pixels[:n], test_labels[:n], args.caption_candidates,
                          {**kw, "temperature": captions_at, "generator": g, "edits": args.caption_edits},
                          max(1, args.batch_size // args.caption_candidates))
        res["seconds"] = time.time() - t0
        results["i2t"] = res
        print(f"image->text: {n} test images, {args.caption_candidates} captions sampled each "
              f"(temperature {captions_at}, top-k {args.top_k}); accuracy = the caption names the image's class")
        for r in ("none", "self"):
            print(f"  rerank {r:<4}  accuracy {100 * res[r]['accuracy']:5.1f}%"
                  + (f"  (target {100 * FASHION_TARGETS['caption_accuracy']:.0f}%)" if r == "self" else ""))
        print("  confusion matrix, self-reranked (rows: true class; columns: the class the caption names; "
              "'-': no class, or two)")
        print("  " + " " * 12 + " ".join(f"{x:>6}" for x in names + ["-"]))
        for c, row in enumerate(res["self"]["confusion"]):
            print(f"  {data.FASHION_CLASSES[c]:<12}" + " ".join(f"{v:6d}" for v in row + [res["self"]["no_class"][c]]))
    if "t2i" in directions:
        t0 = time.time()
        g = torch.Generator(device=s.device).manual_seed(args.seed)
        images = fashion_t2i(s, text, args.image_candidates, {**kw, "generator": g},
                             max(1, args.batch_size // args.image_candidates), args.guidance)
        res = {"per_class_images": args.per_class, "captions": sorted(set(captions)), "void": void}
        for r, x in images.items():
            preds, feats = metrics.classify(clf, x.to(device))
            res[r] = metrics.fashion_image_metrics(preds, feats, classes, real_feats, torch.from_numpy(test_labels))
        res["seconds"] = time.time() - t0
        results["t2i"] = res
        os.makedirs(args.out, exist_ok=True)
        k = args.grid_columns
        for r, x in images.items():
            data.save_grid([x[classes == c][:k] for c in range(len(names))], os.path.join(args.out, f"t2i_{r}.png"))
        real3 = real.expand(-1, 3, -1, -1)
        data.save_grid([real3[torch.from_numpy(test_labels == c)][:k] for c in range(len(names))],
                       os.path.join(args.out, "real.png"))
        print(f"text->image: {args.per_class} images per class from {len(data.FASHION_HELDOUT_TEMPLATES)} held-out "
              f"paraphrases, best of {args.image_candidates}; judged by the classifier"
              + (" (VOID: the classifier is below 90%)" if void else "")
              + f"; FD and diversity in its {real_feats.shape[1]}-d features against the {len(test_labels)} "
              f"real test images; grids in {args.out}")
        for r in ("none", "self"):
            m = res[r]
            print(f"  rerank {r:<4}  class accuracy {100 * m['accuracy']:5.1f}%  FD {m['fd']:8.2f}  "
                  f"diversity {m['diversity']:.2f}"
                  + (f"  (target {100 * FASHION_TARGETS['image_accuracy']:.0f}%)" if r == "self" else ""))
        print(f"  per class, self-reranked: {'accuracy':>9} {'FD':>8} {'diversity':>9}")
        for name, m in res["self"]["per_class"].items():
            print(f"  {name:<24} {100 * m['accuracy']:8.1f}% {m['fd']:8.2f} {m['diversity']:9.2f}")
    met = {}
    if "i2t" in results:
        met["caption_accuracy"] = results["i2t"]["self"]["accuracy"] >= FASHION_TARGETS["caption_accuracy"]
    if "t2i" in results:
        met["image_accuracy"] = not void and results["t2i"]["self"]["accuracy"] >= FASHION_TARGETS["image_accuracy"]
    results["targets_met"] = met
    return results


# -----------------------------------------------------------------------------------------
# subcommands: name -> (its flags, run it -> results dict, one-line help). A new one is a
# X_FLAGS dict (with json_flags) + run_X(args) pair registered here, positionals in POSITIONALS.

SUBCOMMANDS = {
    "recon": (RECON_FLAGS, run_recon, "AugVAE reconstruction: PSNR, SSIM, LPIPS, rFID, codebook usage "
                                      "(Tables 1 and 4)"),
    "fid": (FID_FLAGS, run_fid, "FID-k between two image folders, both blurred with radius k (Table 3)"),
    "caption-metrics": (CAPTION_METRICS_FLAGS, run_caption_metrics,
                        "BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE of captions against references (Table 2)"),
    "captions": (CAPTIONS_FLAGS, run_captions,
                 "caption a dataset's images with BiART, then the caption metrics against its references (Table 2)"),
    "t2i": (T2I_FLAGS, run_t2i, "draw a dataset's captions with BiART, then FID-k against its images (Table 3)"),
    "shapes": (SHAPES_FLAGS, run_shapes, "built-in shapes: exact attribute accuracy of captions and drawn images, "
                                         "with and without self-reranking"),
    "shapes-tokens": (SHAPES_TOKENS_FLAGS, run_shapes_tokens,
                      "built-in shapes: AugVAE-SL reconstructions of seen and unseen colour/shape pairs read "
                      "back by the analyzer, and linear probes of shape and colour on the codes"),
    "fashion": (FASHION_FLAGS, run_fashion, "Fashion-MNIST: class accuracy of the test images' captions and of "
                                            "images drawn from held-out captions (judged by a CNN trained here), "
                                            "Frechet distance and diversity, with and without self-reranking"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = runtime.ArgumentParser(prog="evaluate.py",
                                    description="Evaluate L-Verse: reconstruction, FID-k and captioning metrics.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (flags, _, text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        for arg, arg_help in POSITIONALS.get(name, {}).items():
            p.add_argument(arg, help=arg_help)
        runtime.add_flags(p, flags)
    return parser


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    results = SUBCOMMANDS[args.command][1](args)
    runtime.write_json(args.json, results)
    print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    runtime.run_cli(main, "evaluate.py")
