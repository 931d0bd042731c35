"""
BiART, the bidirectional auto-regressive transformer of L-Verse (CVPR 2022, section 3.4,
appendix B): a minGPT-style decoder-only transformer that reads a caption and an image in
either order and tells the condition from the target with a learned segment embedding.

Vocabulary (appendix B; every boundary is derived from BiARTConfig, never hard-coded):
    [0, image_vocab)                          image tokens (AugVAE-SL codes)
    [image_vocab, image_vocab + text_vocab)   text tokens (raw BPE id t -> image_vocab + t)
    pad_id = image_vocab + text_vocab         [PAD]
    soc_id = pad_id + 1                       [SOC] start of caption
    soi_id = pad_id + 2                       [SOI] start of image
At paper scale: image 0..8191, text 8192..57599, [PAD] 57600, [SOC] 57601, [SOI] 57602.

Sequences (block_size = text_len + image_len + 2 tokens; the model is fed the first
block_size - 1 and predicts the next token at each position):
    't2i' (text -> image):  [SOC] text [SOI] image     segments: REF*(1+text_len)  GEN*(1+image_len)
    'i2t' (image -> text):  [SOI] image [SOC] text     segments: REF*(1+image_len) GEN*(1+text_len)
A start token belongs to the part it opens: the first one carries [REF], the second [GEN]
(it is the first token the model sees in "generation mode", and the one that predicts the
first target token).

Padding policy: a text part is the caption's ids, then exactly one end-of-text token, then
[PAD]s up to text_len (a caption that fills all text_len slots may omit the end-of-text:
it was truncated). Targets that are [PAD] are ignored by the loss; the end-of-text target IS
predicted, so a sampled caption ends by itself at end-of-text and the rest of its row is
filled with [PAD]. [PAD] inputs are attended like any other token (no attention mask beyond
causality); with learned positions they are just a deterministic suffix of the caption.
The second start token is never a target: given the direction it is known, so the position
that would predict it (the last condition token) carries no loss.

Loss (section 3.4): next-token NLL over BOTH parts, the condition ([REF]) and the target
([GEN]); `loss` is the mean over all non-ignored target tokens (minGPT's NLL), or with
forward(..., ref_weight=w) a weighted mean in which each condition token counts w (0: the
target part alone; train_gpt.py --ref-weight), and `parts = {'ref', 'gen'}` holds the mean of
each part. A position only ever predicts ids of one modality, known from the
direction: image positions score the image rows [0, image_vocab) of the output head and text
positions the text rows [image_vocab, image_vocab + text_vocab). This "restricted" loss is
exactly the cross-entropy of the full 57,603-way head with the impossible ids masked to -inf,
i.e. the model never puts probability on an id that cannot occur there, and it skips 86% of
the head's work on image positions. `forward(..., full_vocab=True)` gives the ordinary
unmasked full-vocabulary loss for comparison. Sampling and scoring use the restricted model.
Each row's direction is read from its first token, so a batch may mix directions (the paper
alternates them per iteration, and the parts then are that direction's [REF] and [GEN] losses).

Sampling: `generate` preallocates a KV cache (B, n_head, block_size, head_dim) per layer,
runs the prefix once, then feeds one token per step; `generate_nocache` recomputes the whole
prefix each step (minGPT's sampler) and exists to check the cache. Both return target tokens
in model id space; `text_from_model` turns text rows back into raw tokenizer ids.

Guidance (not in the paper; `generate(..., guidance=s)`): each direction's condition part is
the other direction's target modality, modelled with no condition before it, so BiART also
holds an unconditional model of images ([SOI] image..., i2t order) and of captions ([SOC]
text..., t2i order). With s != 1 each sampled token takes the logits
uncond + s * (cond - uncond) (classifier-free guidance without caption dropout): s = 1 is
plain conditional sampling, s > 1 follows the condition more closely, s = 0 samples the
unconditional model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

REF = 0  # segment index of the conditional reference (section 3.4)
GEN = 1  # segment index of the generation target
IGNORE_INDEX = -1  # target value that carries no loss
CPU_BF16_ATTENTION_FROM = 512  # sequence length from which CPU autocast keeps attention in bf16
DIRECTIONS = ('t2i', 'i2t')


@dataclass
class BiARTConfig:
    n_layer: int = 32  # transformer blocks
    n_head: int = 16  # attention heads per block; must divide n_embd
    n_embd: int = 1024  # width d of the residual stream (and of the segment embedding)
    text_len: int = 64  # text tokens per caption: caption ids, end-of-text, [PAD]s
    image_len: int = 1024  # image tokens per image (a 32x32 AugVAE-SL grid, row-major)
    image_vocab: int = 8192  # AugVAE codebook size; image ids are [0, image_vocab)
    text_vocab: int = 49408  # tokenizer vocabulary size (CLIP BPE); raw id t is image_vocab + t
    eot_token: int | None = None  # tokenizer's raw end-of-text id; None = text_vocab - 1 (CLIP's 49407)
    dropout: float = 0.1  # embedding, attention-probability and residual dropout (appendix B.2)
    bias: bool = True  # biases in Linear layers and LayerNorms (minGPT); the output head has none
    positions: str = 'sequence'  # 'sequence': minGPT's, by place in the sequence; 'canonical': see _positions

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == 'dropout':
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
            elif f.name == 'bias':
                ok = isinstance(value, bool)
            elif f.name == 'positions':
                ok = value in ('sequence', 'canonical')
            elif f.name == 'eot_token':
                ok = value is None or (isinstance(value, int) and not isinstance(value, bool)
                                       and 0 <= value < self.text_vocab)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not ok:
                raise ValueError(f'BiARTConfig.{f.name}: bad value {value!r}')
        if self.n_embd % self.n_head != 0:
            raise ValueError(f'n_embd {self.n_embd} is not divisible by n_head {self.n_head}')
        self.dropout = float(self.dropout)

    # --- derived vocabulary layout (appendix B.1) ---
    @property
    def text_offset(self) -> int:
        return self.image_vocab  # raw text id t is model id text_offset + t

    @property
    def pad_id(self) -> int:
        return self.image_vocab + self.text_vocab

    @property
    def soc_id(self) -> int:
        return self.pad_id + 1

    @property
    def soi_id(self) -> int:
        return self.pad_id + 2

    @property
    def eot_id(self) -> int:
        raw = self.text_vocab - 1 if self.eot_token is None else self.eot_token
        return self.text_offset + raw

    @property
    def vocab_size(self) -> int:
        return self.image_vocab + self.text_vocab + 3  # + [PAD], [SOC], [SOI]

    @property
    def block_size(self) -> int:
        return self.text_len + self.image_len + 2  # both parts + their start tokens

    # --- presets and serialisation ---
    @classmethod
    def preset(cls, name: str, **overrides) -> BiARTConfig:
        """A named preset (PRESETS) with field overrides, e.g. preset('small', text_vocab=1000)."""
        if name not in PRESETS:
            raise ValueError(f'unknown preset {name!r}; choose from {sorted(PRESETS)}')
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'unknown BiARTConfig fields: {sorted(unknown)}')
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        """Plain dict of primitives (int, float, bool, str, None), as stored in checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BiARTConfig:
        """Inverse of to_dict; unknown or missing keys are errors (a checkpoint must be complete)."""
        names = {f.name for f in fields(cls)}
        d = {'positions': 'sequence', **d}  # checkpoints from before the field was added
        unknown, missing = set(d) - names, names - set(d)
        if unknown:
            raise ValueError(f'unknown BiARTConfig keys: {sorted(unknown)}')
        if missing:
            raise ValueError(f'missing BiARTConfig keys: {sorted(missing)}')
        return cls(**d)


PRESETS = {
    # section 3.5 / appendix B: 32 layers, d 1024, 16 heads; 522,170,368 parameters
    'paper': dict(n_layer=32, n_head=16, n_embd=1024, text_len=64, image_len=1024,
                  image_vocab=8192, text_vocab=49408, dropout=0.1),
    # paper sequence lengths and vocabulary at a width that fits a benchmark on one GPU
    'medium': dict(n_layer=12, n_head=8, n_embd=512, text_len=64, image_len=1024,
                   image_vocab=8192, text_vocab=49408, dropout=0.1),
    # CPU scale for the built-in shapes data: 8x8 image tokens from a 512-code VAE;
    # set text_vocab (and eot_token) from the tokenizer; text_len 32 fits every 2-object caption + EOT.
    # Canonical positions: on the shapes demo (1,000 steps) caption / drawing exact match 76.5 / 70.5% ->
    # 88.5 / 79.0% against minGPT's sequence positions (README, "Measured on the built-in data")
    'small': dict(n_layer=4, n_head=8, n_embd=256, text_len=32, image_len=64,
                  image_vocab=512, text_vocab=49408, dropout=0.0, positions='canonical'),
}


# -----------------------------------------------------------------------------
# token helpers: raw tokenizer ids <-> model ids, sequences for both directions

def text_to_model(raw: torch.Tensor, config: BiARTConfig, raw_pad: int | None = None) -> torch.Tensor:
    """Raw tokenizer ids (any shape) -> model text ids; entries equal to raw_pad become [PAD]."""
    is_pad = torch.zeros_like(raw, dtype=torch.bool) if raw_pad is None else raw == raw_pad
    if ((raw < 0) | (raw >= config.text_vocab))[~is_pad].any():
        raise ValueError(f'raw text ids must lie in [0, {config.text_vocab})')
    return torch.where(is_pad, config.pad_id, raw + config.text_offset)


def caption_to_model(raw_ids: Sequence[int], config: BiARTConfig, truncate: bool = False) -> torch.Tensor:
    """One caption's raw ids (without end-of-text) -> (text_len,) model ids: ids, EOT, [PAD]s.

    Raises if the caption does not fit in text_len - 1 tokens, unless truncate=True (then the
    caption is cut and still ends with EOT)."""
    raw_eot = config.eot_id - config.text_offset
    ids = [int(t) for t in raw_ids]
    if raw_eot in ids:
        raise ValueError('raw_ids already contain end-of-text; pass the caption without it')
    if len(ids) > config.text_len - 1:
        if not truncate:
            raise ValueError(f'the caption is {len(ids)} tokens long; the model takes at most {config.text_len - 1} '
                             f'(its text length {config.text_len} less the end-of-text); pass truncate=True to cut it')
        ids = ids[:config.text_len - 1]
    out = torch.full((config.text_len,), config.pad_id, dtype=torch.long)
    out[:len(ids) + 1] = text_to_model(torch.tensor(ids + [raw_eot], dtype=torch.long), config)
    return out


def text_from_model(ids: torch.Tensor, config: BiARTConfig) -> list[list[int]]:
    """Model text ids (B, L) or (L,) -> raw tokenizer ids per row, cut before the first EOT."""
    rows = ids.reshape(-1, ids.size(-1)).tolist()
    out = []
    for row in rows:
        raw = []
        for t in row:
            if t == config.eot_id:
                break
            if t == config.pad_id:
                continue
            if not config.text_offset <= t < config.pad_id:
                raise ValueError(f'{t} is not a text id')
            raw.append(t - config.text_offset)
        out.append(raw)
    return out


def check_image(image: torch.Tensor, config: BiARTConfig) -> None:
    """Raise unless image is (B, image_len) long with ids in [0, image_vocab)."""
    if image.dim() != 2 or image.size(1) != config.image_len or image.dtype != torch.long:
        raise ValueError(f'image must be a (B, {config.image_len}) LongTensor, got '
                         f'{tuple(image.shape)} {image.dtype}')
    if ((image < 0) | (image >= config.image_vocab)).any():
        raise ValueError(f'image ids must lie in [0, {config.image_vocab})')


def check_text(text: torch.Tensor, config: BiARTConfig) -> None:
    """Raise unless text is (B, text_len) long in the model's text range and follows the
    padding policy: [PAD] only right after an EOT or another [PAD], nothing else after EOT."""
    if text.dim() != 2 or text.size(1) != config.text_len or text.dtype != torch.long:
        raise ValueError(f'text must be a (B, {config.text_len}) LongTensor in model id space, got '
                         f'{tuple(text.shape)} {text.dtype}')
    is_pad = text == config.pad_id
    in_range = (text >= config.text_offset) & (text < config.pad_id)
    if not (in_range | is_pad).all():
        raise ValueError('text ids must be model text ids (raw + image_vocab, see text_to_model) or [PAD]')
    is_eot = (text == config.eot_id).long()
    after_eot = (is_eot.cumsum(1) - is_eot) > 0  # (B, text_len) strictly after the first EOT
    if (is_pad != after_eot).any():
        raise ValueError('text rows must be: caption ids, one end-of-text, then only [PAD]s')


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax-bound logits in fp32 (or fp64) even when the model runs in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> temperature-scaled fp32 logits with -inf outside the top_k ids and
    outside the nucleus: the smallest set of most likely ids whose probability reaches top_p
    (top-k is applied first, so top_p acts on the renormalised top-k distribution)."""
    logits = _at_least_fp32(logits)  # (B, V)
    if temperature != 1.0:  # x / 1.0 == x: skip a copy per sampled token
        logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # mass before this id already > top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float('inf'))
        logits = torch.full_like(logits, -float('inf')).scatter(-1, order, sorted_logits)
    return logits


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')


def _layout(direction: str, config: BiARTConfig) -> tuple[int, int, int, int]:
    """(first start token, second start token, condition length, target length)."""
    _check_direction(direction)
    if direction == 't2i':
        return config.soc_id, config.soi_id, config.text_len, config.image_len
    return config.soi_id, config.soc_id, config.image_len, config.text_len


def _prefix(cond: torch.Tensor, direction: str, config: BiARTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition -> (idx, seg) of `[S1] cond [S2]`, (B, cond_len + 2) each."""
    first, second, cond_len, _ = _layout(direction, config)
    B = cond.size(0)
    idx = torch.cat([cond.new_full((B, 1), first), cond, cond.new_full((B, 1), second)], dim=1)
    seg = torch.full_like(idx, REF)
    seg[:, -1] = GEN  # the start token of the target part opens [GEN]
    return idx, seg


def build_sequence(text: torch.Tensor, image: torch.Tensor, direction: str,
                   config: BiARTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training/scoring example for one direction.

    text: (B, text_len) model ids (raw + image_vocab, padded with pad_id, see caption_to_model);
    image: (B, image_len) in [0, image_vocab); direction: 't2i' or 'i2t'.
    Returns idx, seg, targets, each (B, block_size - 1): the input tokens, their segments
    (REF/GEN), and the next tokens with IGNORE_INDEX at [PAD] targets and at the target that
    would be the (known) second start token.
    """
    _, _, cond_len, _ = _layout(direction, config)
    check_text(text, config)
    check_image(image, config)
    if text.size(0) != image.size(0):
        raise ValueError(f'batch sizes differ: text {text.size(0)}, image {image.size(0)}')
    cond, target = (text, image) if direction == 't2i' else (image, text)
    prefix_idx, prefix_seg = _prefix(cond, direction, config)  # (B, cond_len + 2)
    seq = torch.cat([prefix_idx, target], dim=1)  # (B, block_size)
    seg = torch.cat([prefix_seg, torch.full_like(target, GEN)], dim=1)
    targets = seq[:, 1:].clone()
    targets[targets == config.pad_id] = IGNORE_INDEX
    targets[:, cond_len] = IGNORE_INDEX  # the last condition token would predict the start token
    return seq[:, :-1], seg[:, :-1], targets


# -----------------------------------------------------------------------------
# the model

class KVCache:
    """Keys and values of one attention layer, preallocated as (B, n_head, max_len, head_dim)
    at the first write (so it takes the dtype that autocast gives the keys), filled left to right."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k = k.new_empty(B, nh, self.max_len, hs)  # (B, nh, max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        assert pos + T <= self.max_len, f'cache of {self.max_len} positions is full'
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]  # (B, nh, pos + T, hs)

    def repeat_interleave(self, n: int) -> None:
        """Give each batch row n copies (rows i*n .. i*n + n - 1 come from row i)."""
        self.k = self.k.repeat_interleave(n, dim=0)
        self.v = self.v.repeat_interleave(n, dim=0)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: BiARTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        causal, mask = T > 1, None
        if cache is not None:
            # a prefix from place 0 (causal), one new token (sees every cached place), or several
            # new tokens after the cached ones (token i sees the cache and new tokens 0 .. i)
            k, v = cache.update(k, v, pos)  # (B, nh, pos + T, hs)
            if pos > 0 and T > 1:
                causal, mask = False, torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        elif x.device.type == 'cpu':
            # the CPU flash kernel runs forward + backward 30% faster on contiguous (B, nh, T, hs)
            # inputs than on these transposed views, with bit-identical results (bench.py row 1)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dropout = self.dropout if self.training else 0.0
        if x.device.type == 'cpu' and q.dtype in (torch.bfloat16, torch.float16) and T < CPU_BF16_ATTENTION_FROM:
            # CPU autocast, short sequences: attention in fp32 (the matrix products around it stay
            # bf16). The CPU's bf16 attention ran forward + backward 3-6x slower than fp32 below a
            # few hundred tokens (the demo's 88: 50 vs 15 ms a layer), as fast from ~400 on, and
            # faster at 1,089 (bench.py row 1b)
            with torch.autocast('cpu', enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   dropout_p=dropout, is_causal=causal).to(q.dtype)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: BiARTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf); minGPT's tanh form costs 3x more on CPU under bf16 autocast
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) inside


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: BiARTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class BiART(nn.Module):

    def __init__(self, config: BiARTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position (minGPT keeps block_size rows)
            wse=nn.Embedding(2, config.n_embd),  # segment: REF, GEN (d-wide; paper section 3.4)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from the token embedding
        # GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self) -> int:
        """All parameters, position and output tables included (the paper's count)."""
        return sum(p.numel() for p in self.parameters())

    # --- trunk and heads ---
    def _positions(self, idx: torch.Tensor, pos: int, direction: str | None) -> torch.Tensor:
        """Rows of the position table for sequence places pos .. pos + T - 1: (T,) or (B, T).
        'sequence' (minGPT): the place itself, so image token k sits at place 1 + k after [SOI]
        in image->text order but at text_len + 2 + k in text->image order, and the model learns
        the image grid twice. 'canonical': every token takes its place in the text->image
        layout ([SOC] text [SOI] image) whatever the order, so each caption and grid position
        has one embedding in both directions; the table keeps its block_size rows. The direction
        comes from `direction` or, from place 0, from each row's start token."""
        c = self.config
        places = torch.arange(pos, pos + idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        if c.positions == 'sequence':
            return places
        if direction is None:
            assert pos == 0, 'canonical positions past place 0 need the direction'
            i2t = idx[:, :1] == c.soi_id  # (B, 1)
        else:
            i2t = torch.full((idx.size(0), 1), direction == 'i2t', device=idx.device)
        # i2t: [SOI] image (places 0 .. image_len) -> text_len + 1 + place; [SOC] text -> place - image_len - 1
        return torch.where(i2t, torch.where(places <= c.image_len, places + c.text_len + 1, places - c.image_len - 1),
                           places)  # (B, T)

    def _trunk(self, idx: torch.Tensor, seg: torch.Tensor, caches: list[KVCache] | None = None,
               pos: int = 0, direction: str | None = None) -> torch.Tensor:
        """(B, T) tokens and segments at places pos .. pos + T - 1 -> (B, T, C) after ln_f."""
        B, T = idx.size()
        assert pos + T <= self.config.block_size, f'{pos + T} positions > block_size {self.config.block_size}'
        positions = self._positions(idx, pos, direction)  # (T,) or (B, T)
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(positions) + tr.wse(seg))  # (B, T, C)
        for i, block in enumerate(tr.h):
            x = block(x, None if caches is None else caches[i], pos)
        return tr.ln_f(x)  # (B, T, C)

    def _rows(self, modality: str) -> tuple[int, int]:
        """Head rows (= model ids) [lo, hi) of a modality."""
        c = self.config
        return (0, c.image_vocab) if modality == 'image' else (c.text_offset, c.pad_id)

    def _restricted_logits(self, h: torch.Tensor, modality: str) -> torch.Tensor:
        """(..., C) -> (..., hi - lo) logits over one modality's ids only."""
        lo, hi = self._rows(modality)
        return F.linear(h, self.lm_head.weight[lo:hi])

    def _head_rows(self) -> dict[str, torch.Tensor]:
        """The output head's image and text rows as views from ONE split: its backward writes
        the head's gradient once (the special rows get zeros), where a slice per modality would
        allocate, zero and add a full vocab_size x C gradient per slice (2 x 118 MB a step at
        paper width)."""
        c = self.config
        image, text, _ = self.lm_head.weight.split([c.image_vocab, c.text_vocab, c.vocab_size - c.pad_id])
        return {'image': image, 'text': text}

    def _token_nll(self, x: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                   full_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-token NLL of the image and text parts of full sequences (any mix of directions).

        Returns (B,) sums and counts of non-ignored targets: ref_sum, ref_n, gen_sum, gen_n."""
        c = self.config
        B, T = idx.shape
        assert T == c.block_size - 1, f'a loss needs whole sequences of {c.block_size - 1} tokens, got {T}'
        first = idx[:, 0]
        if not torch.compiler.is_compiling() and not ((first == c.soc_id) | (first == c.soi_id)).all():
            raise ValueError('every sequence must start with [SOC] (t2i) or [SOI] (i2t)')
        is_t2i = first == c.soc_id  # (B,)
        # positions (into idx) whose next token is an image / a text token
        img_pos = torch.arange(c.image_len, device=idx.device) + torch.where(is_t2i, c.text_len + 1, 0)[:, None]
        txt_pos = torch.arange(c.text_len, device=idx.device) + torch.where(is_t2i, 0, c.image_len + 1)[:, None]
        sums, counts = {}, {}
        rows = self._head_rows() if full_logits is None else None
        for modality, pos in (('image', img_pos), ('text', txt_pos)):  # pos: (B, P)
            t = torch.take_along_dim(targets, pos, dim=1)  # (B, P)
            valid = (t != IGNORE_INDEX) & (t != c.pad_id)
            if full_logits is None:
                h = torch.take_along_dim(x, pos[:, :, None], dim=1)  # (B, P, C)
                logits = F.linear(h, rows[modality])  # (B, P, width): this modality's ids only
                t = t - self._rows(modality)[0]
            else:
                logits = torch.take_along_dim(full_logits, pos[:, :, None], dim=1)  # (B, P, V)
            t = t.masked_fill(~valid, IGNORE_INDEX)
            nll = F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction='none').view(B, -1)  # (B, P), 0 where ignored
            sums[modality], counts[modality] = nll.sum(1), valid.sum(1)
        return dict(
            ref_sum=torch.where(is_t2i, sums['text'], sums['image']),
            ref_n=torch.where(is_t2i, counts['text'], counts['image']),
            gen_sum=torch.where(is_t2i, sums['image'], sums['text']),
            gen_n=torch.where(is_t2i, counts['image'], counts['text']),
        )

    def forward(self, idx: torch.Tensor, seg: torch.Tensor, targets: torch.Tensor | None = None,
                full_vocab: bool = False, ref_weight: float = 1.0,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """idx, seg: (B, T); targets: (B, block_size - 1) from build_sequence, or None.

        Returns (logits, loss, parts):
          targets None: full-vocabulary logits (B, T, vocab_size), None, None.
          targets given: the restricted loss (see module docstring) with logits None, or with
            full_vocab=True the unmasked full-vocabulary loss and its logits (B, T, vocab_size).
          loss is the mean NLL over all non-ignored targets of both parts, each condition token
          weighted by ref_weight (1: the paper's plain mean; 0: the target part alone); parts =
          {'ref': mean over the condition part, 'gen': mean over the target part}.
        Batches may mix directions (each row's direction is read from its first token)."""
        x = self._trunk(idx, seg)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None, None  # (B, T, V)
        logits = self.lm_head(x) if full_vocab else None  # (B, T, V)
        r = self._token_nll(x, idx, targets, logits)
        ref_n, gen_n = r['ref_n'].sum(), r['gen_n'].sum()
        parts = {'ref': r['ref_sum'].sum() / ref_n.clamp(min=1), 'gen': r['gen_sum'].sum() / gen_n.clamp(min=1)}
        loss = (ref_weight * r['ref_sum'].sum() + r['gen_sum'].sum()) / (ref_weight * ref_n + gen_n).clamp(min=1)
        return logits, loss, parts

    @torch.no_grad()
    def score(self, cond: torch.Tensor, target: torch.Tensor, direction: str) -> torch.Tensor:
        """Summed log-likelihood log p(target | cond) of the target part, ignoring [PAD] targets
        (restricted model, EOT included); (B,) in fp32 (fp64 for a double model). For 't2i' cond
        is text and target an image, for 'i2t' the reverse (text in model ids, following the
        padding policy). A batch dimension of size 1 on either side is broadcast, e.g. to score
        64 candidate captions against one image: that condition is then run once and its keys and
        values shared by every row. Call model.eval() first."""
        B = max(cond.size(0), target.size(0))
        shared = cond.size(0) == 1 and B > 1
        cond, target = cond.expand(B, -1), target.expand(B, -1)
        text, image = (cond, target) if direction == 't2i' else (target, cond)
        idx, seg, targets = build_sequence(text, image, direction, self.config)
        if shared:
            x = self._trunk_shared_prefix(idx, seg, _layout(direction, self.config)[2] + 2, direction)
        else:
            x = self._trunk(idx, seg)  # (B, T, C)
        return -self._token_nll(x, idx, targets, None)['gen_sum']  # (B,)

    def _prefill(self, idx: torch.Tensor, seg: torch.Tensor, repeats: int = 1, direction: str | None = None,
                 ) -> tuple[list[KVCache], torch.Tensor]:
        """Fresh KV caches filled with (B, T) tokens from place 0, each row's keys and values then
        given to `repeats` rows (row i -> rows i*repeats ..) -> (caches, (B, T, C) states)."""
        caches = [KVCache(self.config.block_size) for _ in range(self.config.n_layer)]
        h = self._trunk(idx, seg, caches, pos=0, direction=direction)
        if repeats > 1:
            for cache in caches:
                cache.repeat_interleave(repeats)
        return caches, h

    def _trunk_shared_prefix(self, idx: torch.Tensor, seg: torch.Tensor, P: int, direction: str) -> torch.Tensor:
        """_trunk of rows whose first P tokens are the same: those run once, in row 0, and every
        row's remaining tokens attend to their cached keys and values -> (B, T, C)."""
        B = idx.size(0)
        caches, head = self._prefill(idx[:1, :P], seg[:1, :P], B, direction)  # head: (1, P, C)
        tail = self._trunk(idx[:, P:], seg[:, P:], caches, pos=P, direction=direction)  # (B, T - P, C)
        return torch.cat([head.expand(B, -1, -1), tail], dim=1)

    @torch.no_grad()
    def text_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image->text logits of every caption place given the image and the caption before it:
        (B, image_len) images, (B, text_len) captions in model ids -> (B, text_len, text_vocab),
        column k being model id text_offset + k (restricted to text ids, EOT the last column)."""
        idx, seg, _ = build_sequence(text, image, 'i2t', self.config)
        c = self.config
        h = self._trunk(idx, seg)[:, c.image_len + 1:c.image_len + 1 + c.text_len]  # places predicting the text
        return self._restricted_logits(h, 'text')

    # --- sampling ---
    def _start_generation(self, cond: torch.Tensor, direction: str, num_samples: int, length: int | None,
                          temperature: float, top_k: int | None, top_p: float | None, guidance: float = 1.0,
                          ) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        _, _, _, target_len = _layout(direction, self.config)
        if direction == 't2i':
            check_text(cond, self.config)
        else:
            check_image(cond, self.config)
        length = target_len if length is None else length
        if not 1 <= length <= target_len:
            raise ValueError(f'length must be in [1, {target_len}], got {length}')
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        if temperature <= 0:
            raise ValueError('temperature must be > 0 (use top_k=1 for greedy decoding)')
        if top_k is not None and top_k < 1:
            raise ValueError(f'top_k must be >= 1, got {top_k}')
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f'top_p must be in (0, 1], got {top_p}')
        if not guidance >= 0:
            raise ValueError(f'guidance must be >= 0, got {guidance}')
        idx, seg = _prefix(cond, direction, self.config)  # (B, cond_len + 2)
        return idx, seg, length, 'image' if direction == 't2i' else 'text'

    def _unconditional_start(self, direction: str, rows: int, device: torch.device
                             ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The start of the target modality with no condition: its start token as the first
        [REF] token of the other order -> (idx, seg) (rows, 1) each, and that order."""
        c = self.config
        idx = torch.full((rows, 1), c.soi_id if direction == 't2i' else c.soc_id, dtype=torch.long, device=device)
        return idx, torch.full_like(idx, REF), 'i2t' if direction == 't2i' else 't2i'

    def _sample(self, h: torch.Tensor, modality: str, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None,
                h_uncond: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """(B, C) last hidden states -> (B,) model ids of the target modality; with h_uncond,
        the unconditional model's states, the logits are guided (see module docstring)."""
        logits = self._restricted_logits(h, modality)  # (B, width)
        if h_uncond is not None:
            uncond = _at_least_fp32(self._restricted_logits(h_uncond, modality))
            logits = uncond + guidance * (_at_least_fp32(logits) - uncond)
        logits = filter_logits(logits, temperature, top_k, top_p)  # (B, width)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1) + self._rows(modality)[0]

    def _after_eot(self, tok: torch.Tensor, finished: torch.Tensor, modality: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text rows that already emitted EOT continue with [PAD] (the training layout)."""
        if modality == 'image':
            return tok, finished
        tok = tok.masked_fill(finished, self.config.pad_id)
        return tok, finished | (tok == self.config.eot_id)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, direction: str, num_samples: int = 1,
                 length: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 guidance: float = 1.0) -> torch.Tensor:
        """Sample the target part given the condition, with a KV cache. Call model.eval() first.

        cond: (B, text_len) model text ids for 't2i', (B, image_len) image ids for 'i2t'.
        Returns (B * num_samples, length) model ids, rows i*num_samples .. (i+1)*num_samples - 1
        for condition i; length defaults to the whole target part (the paper samples 32 text
        tokens for captions, section 3.6). Image rows hold ids in [0, image_vocab); text rows
        hold text ids, and after the first EOT only [PAD] (sampling continues for the batch but
        those rows are fed [PAD]; the loop stops once every row has ended). The draws use
        torch.multinomial with `generator` (on the model's device), so a seed fixes the output.
        guidance != 1 also runs the unconditional model (its own cache) and guides each token
        (module docstring)."""
        idx, seg, length, modality = self._start_generation(cond, direction, num_samples, length,
                                                            temperature, top_k, top_p, guidance)
        B, P = idx.shape
        caches, h = self._prefill(idx, seg, num_samples)  # the condition is run once
        h = h[:, -1].repeat_interleave(num_samples, dim=0)  # (B * n, C)
        hu = None
        if guidance != 1.0:
            uidx, useg, other = self._unconditional_start(direction, h.size(0), idx.device)
            ucaches, hu = self._prefill(uidx, useg, direction=other)
            hu = hu[:, -1]  # (B * n, C)
        out = torch.full((h.size(0), length), self.config.pad_id, dtype=torch.long, device=idx.device)
        finished = torch.zeros(h.size(0), dtype=torch.bool, device=idx.device)
        gen_seg = torch.full((h.size(0), 1), GEN, dtype=torch.long, device=idx.device)
        for t in range(length):
            tok, finished = self._after_eot(self._sample(h, modality, temperature, top_k, top_p, generator,
                                                         hu, guidance), finished, modality)
            out[:, t] = tok
            if t == length - 1 or (modality == 'text' and finished.all()):
                break
            h = self._trunk(tok[:, None], gen_seg, caches, pos=P + t, direction=direction)[:, -1]  # (B * n, C)
            if hu is not None:
                hu = self._trunk(tok[:, None], useg, ucaches, pos=1 + t, direction=other)[:, -1]
        return out

    @torch.no_grad()
    def generate_nocache(self, cond: torch.Tensor, direction: str, num_samples: int = 1,
                         length: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None,
                         guidance: float = 1.0) -> torch.Tensor:
        """generate() without a cache: the whole sequence is recomputed every step (minGPT's
        sampler). Slow; it is the reference the cached sampler is tested against."""
        idx, seg, length, modality = self._start_generation(cond, direction, num_samples, length,
                                                            temperature, top_k, top_p, guidance)
        idx, seg = idx.repeat_interleave(num_samples, dim=0), seg.repeat_interleave(num_samples, dim=0)
        guided = guidance != 1.0
        if guided:
            uidx, useg, other = self._unconditional_start(direction, idx.size(0), idx.device)
        out = torch.full((idx.size(0), length), self.config.pad_id, dtype=torch.long, device=idx.device)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for t in range(length):
            h = self._trunk(idx, seg)[:, -1]  # (B * n, C)
            hu = self._trunk(uidx, useg, direction=other)[:, -1] if guided else None
            tok, finished = self._after_eot(self._sample(h, modality, temperature, top_k, top_p, generator,
                                                         hu, guidance), finished, modality)
            out[:, t] = tok
            if t == length - 1 or (modality == 'text' and finished.all()):
                break
            idx = torch.cat([idx, tok[:, None]], dim=1)
            seg = torch.cat([seg, torch.full_like(tok[:, None], GEN)], dim=1)
            if guided:
                uidx = torch.cat([uidx, tok[:, None]], dim=1)
                useg = torch.cat([useg, torch.full_like(tok[:, None], REF)], dim=1)
        return out

    # --- optimisation ---
    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             eps: float, device_type: str) -> torch.optim.AdamW:
        """AdamW; weight decay on Linear weights only, not on embeddings (token, position,
        segment: appendix B.2), LayerNorms or biases. The fused kernel on CPU and CUDA: one pass
        over each tensor; on CPU 5x faster than the default implementation, 0.5 s less per
        medium-preset training step on one core (bench.py row 1)."""
        decay, no_decay = [], []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                (decay if isinstance(module, nn.Linear) and name == 'weight' else no_decay).append(p)
        assert len(decay) + len(no_decay) == len(list(self.parameters()))
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps,
                                 fused=device_type in ('cuda', 'cpu'))


def from_checkpoint(ckpt: dict) -> BiART:
    """The model of a loaded train_gpt.py checkpoint dict (its 'config' and 'model' entries), strict."""
    model = BiART(BiARTConfig.from_dict(ckpt['config']))
    model.load_state_dict(ckpt['model'], strict=True)
    return model


if __name__ == '__main__':
    for name in PRESETS:
        config = BiARTConfig.preset(name)
        with torch.device('meta'):  # count without allocating the weights
            model = BiART(config)
        print(f'{name}: {model.get_num_params():,} parameters '
              f'({config.n_layer} layers, d {config.n_embd}, {config.n_head} heads, dropout {config.dropout})')
        print(f'  image ids [0, {config.image_vocab}), text ids [{config.text_offset}, {config.pad_id}) '
              f'(end-of-text {config.eot_id}), [PAD] {config.pad_id}, [SOC] {config.soc_id}, '
              f'[SOI] {config.soi_id}; vocab_size {config.vocab_size}')
        print(f'  text_len {config.text_len} + image_len {config.image_len} + 2 = block_size '
              f'{config.block_size} (fed {config.block_size - 1} tokens)')
    print('small: text_vocab is the CLIP size here; pass the tokenizer\'s via preset("small", text_vocab=...)')
