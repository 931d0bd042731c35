"""
Sample from a trained L-Verse: caption images (image -> text) and draw captions (text -> image)
with one BiART, no fine-tuning (paper section 3.6).

    python sample.py --image photo.jpg                    # print the best caption
    python sample.py --image photo.jpg --show-all         # ... and every candidate with its score
    python sample.py --text "A large red circle on the left."   # draw it: OUT/t2i_0000_0.png, OUT/t2i_grid.png
    python sample.py --images photos/ --texts captions.txt --out out/samples   # batch, one model load

Image -> text: the photo (any size, mode or EXIF rotation) is resized and centre-cropped to the
AugVAE's resolution, encoded to tokens, and BiART samples --num-candidates captions of
--caption-len tokens; each is cut at its first full stop (section 3.6) and the candidates are
reranked. Text -> image: BiART samples --num-candidates token grids with the KV cache, they are
reranked, the best --keep are decoded by AugVAE in fp32 and saved as PNGs, plus a grid with the
captions above their images.

Reranking (--rerank): the paper reranks with CLIP. BiART reads both orders, so by default
('self') it scores each candidate itself: a drawn image by the other direction's likelihood
log p(caption | image), a caption by both directions' log p(image tokens | caption) +
log p(caption | image). --caption-edits then tries one-token changes of the best caption, the
image->text side's likeliest other tokens at each place, and keeps those that raise that
score: a word sampling seldom proposes (the shape of a colour/shape pair never captioned in
training) is found where the image->text side ranks it second or third. 'clip' uses a local CLIP
TorchScript file (OpenAI's released ViT-B-32.pt and friends are such files) given with
--clip-model: cosine similarity of CLIP's image and text embeddings; 'none' keeps the order
of sampling (the first candidate wins).

Every run writes OUT/results.jsonl: one line per input with the candidates, their scores and
the output paths. A bad input (unreadable image, empty or too long caption) is a one-line error
and exit status 2; in batch mode it is reported, skipped, and the rest is processed (exit
status 1 at the end if anything was skipped). The same --seed gives the same output for an
input, alone or in a batch (each input gets its own generator seeded with --seed).
"""

import argparse
import json
import os
import re
import sys

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import augvae
import biart
import data
import runtime
import tokenizer

GPT_KIND = "biart"  # train_gpt.CHECKPOINT_KIND (not imported: a script)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's input normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT = 77  # CLIP's text length: start, BPE ids, end, zeros
RERANKERS = ("self", "clip", "none")
CAPTION_EDITS_HELP = ("rounds of one-token edits of the best caption (0: off; needs the 'self' reranker): at each "
                      "place the image->text side's two likeliest other tokens are tried, and an edit is kept when "
                      "it raises log p(image | caption) + log p(caption | image); it finds words that sampling "
                      "seldom proposes, such as the shape of a colour/shape pair never captioned in training")
EDIT_ALTERNATIVES = 2  # tokens tried at each place of a caption per edit round (Sampler._edit)
GUIDANCE_HELP = ("text->image guidance scale: each image token samples from uncond + S x (cond - uncond) "
                 "logits, uncond being BiART's own unconditional image model (its image->text order); "
                 "1: plain conditional sampling (the paper), > 1 follows the caption more closely")

FLAGS = dict(  # name: (default, help); each is the flag --name (underscores become dashes)
    image=("", "an image file to caption (JPEG, PNG, WebP, ...; any size, mode and EXIF rotation)"),
    text=("", "a caption to draw"),
    images=("", "a folder: caption every image file in it (sorted by name; unreadable files are skipped)"),
    texts=("", "a text file: draw the caption on each non-empty line"),
    vae=("out/vae_sl/best.pt", "the AugVAE-SL checkpoint (train_vae.py --sl writes out/vae_sl/best.pt)"),
    gpt=("out/gpt/ckpt.pt", "the BiART checkpoint (train_gpt.py writes out/gpt/ckpt.pt)"),
    bpe=(None, "the tokenizer merges file (default: the file the BiART checkpoint was trained with, checked by sha256)",
         str),
    out=("out/samples", "output folder: results.jsonl, drawn images and grids"),
    num_candidates=(None, "candidates sampled per input (default: 64 per caption, the paper's, and 16 per image)", int),
    keep=(1, "text -> image: how many of the reranked images to keep per caption"),
    rerank=("self", "'self' (BiART scores each candidate: an image by log p(caption | image), a caption by "
                    "log p(image | caption) + log p(caption | image)), 'clip' (needs --clip-model) or 'none' "
           "(keep the first sample)"),
    clip_model=("", "a CLIP TorchScript file for --rerank clip (OpenAI's released ViT-B-32.pt, ViT-L-14.pt, ...)"),
    temperature=(1.0, "sampling temperature (lower: more conservative)"),
    caption_temperature=(None, "image -> text sampling temperature (default: --temperature)", float),
    top_k=(0, "sample from the k most likely tokens of the target modality (0: no limit)"),
    top_p=(0.0, "nucleus sampling threshold in (0, 1] (0: off)"),
    guidance=(1.0, GUIDANCE_HELP),
    caption_edits=(0, CAPTION_EDITS_HELP),
    caption_len=(32, "tokens sampled per caption (at most the model's text length); each is cut at its first full stop"),
    show_all=(False, "print every candidate with its score"),
    seed=(0, "random seed: the same seed gives the same output for an input"),
    batch_size=(64, "candidate sequences per forward pass"),
    device=("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"),
    dtype=("auto", "BiART's autocast dtype ('auto': bf16 on a GPU that has it, fp32 on CPU; bfloat16 also autocasts "
          "on CPU; float16 is CUDA only); the AugVAE always runs fp32"),
)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = runtime.ArgumentParser(description="Caption images and draw captions with a trained L-Verse "
                                        "(AugVAE-SL + BiART), reranking the candidates.",
                            argument_default=argparse.SUPPRESS if suppress else None)
    runtime.add_flags(p, FLAGS, suppress)
    return p


# -----------------------------------------------------------------------------------------
# text helpers

def tidy_caption(text: str) -> str:
    """Decoded BPE text ('a red circle . ') -> 'a red circle.': no space before punctuation."""
    return re.sub(r"\s+([.,!?;:'])", r"\1", text).strip()


def cut_at_full_stop(text: str) -> str:
    """Keep a sampled caption up to and including its first full stop (paper section 3.6)."""
    i = text.find(".")
    return text if i < 0 else text[:i + 1]


# -----------------------------------------------------------------------------------------
# the two stages and the tokenizer, loaded once

class Sampler:
    """AugVAE-SL + BiART + tokenizer, checked against each other. Methods take batches."""

    def __init__(self, vae_path: str, gpt_path: str, bpe: str = "", device: str = "auto",
                 dtype: str = "auto", batch_size: int = 64):
        self.device = runtime.resolve_device(device)
        self.ctx = runtime.autocast_context(self.device, dtype)[0]
        self.batch_size = batch_size
        ckpt = runtime.load_checkpoint(gpt_path, GPT_KIND)
        self.gpt = biart.from_checkpoint(ckpt).to(self.device).eval()
        self.config = self.gpt.config
        self.tok = self._load_tokenizer(ckpt.get("tokenizer", {}), bpe, gpt_path)

        self.vae = augvae.load(vae_path, single_level=True, flag="--vae").to(self.device)
        vcfg = self.vae.cfg
        grid = vcfg.grid(vcfg.token_levels[0])
        if vcfg.codebook_size != self.config.image_vocab or grid * grid != self.config.image_len:
            raise ValueError(f"--vae {vae_path}: makes {grid}x{grid} tokens from {vcfg.codebook_size} codes, "
                             f"but --gpt {gpt_path} was trained on {self.config.image_len} tokens from "
                             f"{self.config.image_vocab} codes: not the VAE its tokens came from")
        self.grid, self.image_size = grid, vcfg.image_size
        trained_with = ckpt.get("tokens_meta", {}).get("vae_sha256")
        self.vae_matches = trained_with is None or trained_with == runtime.sha256_file(vae_path)
        self.clip = None

    def _load_tokenizer(self, info: dict, bpe: str, gpt_path: str) -> tokenizer.Tokenizer:
        want = info.get("sha256")
        if bpe:
            path = bpe
        else:  # the recorded path, or CLIP's shipped file when that is what was used
            path = info.get("path", "")
            if not os.path.isfile(path) and want == runtime.sha256_file(tokenizer.default_bpe_path()):
                path = tokenizer.default_bpe_path()
            if not os.path.isfile(path):
                raise ValueError(f"--gpt {gpt_path}: was trained with the tokenizer {path or '(unrecorded)'}, "
                                 f"which is not here; pass it with --bpe")
        if not os.path.isfile(path):
            raise ValueError(f"--bpe {path}: no such file")
        if want is not None and runtime.sha256_file(path) != want:
            raise ValueError(f"tokenizer {path}: is not the one --gpt {gpt_path} was trained with (sha256 differs)")
        tok = tokenizer.Tokenizer(path)
        if tok.vocab_size != self.config.text_vocab or tok.eot_id != self.config.eot_id - self.config.text_offset:
            raise ValueError(f"tokenizer {path}: {tok.vocab_size} ids do not fit --gpt {gpt_path} "
                             f"({self.config.text_vocab} text ids)")
        return tok

    def load_clip(self, path: str) -> None:
        """A CLIP TorchScript archive with encode_image / encode_text (OpenAI's release format)."""
        if not path:
            raise ValueError("--rerank clip needs --clip-model: a CLIP TorchScript file such as OpenAI's ViT-B-32.pt")
        if not os.path.isfile(path):
            raise ValueError(f"--clip-model {path}: no such file")
        try:
            model = torch.jit.load(path, map_location=self.device)
        except Exception as e:  # TorchScript raises RuntimeError and friends for non-archives
            raise ValueError(f"--clip-model {path}: not a CLIP TorchScript file ({runtime.first_line(e)[:200]})") from None
        for name in ("encode_image", "encode_text", "input_resolution"):
            if not hasattr(model, name):
                raise ValueError(f"--clip-model {path}: has no {name}; not a CLIP TorchScript model")
        self.clip = model.float().eval()
        self.clip_size = int(model.input_resolution)
        self.clip_tok = tokenizer.Tokenizer()  # CLIP's own vocabulary, whatever BiART was trained with

    # --- conversions ---
    def caption_ids(self, caption: str) -> torch.Tensor:
        """A caption -> (text_len,) model ids; ValueError if it is empty or too long."""
        if not caption.strip():
            raise ValueError("the caption is empty")
        ids = self.tok.encode(caption)
        if not ids:
            raise ValueError(f"the caption {caption[:40]!r} has no tokens")
        return biart.caption_to_model(ids, self.config)

    def view(self, img: Image.Image) -> Image.Image:
        """A loaded RGB image -> the square crop at the VAE's resolution that the model sees."""
        return data.center_crop_resize(img, self.image_size)

    @torch.no_grad()
    def encode_images(self, views: list) -> torch.Tensor:
        """Views (PIL, image_size square) -> (B, image_len) image ids."""
        x = torch.stack([data.to_tensor(v) for v in views]).to(self.device)
        return self.vae.encode(x).flatten(1)  # (B, g*g)

    @torch.no_grad()
    def decode_images(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, image_len) image ids -> (B, 3, S, S) images in [-1, 1], AugVAE in fp32."""
        return self.vae.decode(ids.view(-1, self.grid, self.grid).to(self.device)).clamp(-1, 1).float()

    # --- batched BiART calls ---
    def _generate(self, cond: torch.Tensor, direction: str, n: int, length: int | None, temperature: float,
                  top_k: int, top_p: float, generator: torch.Generator | None, guidance: float = 1.0) -> torch.Tensor:
        """n samples per row of cond, at most batch_size sequences per call -> (B * n, length)."""
        outs = []
        per_call = max(1, self.batch_size // n)  # conditions per call when n fits a batch
        for i in range(0, cond.size(0), per_call):
            c = cond[i:i + per_call].to(self.device)
            if n <= self.batch_size:
                chunks = [(c, n)]
            else:  # one condition, its samples in chunks
                chunks = [(c, min(self.batch_size, n - j)) for j in range(0, n, self.batch_size)]
            for cc, m in chunks:
                with self.ctx:
                    outs.append(self.gpt.generate(cc, direction, num_samples=m, length=length,
                                                  temperature=temperature, top_k=top_k or None,
                                                  top_p=top_p or None, generator=generator, guidance=guidance))
        return torch.cat(outs)

    @torch.no_grad()
    def _score(self, cond: torch.Tensor, target: torch.Tensor, direction: str) -> torch.Tensor:
        """log p(target | cond) per row (a side with one row is broadcast), batch_size rows per call."""
        B = max(cond.size(0), target.size(0))
        out = []
        for i in range(0, B, self.batch_size):
            c = cond if cond.size(0) == 1 else cond[i:i + self.batch_size]
            t = target if target.size(0) == 1 else target[i:i + self.batch_size]
            with self.ctx:
                out.append(self.gpt.score(c.to(self.device), t.to(self.device), direction).float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def _clip_scores(self, images: torch.Tensor, captions: list) -> torch.Tensor:
        """Cosine similarity x 100 of CLIP embeddings, (len(images) or len(captions),) one side broadcast."""
        x = (images.float().to(self.device) + 1) / 2  # [-1, 1] -> [0, 1]
        x = torch.nn.functional.interpolate(x, size=(self.clip_size, self.clip_size), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        tokens = torch.zeros(len(captions), CLIP_CONTEXT, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [self.clip_tok.sot_id] + self.clip_tok.encode(c)[:CLIP_CONTEXT - 2] + [self.clip_tok.eot_id]
            tokens[i, :len(ids)] = torch.tensor(ids)
        im = self.clip.encode_image((x - mean) / std).float()
        tx = self.clip.encode_text(tokens.to(self.device)).float()
        im = im / im.norm(dim=-1, keepdim=True)
        tx = tx / tx.norm(dim=-1, keepdim=True)
        return (100 * (im * tx).sum(-1)).cpu()

    @torch.no_grad()
    def _pair_scores(self, text: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """log p(image | caption) + log p(caption | image) per row, both of BiART's readings of
        the pair (a side with one row is broadcast)."""
        return self._score(text, image_ids, "t2i") + self._score(image_ids, text, "i2t")

    @torch.no_grad()
    def _edit(self, text: torch.Tensor, image_ids: torch.Tensor, score: float) -> tuple:
        """One round of one-token edits of one caption: (1, text_len) model ids, its image (1,
        image_len) and pair score -> the best of the caption and every caption that differs from
        it at one place, there taking one of the EDIT_ALTERNATIVES tokens image->text finds most
        likely after the caption's own prefix (never its own token, never end-of-text), by
        _pair_scores: (caption, score)."""
        c = self.config
        places = int((text[0] != c.pad_id).sum()) - 1  # the caption's tokens before its end-of-text
        if places < 1:
            return text, score
        with self.ctx:
            logits = self.gpt.text_logits(image_ids.to(self.device), text.to(self.device))[0].float().cpu()
        logits[:, c.eot_id - c.text_offset] = -float("inf")
        own = (text[0, :places] - c.text_offset)[:, None]
        alt = logits[:places].scatter(1, own, -float("inf")).topk(EDIT_ALTERNATIVES, dim=1).indices  # (places, m)
        variants = text.repeat(places * EDIT_ALTERNATIVES, 1)
        rows = torch.arange(variants.size(0))
        variants[rows, rows // EDIT_ALTERNATIVES] = alt.flatten() + c.text_offset
        scores = self._pair_scores(variants, image_ids)
        k = int(scores.argmax())
        return (variants[k:k + 1], float(scores[k])) if scores[k] > score else (text, score)

    def _edited(self, text: torch.Tensor, image_ids: torch.Tensor, score: float, rounds: int) -> str:
        """Up to `rounds` rounds of _edit, stopping at the first that changes nothing -> the caption."""
        for _ in range(rounds):
            edited, score = self._edit(text, image_ids, score)
            if edited is text:
                break
            text = edited
        return cut_at_full_stop(tidy_caption(self.tok.decode(biart.text_from_model(text, self.config)[0])))

    # --- the two directions ---
    @torch.no_grad()
    def caption(self, image_ids: torch.Tensor, n: int, rerank: str = "self", caption_len: int = 32,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None, views: list | None = None, edits: int = 0) -> list:
        """(B, image_len) image ids -> per image, its candidates [(caption, score)] in sampling
        order, each cut at its first full stop, duplicates dropped. The score is
        log p(image | caption) + log p(caption | image) for 'self', CLIP similarity (needs
        `views`) for 'clip', None for 'none' and for a caption with no tokens. edits ('self'
        only): up to that many rounds of one-token edits (_edit) of the best candidate, the
        result, where it is new, one more candidate at the end. best_first() ranks them."""
        check_caption_edits(edits, rerank)
        length = min(caption_len, self.config.text_len)
        gen = self._generate(image_ids, "i2t", n, length, temperature, top_k, top_p, generator)
        texts = [cut_at_full_stop(tidy_caption(self.tok.decode(r))) for r in biart.text_from_model(gen, self.config)]
        results = []
        for b in range(image_ids.size(0)):
            unique = list(dict.fromkeys(texts[b * n:(b + 1) * n]))  # sampling order, duplicates dropped
            scorable = [c for c in unique if self.tok.encode(c)]
            scores = {}
            if rerank == "self" and scorable:
                image = image_ids[b:b + 1]
                text = torch.stack([self._model_text(c) for c in scorable])
                pair = self._pair_scores(text, image)
                scores = dict(zip(scorable, pair.tolist()))
                if edits:
                    edited = self._edited(text[int(pair.argmax())][None], image, float(pair.max()), edits)
                    if edited not in scores and self.tok.encode(edited):  # scored as it reads, after the cut
                        scores[edited] = float(self._pair_scores(self._model_text(edited)[None], image)[0])
                        unique.append(edited)
            elif rerank == "clip" and scorable:
                scores = dict(zip(scorable, self._clip_scores(data.to_tensor(views[b])[None], scorable).tolist()))
            results.append([(c, scores.get(c)) for c in unique])
        return results

    def _model_text(self, caption: str) -> torch.Tensor:
        """A sampled caption -> (text_len,) model ids, cut to the model's text length."""
        return biart.caption_to_model(self.tok.encode(caption), self.config, truncate=True)

    @torch.no_grad()
    def draw(self, text: torch.Tensor, n: int, rerank: str = "self", temperature: float = 1.0, top_k: int = 0,
             top_p: float = 0.0, generator: torch.Generator | None = None, captions: list | None = None,
             guidance: float = 1.0) -> list:
        """(B, text_len) model text ids -> per caption, (image ids (n, image_len), scores (n,) or
        None) in sampling order. 'self' scores log p(caption | image); 'clip' decodes every
        candidate and needs the caption strings; 'none' gives no scores. guidance != 1 guides
        the sampling against BiART's unconditional image model (biart.py: Guidance)."""
        gen = self._generate(text, "t2i", n, None, temperature, top_k, top_p, generator, guidance)
        results = []
        for b in range(text.size(0)):
            ids = gen[b * n:(b + 1) * n]
            scores = None
            if rerank == "self":
                scores = self._score(ids, text[b:b + 1], "i2t")
            elif rerank == "clip":
                images = torch.cat([self.decode_images(ids[i:i + self.batch_size])
                                    for i in range(0, n, self.batch_size)])
                scores = self._clip_scores(images, [captions[b]])
            results.append((ids, scores))
        return results


def best_first(scores: list) -> list:
    """Candidate order after reranking: highest score first, unscored ones last, ties (and
    'none', all unscored) in sampling order."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0)))


# -----------------------------------------------------------------------------------------
# output

def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_captioned_grid(rows: list, path: str, width_chars: int = 0) -> None:
    """rows: [(caption, (N, 3, S, S) images in [-1, 1])] -> a PNG, each caption above its images."""
    font = _font()
    size = rows[0][1].shape[-1]
    cols = max(r[1].shape[0] for r in rows)
    pad, line_h = 4, 14
    width = pad + cols * (size + pad)
    chars = width_chars or max(8, (width - 2 * pad) // 6)
    width = max(width, 2 * pad + 6 * chars if width_chars else width)
    blocks = []
    for caption, images in rows:
        lines = _wrap(caption, chars)
        blocks.append((lines, data.to_uint8(images)))
    height = pad + sum(len(lines) * line_h + size + 2 * pad for lines, _ in blocks)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for lines, ims in blocks:
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        for j, im in enumerate(ims):
            canvas.paste(Image.fromarray(im, "RGB"), (pad + j * (size + pad), y))
        y += size + 2 * pad
    _save_png(canvas, path)


def _wrap(text: str, chars: int) -> list:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > chars:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return (lines + [cur]) if cur else [""]


def _save_png(img: Image.Image, path: str) -> None:
    runtime.write_atomic(path, lambda f: img.save(f, format="PNG"))


# -----------------------------------------------------------------------------------------

def list_inputs(cfg: dict) -> list:
    """-> [(kind, value)] with kind 'image' (a path) or 'text' (a caption), in the order given."""
    items = []
    if cfg["image"]:
        items.append(("image", cfg["image"]))
    if cfg["images"]:
        if not os.path.isdir(cfg["images"]):
            raise ValueError(f"--images {cfg['images']}: not a folder")
        names = sorted(n for n in os.listdir(cfg["images"]) if not n.startswith(".")
                       and os.path.isfile(os.path.join(cfg["images"], n)))
        items += [("image", os.path.join(cfg["images"], n)) for n in names]
    if cfg["text"] or "text" in cfg["_given"]:
        items.append(("text", cfg["text"]))
    if cfg["texts"]:
        if not os.path.isfile(cfg["texts"]):
            raise ValueError(f"--texts {cfg['texts']}: no such file")
        with open(cfg["texts"], encoding="utf-8", errors="replace") as f:
            items += [("text", line.strip()) for line in f if line.strip()]
    if not items:
        raise ValueError("nothing to do: give --image, --images, --text or --texts")
    return items


def check_settings(cfg: dict) -> None:
    if cfg["rerank"] not in RERANKERS:
        raise ValueError(f"--rerank must be one of {', '.join(RERANKERS)}, got {cfg['rerank']!r}")
    if (cfg["num_candidates"] or 1) < 1 or cfg["keep"] < 1 or cfg["batch_size"] < 1 or cfg["caption_len"] < 1:
        raise ValueError("--num-candidates, --keep, --batch-size and --caption-len must be >= 1")
    if not cfg["temperature"] > 0 or cfg["top_k"] < 0 or not 0 <= cfg["top_p"] <= 1:
        raise ValueError("--temperature must be > 0, --top-k >= 0 and --top-p in [0, 1]")
    caption_temperature(cfg["temperature"], cfg["caption_temperature"])
    check_caption_edits(cfg["caption_edits"], cfg["rerank"])
    check_guidance(cfg["guidance"])


def caption_temperature(temperature: float, caption_temperature: float | None) -> float:
    """The image -> text sampling temperature: caption_temperature, or temperature where it is None; > 0."""
    t, flag = (temperature, "--temperature") if caption_temperature is None else (caption_temperature,
                                                                                  "--caption-temperature")
    if not t > 0:  # NaN too
        raise ValueError(f"{flag} must be > 0, got {t}")
    return t


def check_caption_edits(edits: int, rerank: str = "self") -> None:
    if edits < 0:
        raise ValueError(f"--caption-edits must be >= 0, got {edits}")
    if edits and rerank != "self":
        raise ValueError(f"--caption-edits needs --rerank self (edits raise BiART's own score), got --rerank {rerank}")


def check_guidance(guidance: float) -> None:
    if not guidance >= 0:  # NaN too
        raise ValueError(f"--guidance must be >= 0 (1: off), got {guidance}")


def main(argv: list | None = None) -> list:
    cfg = runtime.parse_flags(build_parser, sys.argv[1:] if argv is None else argv)
    check_settings(cfg)
    items = list_inputs(cfg)
    batch = bool(cfg["images"] or cfg["texts"]) or len(items) > 1
    sampler = Sampler(cfg["vae"], cfg["gpt"], cfg["bpe"] or "", cfg["device"], cfg["dtype"], cfg["batch_size"])
    if not sampler.vae_matches:
        print(f"sample.py: warning: --vae {cfg['vae']} is not the VAE whose tokens --gpt was trained on "
              f"(sha256 differs); samples will be wrong unless it is a copy with other metadata", file=sys.stderr)
    if cfg["rerank"] == "clip":
        sampler.load_clip(cfg["clip_model"])
    if cfg["num_candidates"] is not None and cfg["keep"] > cfg["num_candidates"]:
        raise ValueError(f"--keep {cfg['keep']} is more than --num-candidates {cfg['num_candidates']}")
    os.makedirs(cfg["out"], exist_ok=True)
    rows, i2t_rows, t2i_rows, skipped = [], [], [], []
    sample_kw = dict(rerank=cfg["rerank"], temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"])
    caption_kw = {**sample_kw, "temperature": caption_temperature(cfg["temperature"], cfg["caption_temperature"]),
                  "edits": cfg["caption_edits"]}
    for k, (kind, value) in enumerate(tqdm(items, desc="sampling", disable=not batch, dynamic_ncols=True)):
        g = torch.Generator(device=sampler.device).manual_seed(cfg["seed"])
        try:
            if kind == "image":
                view = sampler.view(data.load_image(value))
                n = cfg["num_candidates"] or 16
                cands = sampler.caption(sampler.encode_images([view]), n, caption_len=cfg["caption_len"],
                                        generator=g, views=[view], **caption_kw)[0]
                cands = [cands[j] for j in best_first([sc for _, sc in cands])]
                best = cands[0][0]
                rows.append({"input": value, "direction": "i2t", "caption": best,
                             "candidates": [{"caption": c, "score": s} for c, s in cands]})
                i2t_rows.append((f"{os.path.basename(value)}: {best}", data.to_tensor(view)[None]))
                tqdm.write(f"{value}: {best}" if batch else best)
                if cfg["show_all"]:
                    for c, s in cands:
                        tqdm.write(f"    {'-' if s is None else f'{s:9.2f}'}  {c}")
            else:
                text = sampler.caption_ids(value)[None]
                n = cfg["num_candidates"] or 64
                ids, scores = sampler.draw(text, n, generator=g, captions=[value], guidance=cfg["guidance"],
                                           **sample_kw)[0]
                if scores is not None:
                    order = best_first(scores.tolist())
                    ids, scores = ids[order], scores[order]
                kept = ids[:cfg["keep"]]
                images = sampler.decode_images(kept)
                paths = []
                for j, im in enumerate(data.to_uint8(images)):
                    paths.append(os.path.join(cfg["out"], f"t2i_{k:04d}_{j}.png"))
                    _save_png(Image.fromarray(im, "RGB"), paths[-1])
                score_list = None if scores is None else scores.tolist()
                rows.append({"input": value, "direction": "t2i", "outputs": paths,
                             "candidates": [{"rank": j, "score": None if score_list is None else score_list[j],
                                             "output": paths[j] if j < len(paths) else None}
                                            for j in range(ids.size(0))]})
                t2i_rows.append((value, images.cpu()))
                tqdm.write(f"{value!r}: {', '.join(paths)}")
                if cfg["show_all"] and score_list is not None:
                    tqdm.write("    scores: " + " ".join(f"{s:.2f}" for s in score_list))
        except (ValueError, data.ImageError) as e:
            if not batch:
                raise
            skipped.append(value)
            rows.append({"input": value, "direction": "i2t" if kind == "image" else "t2i", "error": str(e)})
            tqdm.write(f"sample.py: skipped {value[:80]!r}: {e}", file=sys.stderr)
    runtime.write_text(os.path.join(cfg["out"], "results.jsonl"),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if t2i_rows:
        save_captioned_grid(t2i_rows, os.path.join(cfg["out"], "t2i_grid.png"))
    if i2t_rows:
        save_captioned_grid(i2t_rows, os.path.join(cfg["out"], "i2t_grid.png"), width_chars=60)
    if batch:
        print(f"{len(items) - len(skipped)} of {len(items)} inputs done, results in "
              f"{os.path.join(cfg['out'], 'results.jsonl')}" + (f"; {len(skipped)} skipped" if skipped else ""))
    if skipped:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    runtime.run_cli(main, "sample.py")
