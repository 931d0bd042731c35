"""
Measured speed and memory of this repo's hot paths, each beside its baseline, as one table.

    python bench.py                         # the full run, every row (under 10 minutes on a 2-core CPU)
    python bench.py --quick                 # smaller settings: a few minutes
    python bench.py --json out/bench.json   # also write the figures machine-readably
    python bench.py --rows 1,3              # some rows only
    python bench.py --compile               # row 1 also with torch.compile (compiling takes minutes on CPU)
    python bench.py --e2e                   # row 6: run `python demo.py` and time it
    python bench.py --quick --device cuda   # the rows on a GPU ('auto', the default, takes one when there is one)
    python -m pytest tests/test_gpu.py -s   # on a CUDA machine: AMP steps of both stages, NCCL DDP (not a benchmark)

Rows (each prints the figure, its baseline, the ratio, the machine and the settings):
  1  BiART training: tokens/s and MFU (model FLOPs/s over the peak matmul FLOP/s measured at the
     start of the same run) for the medium preset at the paper's sequence length (64 text + 1,024
     image tokens and the 2 start tokens: 1,089 tokens fed), against a minGPT-style
     baseline of the same size kept in this file (manual attention, full-vocabulary head and loss,
     default AdamW, eager); bf16 autocast against fp32; with --compile, torch.compile against eager.
  2  text->image sampling: image tokens/s with the KV cache (BiART.generate) against a full recompute
     per token (the loop of BiART.generate_nocache, minGPT's sampler), batch 1 and 16, medium
     preset, 64 text + 1,024 image tokens (--quick: the first 256 image tokens); peak memory.
  3  the EMA quantizer's training step on a (8, 256, 64, 64) input with 8192 x 256 codes against the
     one-hot formulation kept in this file: time, peak memory, identical indices and statistics.
  4  AugVAE-SL (paper preset, 256 px) encode and decode images/s, fp32 and bf16 autocast; peak memory.
  5  tokenizer captions/s against OpenAI CLIP's simple_tokenizer.py (when it is installed), on
     bench_captions; 5b: with BPE-dropout 0.1 (train_gpt.py --bpe-dropout) against without.
  6  the README demo end to end: `seconds` from out/demo/results.json (written by `python demo.py`),
     or, with --e2e, a timed run of it.
  7  each demo stage's training step (AugVAE-ML, AugVAE-SL, BiART at the demo's sizes) in fp32 and
     under bf16 autocast, and demo.py's --dtype auto probe (runtime.cpu_bf16_speedup) beside them.
  8  prepare.py images/s from img2dataset tar shards against from a folder of the same JPEGs
     (--source jsonl), prepare's own time (its log's "done in"), small AugVAE-SL so reading shows.

Method. Every measurement runs in a fresh Python process (`--worker`), so memory freed by earlier
work cannot hide a peak and one row cannot warm another. A figure is the median of at least 3
timed runs after a warm-up (sampling: of each step timed, see sample_part; one whole
generate() call at batch 1 checks the sum of steps). Peak memory is what the measured call adds
above what was resident when it started: on CUDA torch.cuda.max_memory_allocated after reset_peak_memory_stats; on CPU
the resident-set high-water mark VmHWM (reset by writing 5 to /proc/self/clear_refs just before
the call) minus VmRSS just before it, on the first (cold) call. The machine is shared, so during
every timed run the CPU time used by OTHER processes is read from /proc/stat (machine busy time
minus this process's) and printed as cores' worth: 0.0 means the run had the machine to itself.
With other jobs on the cores, `--threads 1` measures more steadily than threads that wait for a
busy core at every parallel region (on 2 cores with one taken, 2 threads ran a sampling step 3x
slower than 1 thread).

Targets are for this benchmark; tests only check that every path runs and that fast and reference
paths agree (tests/test_bench.py).
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import augvae
import biart
import data
import runtime
import tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
RESULT_PREFIX = "BENCH_RESULT "  # a worker's last stdout line: this prefix, then its result as JSON
DEMO_RESULTS = os.path.join("out", "demo", "results.json")  # written by `python demo.py`
MIB = 2 ** 20

# -----------------------------------------------------------------------------------------
# settings per mode; CUDA replaces some (CUDA_SETTINGS), --tiny shrinks every row for the tests

SETTINGS = {
    "full": dict(
        repeats=3,                   # timed runs per figure (the median is printed)
        peak_sizes=[2048, 4096],     # square matrices for the peak matmul FLOP/s
        train_preset="medium",       # row 1: 12 layers, d 512, 8 heads, vocab 57,603, T = 1,088
        train_overrides=dict(dropout=0.0),  # throughput convention (nanoGPT's); the preset's 0.1 is row 1d
        train_batch=1,               # sequences per optimizer step (1,089 tokens)
        train_dropout_row=True,      # row 1d: ours at the preset's dropout 0.1 (SDPA's math path on CPU)
        sample_preset="medium",      # row 2
        sample_overrides=dict(),
        sample_batches=[1, 16],
        sample_length=1024,          # image tokens sampled: the whole 32 x 32 image
        sample_points=3,             # positions at which a sampling step is timed (then summed, see sample_part)
        check_tokens=8,              # cached vs recompute identical for this many tokens (same seed)
        quant_shape=[8, 256, 64, 64],  # row 3: (B, D, H, W) encoder output
        quant_codes=8192,
        quant_chunk=4096,            # AugVAEConfig.distance_chunk (its default)
        vae_preset="paper",          # row 4, single-level, 256 px
        vae_overrides=dict(),
        vae_batch=1,
        tok_count=10000,             # row 5: captions per timed run
        demo_batch=32,               # row 7: the demo's batch (train_vae.py's and train_gpt.py's default)
        demo_probes=3,               # row 7: calls of demo.py's --dtype auto probe
        prep_images=2048,            # row 8: images prepare.py encodes from shards and from a folder
        prep_per_shard=1024,         # img2dataset writes 10,000: a shard's last, partial batches weigh more here
        prep_batch=64,               # prepare.py's default
        prep_workers=0,
        prep_repeats=3,              # timed runs of each (after a warm-up run when prep_warm)
        prep_warm=True,
    ),
}
SETTINGS["quick"] = {**SETTINGS["full"], **dict(
    train_dropout_row=False, sample_length=256, tok_count=5000)}
SETTINGS["tiny"] = {**SETTINGS["full"], **dict(  # every path at toy sizes, for tests: the figures mean nothing
    peak_sizes=[64], train_batch=2, train_dropout_row=True,
    train_overrides=dict(n_layer=1, n_head=2, n_embd=32, text_len=8, image_len=16, image_vocab=64,
                         text_vocab=100, dropout=0.0),
    sample_overrides=dict(n_layer=1, n_head=2, n_embd=32, text_len=8, image_len=16, image_vocab=64,
                          text_vocab=100),
    sample_batches=[1, 3], sample_length=16, check_tokens=4,
    quant_shape=[2, 16, 8, 8], quant_codes=64, quant_chunk=32, demo_batch=2, demo_probes=1,
    prep_images=12, prep_per_shard=5, prep_batch=4, prep_repeats=1, prep_warm=False,
    vae_preset="small", vae_overrides=dict(image_size=32), vae_batch=2, tok_count=50)}
CUDA_SETTINGS = dict(peak_sizes=[8192], train_batch=8, vae_batch=16)  # a GPU needs bigger work to be busy


# -----------------------------------------------------------------------------------------
# the machine, its load, memory

def machine_short(m: dict) -> str:
    where = m["gpu"] if "gpu" in m else f"{m['cpu']} ({m['cores']} cores), {m['threads']} thread(s)"
    return f"{where}, torch {m['torch']}"


def _machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (v + [0] * 7)[:7]  # guest time is inside user
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # this process (all its threads) and its waited-for children
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Cores' worth of CPU that OTHER processes used while the block ran: (machine busy time -
    this process's CPU time) / wall time. `others` is None where /proc/stat is missing."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self.t0, 1e-9)
        busy = _machine_busy_s()
        self.others = None if busy is None or self.busy0 is None else \
            max(0.0, (busy - self.busy0) - (_own_cpu_s() - self.own0)) / wall
        return False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so VmRSS counts live memory only and a
    measured call cannot reuse freed-but-resident pages unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak bytes a block adds above what was in use when it started (see the module docstring).
    `peak` is None where it cannot be measured; `method` says how it was."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _trim_heap()
            reset = _reset_hwm()
            self.base = _status_kib("VmRSS")
            self.method = ("VmHWM reset by /proc/self/clear_refs, minus VmRSS before" if reset else
                           "VmHWM minus VmRSS before (no reset: may include the setup's own peak)")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = _status_kib("VmHWM")
            self.peak = None if hwm is None or self.base is None else max(0, hwm - self.base) * 1024
            if self.peak is None:
                self.method = "not measured (no /proc/self/status)"
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warm=None, time_first: bool | str = False,
            memory: bool = True) -> dict:
    """Time fn: `warm()` first if given (unmeasured), then a first call under the memory probe,
    then more calls until `repeats` are timed, each under a LoadMeter. The first call counts as
    a timed one if time_first is True, or if it is 'auto' and the call took over a second (a cold
    start costs milliseconds: noise for such runs, which are too long to repeat needlessly)."""
    if warm is not None:
        warm()
        sync(device)
    probe = MemoryProbe(device) if memory else contextlib.nullcontext()
    times, loads = [], []
    with probe, LoadMeter() as lm:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t0
    if time_first is True or (time_first == "auto" and first > 1.0):
        times.append(first)
        loads.append(lm.others)
    while len(times) < repeats:
        with LoadMeter() as lm:
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        loads.append(lm.others)
    out = {"times": times, "median": statistics.median(times), "load": loads, "first_s": first}
    if memory:
        out["peak_bytes"], out["memory_method"] = probe.peak, probe.method
    return out


def mean_load(*results) -> float | None:
    vals = [x for r in results if r for x in r.get("load", []) if x is not None]
    return sum(vals) / len(vals) if vals else None


# -----------------------------------------------------------------------------------------
# row 1 baseline: a straightforward minGPT-style BiART (parameter names match BiART's, so the
# same weights load into both and the losses can be compared, tests/test_bench.py)

class ErfGELU(nn.Module):
    """The exact GELU (BiART's), written out from the error function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class BaselineAttention(nn.Module):
    """minGPT's CausalSelfAttention: the (T, T) attention matrix, masked, softmaxed, dropped out."""

    def __init__(self, config: biart.BiARTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        bs = config.block_size
        self.register_buffer("bias", torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs), persistent=False)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class BaselineBlock(nn.Module):
    def __init__(self, config: biart.BiARTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = BaselineAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.ModuleDict(dict(
            c_fc=nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias),
            c_proj=nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
            act=ErfGELU(), dropout=nn.Dropout(config.dropout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m.dropout(m.c_proj(m.act(m.c_fc(self.ln_2(x)))))


class BaselineGPT(nn.Module):
    """minGPT with BiART's segment embedding: logits over the whole 57,603-id vocabulary at every
    position and one cross-entropy over them (BiART.forward(..., full_vocab=True) is the same loss)."""

    def __init__(self, config: biart.BiARTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            wse=nn.Embedding(2, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([BaselineBlock(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, seg: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(pos) + tr.wse(seg))
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, vocab_size)
        loss = None if targets is None else F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=biart.IGNORE_INDEX)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple) -> torch.optim.AdamW:
        """minGPT's: decay on Linear weights, torch's default AdamW implementation."""
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and p.dim() == 2
                 and not n.startswith(("transformer.wte", "transformer.wpe", "transformer.wse"))]
        ids = {id(p) for p in decay}
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": [p for p in self.parameters() if id(p) not in ids], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def train_flops_per_sequence(cfg: biart.BiARTConfig, kind: str) -> float:
    """Matmul FLOPs of one training sequence (forward + backward = 3 x forward) of T = block_size - 1
    tokens. ours: causal attention computes only the lower triangle (sum over positions of t + 1
    keys), and the head scores image positions over image_vocab ids and text positions over
    text_vocab ids. baseline: the full (T, T) attention matrix and the full vocabulary everywhere."""
    d, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size - 1
    linear = 2 * T * 12 * d * d * L  # c_attn 3d^2, c_proj d^2, c_fc 4d^2, mlp c_proj 4d^2 per layer
    if kind == "ours":
        attention = 2 * 2 * d * (T * (T + 1) // 2) * L  # q.k and att.v over the causal triangle
        head = 2 * d * (cfg.image_len * cfg.image_vocab + cfg.text_len * cfg.text_vocab)
    else:
        attention = 2 * 2 * d * T * T * L
        head = 2 * d * T * cfg.vocab_size
    return 3.0 * (linear + attention + head)


def fake_batch(cfg: biart.BiARTConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of 5-20 random text ids + end-of-text + [PAD]s, and random image ids."""
    assert cfg.eot_id == cfg.pad_id - 1, "fake captions draw ids below the end-of-text id"
    g = torch.Generator().manual_seed(seed)
    text = torch.full((batch, cfg.text_len), cfg.pad_id, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(min(5, cfg.text_len - 1), min(20, cfg.text_len - 1) + 1, (1,), generator=g))
        text[i, :n] = torch.randint(cfg.text_offset, cfg.eot_id, (n,), generator=g)
        text[i, n] = cfg.eot_id
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len), generator=g)
    return text, image


def make_trainer(kind: str, cfg: biart.BiARTConfig, batch: int, dtype: str, device: torch.device,
                 compile_model: bool = False, seed: int = 0):
    """-> (step function, model). A step is train_gpt.py's: forward, backward, clip at 1, AdamW step,
    zero_grad; steps alternate text->image and image->text like train_gpt.py."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    torch.manual_seed(seed)
    if kind == "ours":
        model = biart.BiART(cfg).to(device)
        opt = model.configure_optimizers(0.01, 1e-4, (0.9, 0.95), 1e-8, device.type)
    elif kind == "baseline":
        model = BaselineGPT(cfg).to(device)
        opt = model.configure_optimizers(0.01, 1e-4, (0.9, 0.95))
    else:
        raise ValueError(f"unknown trainer {kind!r}")
    model.train()
    fwd = torch.compile(model) if compile_model else model
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
           else contextlib.nullcontext())
    text, image = fake_batch(cfg, batch, seed)
    batches = [tuple(t.to(device) for t in biart.build_sequence(text, image, d, cfg)) for d in biart.DIRECTIONS]
    state = {"step": 0, "losses": []}

    def step():
        idx, seg, targets = batches[state["step"] % 2]
        with ctx:
            loss = fwd(idx, seg, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(float(loss.detach()))
    step.state = state
    return step, model


# -----------------------------------------------------------------------------------------
# row 2: sampling

def recompute_step(model: biart.BiART, idx: torch.Tensor, seg: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One iteration of BiART.generate_nocache for text->image: the whole sequence through the
    model, one image token drawn from the last position. (B, T) -> (B,) model ids."""
    h = model._trunk(idx, seg)[:, -1]  # (B, C)
    return model._sample(h, "image", 1.0, None, None, generator)


def cached_step(model: biart.BiART, tok: torch.Tensor, caches: list, pos: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """One iteration of BiART.generate's loop for text->image: the last token (B,) in at position
    `pos` against the KV cache, the next image token (B,) out."""
    seg = torch.full_like(tok[:, None], biart.GEN)
    h = model._trunk(tok[:, None], seg, caches, pos=pos, direction="t2i")[:, -1]  # (B, C)
    return model._sample(h, "image", 1.0, None, None, generator)


def prefill(model: biart.BiART, idx: torch.Tensor, seg: torch.Tensor) -> tuple[list, torch.Tensor]:
    """generate's first step: fresh KV caches filled with idx (B, T) -> (caches, (B, C) last hidden state)."""
    caches = [biart.KVCache(model.config.block_size) for _ in range(model.config.n_layer)]
    return caches, model._trunk(idx, seg, caches, pos=0)[:, -1]


def sample_by_cache(model: biart.BiART, text: torch.Tensor, length: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """text->image by prefill + cached_step (tests: equals generate for a seed)."""
    idx, seg = biart._prefix(text, "t2i", model.config)
    caches, h = prefill(model, idx, seg)
    out = [model._sample(h, "image", 1.0, None, None, generator)]
    for t in range(1, length):
        out.append(cached_step(model, out[-1], caches, idx.size(1) + t - 1, generator))
    return torch.stack(out, 1)


def sample_by_recompute(model: biart.BiART, text: torch.Tensor, length: int,
                        generator: torch.Generator | None) -> torch.Tensor:
    """text->image by recompute_step, token after token (tests: equals generate for a seed)."""
    idx, seg = biart._prefix(text, "t2i", model.config)
    out = []
    for _ in range(length):
        tok = recompute_step(model, idx, seg, generator)
        out.append(tok)
        idx = torch.cat([idx, tok[:, None]], dim=1)
        seg = torch.cat([seg, torch.full_like(tok[:, None], biart.GEN)], dim=1)
    return torch.stack(out, 1)


def sum_of_quadratic(ts: list, secs: list, length: int) -> float:
    """Fit seconds(t) = a + b t + c t^2 through the measured steps (exact for 3 points) and sum
    it over t = 0 .. length - 1. A recompute step at position t runs t + prefix tokens through
    the model: linear layers cost O(t), attention O(t^2)."""
    deg = min(2, len(ts) - 1)
    coef = np.polyfit(np.asarray(ts, dtype=np.float64), np.asarray(secs, dtype=np.float64), deg)
    return float(np.polyval(coef, np.arange(length, dtype=np.float64)).sum())


# -----------------------------------------------------------------------------------------
# row 3 reference: the one-hot quantizer step

@torch.no_grad()
def onehot_quantizer_step(vq: augvae.EMAQuantizer, z: torch.Tensor) -> tuple:
    """EMAQuantizer's training-mode forward written the straightforward way (rosinality's
    vqvae.py): the whole N x K distance matrix at once and an N x K one-hot whose column sums are
    the counts and whose product with the inputs is the per-code sums. The distance arithmetic and
    the EMA update are EMAQuantizer's, so indices and statistics must come out identical.
    -> (z_q, loss, indices (B, H, W), counts (K,))."""
    z = z.float()
    B, D, H, W = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
    e = vq.embed
    dist = torch.addmm((e * e).sum(1), flat, e.t(), alpha=-2.0)  # (N, K)
    idx = dist.min(1).indices  # (N,)
    onehot = F.one_hot(idx, vq.K).type(flat.dtype)  # (N, K)
    counts = onehot.sum(0)  # (K,)
    sums = onehot.t() @ flat  # (K, D)
    d = vq.decay
    vq.cluster_size.mul_(d).add_(counts, alpha=1 - d)
    vq.embed_sum.mul_(d).add_(sums, alpha=1 - d)
    n = vq.cluster_size.sum()
    smoothed = (vq.cluster_size + vq.eps) / (n + vq.K * vq.eps) * n
    vq.embed.copy_(vq.embed_sum / smoothed[:, None])
    vq.unused.add_(1).masked_fill_(counts > 0, 0)
    vq.updates.add_(1)
    q = F.embedding(idx, vq.embed).view(B, H, W, D).permute(0, 3, 1, 2)
    loss = vq.beta * F.mse_loss(z, q)
    return z + (q - z), loss, idx.view(B, H, W), counts


def make_quantizer(shape: list, codes: int, chunk: int, device: torch.device, seed: int = 0) -> tuple:
    """-> (EMAQuantizer in training mode with a set codebook, input z). z lies on a 1/16 grid in
    [-2, 2], so every per-code sum is exact in fp32 whatever the order of summation: the one-hot
    matmul and index_add_ then give bit-identical statistics (with arbitrary inputs they differ in
    the last bits, by summation order only)."""
    B, D, H, W = shape
    cfg = augvae.AugVAEConfig(codebook_size=codes, z_channels=D, distance_chunk=chunk)
    g = torch.Generator().manual_seed(seed)
    vq = augvae.EMAQuantizer(cfg)
    with torch.no_grad():
        vq.embed.copy_(torch.randn(codes, D, generator=g))
        vq.embed_sum.copy_(vq.embed)
        vq.cluster_size.fill_(1.0)
        vq.initted.fill_(True)
    z = torch.randint(-32, 33, (B, D, H, W), generator=g).float() / 16
    return vq.to(device).train(), z.to(device)


def quantizer_state(vq: augvae.EMAQuantizer) -> dict:
    return {k: v.detach().cpu().clone() for k, v in vq.state_dict().items()}


# -----------------------------------------------------------------------------------------
# row 5: synthetic captions, and OpenAI CLIP's tokenizer as the reference

BENCH_SUBJECTS = ["a man", "a woman", "two men", "a young boy", "a little girl", "a group of people", "a dog",
                  "a black cat", "a brown horse", "an elephant", "three zebras", "a giraffe", "a person",
                  "a couple", "a baseball player", "a tennis player", "a skier", "a surfer", "a chef", "a bus",
                  "a red truck", "a white plate", "a train", "a large airplane", "a kitchen", "a bathroom"]
BENCH_VERBS = ["riding", "holding", "sitting on", "standing next to", "walking down", "looking at", "eating",
               "playing with", "parked in front of", "flying over", "lying on", "carrying", "throwing",
               "swinging", "cutting", "filled with", "covered in", "waiting at", "crossing", "jumping over"]
BENCH_ADJECTIVES = ["red", "blue", "green", "small", "large", "old", "wooden", "white", "black", "yellow",
                    "tall", "empty", "crowded", "colorful", "dirty", "shiny", "striped", "fluffy", "tiny"]
BENCH_NOUNS = ["surfboard", "skateboard", "umbrella", "pizza", "sandwich", "frisbee", "kite", "bench",
               "table", "street", "field", "beach", "bed", "couch", "laptop", "cake", "banana", "bottle",
               "clock", "fence", "bridge", "building", "window", "mirror", "toilet", "sink", "snow", "wave"]
BENCH_TAILS = ["near the water", "in a park", "on a sunny day", "at night", "in the background",
               "while people watch", "next to a building", "on the side of the road", "in a kitchen",
               "with trees behind it", "during a game", "in front of a crowd", "at the beach"]
BENCH_SYLLABLES = ["ba", "ro", "ki", "ten", "mor", "ly", "gan", "del", "pha", "stri", "quo", "vel", "zu",
                   "nix", "par", "shi", "tor", "wen", "cla", "dre"]


def bench_captions(count: int, seed: int = 0) -> list[str]:
    """Deterministic COCO-style captions, 8-20 words; ~10% of nouns come from a long Zipf tail of
    made-up words, so the word cache sees misses as on real data."""
    rng = random.Random(seed)
    rare = sorted({"".join(rng.choices(BENCH_SYLLABLES, k=rng.randint(2, 4))) for _ in range(20000)})
    rare_cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(rare))))  # Zipf

    def noun():
        if rng.random() < 0.1:
            return rng.choices(rare, cum_weights=rare_cum_weights)[0]
        return rng.choice(BENCH_NOUNS)

    captions = []
    for _ in range(count):
        target = rng.randint(8, 20)
        words = f"{rng.choice(BENCH_SUBJECTS)} {rng.choice(BENCH_VERBS)} a {rng.choice(BENCH_ADJECTIVES)} {noun()}".split()
        while len(words) < target:
            extra = rng.choice([rng.choice(BENCH_TAILS), f"and a {rng.choice(BENCH_ADJECTIVES)} {noun()}",
                                f"with {rng.randint(2, 12)} {noun()}s", f"beside the {noun()}'s {noun()}"])
            words += extra.split()
        caption = " ".join(words[:target])
        captions.append(caption[0].upper() + caption[1:] + rng.choice([".", ".", "", " ."]))
    return captions


def reference_path() -> str | None:
    """OpenAI CLIP's simple_tokenizer.py, the reference tokenizer.py is checked against (row 5,
    tests/test_tokenizer_parity.py): CLIP_REF_TOKENIZER=/path/to/simple_tokenizer.py, or an
    installed `clip` package (`pip install --no-deps clip-anytorch==2.6.0`), located without
    importing it (its __init__ imports torchvision). None when neither is there."""
    path = os.environ.get("CLIP_REF_TOKENIZER")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP_REF_TOKENIZER={path} is not a file")
        return path
    spec = importlib.util.find_spec("clip")  # a top-level lookup: the package is not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "simple_tokenizer.py")
        if os.path.isfile(candidate):
            return candidate
    return None


def load_reference(path: str):
    """CLIP's SimpleTokenizer from the file at `path` (see reference_path), on CLIP's merges."""
    spec = importlib.util.spec_from_file_location("clip_reference_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(tokenizer.default_bpe_path())


# -----------------------------------------------------------------------------------------
# the measurements: each `*_part` runs in its own process (see Runner) and returns plain JSON

def peak_part(device: str, sizes: list, repeats: int) -> dict:
    """Best FLOP/s of torch.mm, F.linear and torch.matmul on square fp32 and bf16 matrices: the
    paths can reach different library kernels (2x apart on some CPUs), and the peak is the best
    of them, from the fastest of `repeats` runs (a capability: the median would let the load of
    other processes lower it and flatter the MFU). On CUDA fp32 means TF32 tensor cores, as the
    training scripts allow them."""
    dev = torch.device(device)
    out = {}
    for dtype in ("float32", "bfloat16"):
        dt = getattr(torch, dtype)
        paths, loads = {}, []
        for n in sizes:
            g = torch.Generator().manual_seed(n)
            a = torch.randn(n, n, generator=g).to(dev, dt)
            b = torch.randn(n, n, generator=g).to(dev, dt)
            for name, fn in (("torch.mm", lambda: torch.mm(a, b)), ("F.linear", lambda: F.linear(a, b)),
                             ("torch.matmul", lambda: torch.matmul(a, b))):
                r = measure(fn, dev, repeats, warm=fn, time_first=True, memory=False)
                gflops = 2 * n ** 3 / min(r["times"]) / 1e9  # a peak: the best run, not the median
                loads += r["load"]
                if gflops > paths.get(name, {}).get("gflops", 0):
                    paths[name] = {"gflops": gflops, "size": n}
        best = max(paths, key=lambda k: paths[k]["gflops"])
        out[dtype] = {"paths": paths, "best_path": best, "best_gflops": paths[best]["gflops"], "load": loads}
    return out


def train_part(device: str, kind: str, preset: str, overrides: dict, batch: int, dtype: str,
               repeats: int, compile_model: bool = False) -> dict:
    dev = torch.device(device)
    cfg = biart.BiARTConfig.preset(preset, **overrides)
    step, model = make_trainer(kind, cfg, batch, dtype, dev, compile_model)
    warm_t0 = time.perf_counter()
    step()  # creates the optimizer state (and compiles)
    if compile_model:
        step()  # the other direction (a recompile, if any)
    sync(dev)
    warm_s = time.perf_counter() - warm_t0
    r = measure(step, dev, repeats, memory=False, time_first=True)
    tokens = batch * (cfg.block_size - 1)
    flops = batch * train_flops_per_sequence(cfg, kind)
    return {**r, "tokens_per_s": tokens / r["median"], "flops_per_token": flops / tokens,
            "model_gflops_per_s": flops / r["median"] / 1e9, "warm_s": warm_s,
            "params": sum(p.numel() for p in model.parameters()), "first_loss": step.state["losses"][0]}


def sample_part(device: str, mode: str, preset: str, overrides: dict, batch: int, length: int,
                repeats: int, points: int = 3, check_tokens: int = 0, end_to_end: bool = False) -> dict:
    """Seconds to sample `length` image tokens for a batch of captions, as the sum of its steps.
    A step is timed (median of `repeats`) at `points` positions from the first to the last and
    the seconds of all steps are the sum of the quadratic through them (sum_of_quadratic): a
    cached step costs O(t) at position t (attention over the cache), a recompute step O(t) + O(t^2).
    Running all 1,024 recompute steps at batch 16 would take an hour on a CPU; both modes are
    measured the same way.
    mode 'cache': the loop body of BiART.generate (cached_step) after the real prefill, plus that
    prefill; peak memory of the (cold) prefill and first step, which allocate the whole cache,
    with the cache positions the remaining steps write touched (an untouched page is not resident);
    with end_to_end, also one whole BiART.generate call, timed, to check the sum of steps; and a
    check that generate and generate_nocache give the same tokens.
    mode 'recompute': the loop body of BiART.generate_nocache (recompute_step); peak memory of
    its longest step."""
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = biart.BiARTConfig.preset(preset, **overrides)
    model = biart.BiART(cfg).to(dev).eval()
    text, _ = fake_batch(cfg, batch, seed=1)
    text = text.to(dev)
    g = torch.Generator(device=dev)
    prefix, prefix_seg = biart._prefix(text, "t2i", cfg)
    P = prefix.size(1)
    image = torch.randint(0, cfg.image_vocab, (batch, length), generator=torch.Generator().manual_seed(2)).to(dev)
    seq = torch.cat([prefix, image], 1)  # (B, P + length): what a sampler would have built
    seq_seg = torch.cat([prefix_seg, torch.full_like(image, biart.GEN)], 1)
    out, loads = {}, []
    if mode == "cache":
        with torch.no_grad(), MemoryProbe(dev) as probe:  # generate's first steps, cold: the cache appears
            caches, h = prefill(model, prefix, prefix_seg)
            tok = model._sample(h, "image", 1.0, None, None, g)
            cached_step(model, tok, caches, P, g)
            for c in caches:  # the positions the remaining steps write: their pages become resident then
                c.k[:, :, P + 1:P + length - 1].zero_()
                c.v[:, :, P + 1:P + length - 1].zero_()
            del caches, h
        out.update(peak_bytes=probe.peak, memory_method=probe.method)
        if end_to_end:
            with LoadMeter() as lm:
                t0 = time.perf_counter()
                model.generate(text, "t2i", length=length, generator=g.manual_seed(0))
                sync(dev)
                out["end_to_end_seconds"] = time.perf_counter() - t0
            out["end_to_end_load"] = lm.others
        with torch.no_grad():
            def first():  # generate's prefill and first draw
                model._sample(prefill(model, prefix, prefix_seg)[1], "image", 1.0, None, None, g)
            r = measure(first, dev, repeats, memory=False)
            out["prefill_seconds"], loads = r["median"], r["load"]
            ts = sorted({1 + round(i * (length - 2) / max(points - 1, 1)) for i in range(points)}) if length > 1 else []
            step_s = []
            for t in ts:  # the step that draws image token t feeds token t - 1 at position P + t - 1
                caches, _ = prefill(model, seq[:, :P + t - 1], seq_seg[:, :P + t - 1])
                tok = seq[:, P + t - 1]
                r = measure(lambda: cached_step(model, tok, caches, P + t - 1, g), dev, repeats, memory=False)
                step_s.append(r["median"])
                loads += r["load"]
                del caches
        steps = sum_of_quadratic([t - 1 for t in ts], step_s, length - 1) if ts else 0.0
        seconds = out["prefill_seconds"] + steps
        if check_tokens:
            n = min(check_tokens, length)
            a = model.generate(text, "t2i", length=n, generator=g.manual_seed(1))
            b = model.generate_nocache(text, "t2i", length=n, generator=g.manual_seed(1))
            out["identical"], out["checked_tokens"] = bool(torch.equal(a, b)), int(a.numel())
    elif mode == "recompute":
        ts = sorted({round(i * (length - 1) / max(points - 1, 1)) for i in range(points)})
        step_s = []
        with torch.no_grad():
            for t in ts:  # the step that draws image token t runs the prefix and t image tokens
                idx, seg = seq[:, :P + t], seq_seg[:, :P + t]
                r = measure(lambda: recompute_step(model, idx, seg, g), dev, repeats, time_first="auto",
                            memory=t == ts[-1])
                step_s.append(r["median"])
                loads += r["load"]
                if t == ts[-1]:
                    out.update(peak_bytes=r["peak_bytes"], memory_method=r["memory_method"])
        seconds = sum_of_quadratic(ts, step_s, length)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return {**out, "points": ts, "step_seconds": step_s, "seconds": seconds,
            "tokens_per_s": batch * length / seconds, "load": loads}


def quantizer_part(device: str, kind: str, shape: list, codes: int, chunk: int, repeats: int,
                   save: str = "") -> dict:
    """Time the training-mode step; `save`: write the first call's indices, counts, outputs and
    the quantizer state after it, for the identity check."""
    dev = torch.device(device)
    vq, z = make_quantizer(shape, codes, chunk, dev)
    if kind == "ours":
        fn = lambda: vq(z)  # noqa: E731
    elif kind == "reference":
        fn = lambda: onehot_quantizer_step(vq, z)  # noqa: E731
    else:
        raise ValueError(f"unknown quantizer {kind!r}")
    with MemoryProbe(dev) as probe:  # the first (cold) call: its peak; not timed
        res = fn()
    if save:
        counts = res[3]["counts"] if kind == "ours" else res[3]
        torch.save({"z_q": res[0].detach().cpu(), "loss": res[1].detach().cpu(), "indices": res[2].cpu(),
                    "counts": counts.cpu(), "state": quantizer_state(vq)}, save)
    del res
    r = measure(fn, dev, repeats, memory=False, time_first=True)
    return {**r, "seconds": r["median"], "peak_bytes": probe.peak, "memory_method": probe.method}


def vae_part(device: str, op: str, preset: str, overrides: dict, batch: int, dtype: str, repeats: int) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = augvae.AugVAE(augvae.preset(preset, single_level=True, **overrides)).to(dev).eval()
    cfg = model.cfg
    g = cfg.grid(cfg.token_level)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1).to(dev)
    tokens = torch.randint(0, cfg.codebook_size, (batch, g, g), generator=gen).to(dev)
    ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext())
    if op not in ("encode", "decode"):
        raise ValueError(f"unknown AugVAE op {op!r}")

    def run():
        with ctx, torch.no_grad():
            return model.encode(x) if op == "encode" else model.decode(tokens)
    r = measure(run, dev, repeats, time_first="auto")  # the cold call counts only when it is long
    return {**r, "images_per_s": batch / r["median"],
            "params": sum(p.numel() for p in model.parameters())}


# the demo's three trained models at its sizes: AugVAE small ML and SL at 64 px (batch 32, MSE +
# commitment: the demo has no LPIPS weights), BiART small (4 x 256, 600 text ids, 24 text + 64 image
# tokens, batch 32), as `python demo.py` trains them
DEMO_BIART = dict(text_vocab=600, text_len=24)


def demo_stage_part(device: str, stage: str, dtype: str, repeats: int, batch: int = 32) -> dict:
    """Seconds per training step (forward, backward, AdamW) of one demo stage under `dtype`."""
    dev = torch.device(device)
    if stage == "gpt":
        step, model = make_trainer("ours", biart.BiARTConfig.preset("small", **DEMO_BIART), batch, dtype, dev)
    elif stage in ("vae_ml", "vae_sl"):
        torch.manual_seed(0)
        model = augvae.AugVAE(augvae.preset("small", single_level=stage == "vae_sl")).to(dev).train()
        x = torch.stack([data.ShapesDataset("train", batch, model.cfg.image_size)[i] for i in range(batch)]).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

        def step():
            with ctx:
                recon, commit, _ = model(x)
            loss = F.mse_loss(recon.float(), x) + commit
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown demo stage {stage!r}")
    step()  # optimizer state, codebook init
    r = measure(step, dev, repeats, memory=False, time_first=True)
    return {**r, "step_s": r["median"], "params": sum(p.numel() for p in model.parameters())}


def tokenizer_part(device: str, kind: str, count: int, repeats: int, dropout: float = 0.0) -> dict:
    """captions/s of a fresh tokenizer (cold word cache) encoding `count` COCO-style captions
    (bench_captions); ours with BPE-dropout `dropout` > 0 draws from a fresh random.Random(0) each
    run and caches nothing. Also the mean words and tokens per caption."""
    captions = bench_captions(count)
    if kind == "ours":
        make = tokenizer.Tokenizer
    elif kind == "clip":
        if dropout:
            raise ValueError("CLIP's simple_tokenizer has no BPE-dropout")
        path = reference_path()
        if path is None:
            return {"skipped": "OpenAI CLIP's simple_tokenizer.py not found (pip install --no-deps "
                               "clip-anytorch==2.6.0, or set CLIP_REF_TOKENIZER)"}
        make = lambda: load_reference(path)  # noqa: E731
    else:
        raise ValueError(f"unknown tokenizer {kind!r}")
    state = {}

    def run():
        tok = make()
        if dropout:
            rng = random.Random(0)
            state["tokens"] = sum(len(tok.encode(c, dropout=dropout, rng=rng)) for c in captions)
        else:
            state["tokens"] = sum(len(tok.encode(c)) for c in captions)
    r = measure(run, torch.device("cpu"), repeats, memory=False)  # the first run is not timed
    return {**r, "captions_per_s": count / r["median"], "tokens_per_caption": state["tokens"] / count,
            "words_per_caption": sum(len(c.split()) for c in captions) / count}


def prepare_part(device: str, images: int, per_shard: int, batch: int, workers: int, repeats: int,
                 warm: bool = True) -> dict:
    """Images/s through `python prepare.py` (its own "done in" time: reading, decoding, encoding,
    writing; not the interpreter's start) from `images` 256 px JPEG shapes, as tar shards of
    `per_shard` samples and as a jsonl caption file over a folder of the same files, the two
    runs alternating (after a warm-up of each that fills the page cache), encoded by a random
    small-preset AugVAE-SL (64 px: the encoder is cheap, so reading is a large share)."""
    import io
    import tarfile
    from PIL import Image
    import shapes
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = augvae.preset("small", single_level=True)
        vae = os.path.join(tmp, "vae.pt")
        runtime.save_checkpoint({"kind": augvae.CHECKPOINT_KIND, "format_version": runtime.CHECKPOINT_FORMAT,
                                 "config": cfg.to_dict(), "model": augvae.AugVAE(cfg).state_dict(), "step": 0}, vae)
        os.makedirs(os.path.join(tmp, "images"))
        lines, tar = [], None
        for i in range(images):
            ex = shapes.shapes_example(i, "train", 256, 1, 0)
            buf = io.BytesIO()
            Image.fromarray(ex.image, "RGB").save(buf, format="JPEG", quality=90)
            jpg, key = buf.getvalue(), f"{i:09d}"
            with open(os.path.join(tmp, "images", key + ".jpg"), "wb") as f:
                f.write(jpg)
            lines.append(json.dumps({"image": f"images/{key}.jpg", "caption": ex.captions[0]}))
            if i % per_shard == 0:
                tar = tarfile.open(os.path.join(tmp, f"{i // per_shard:05d}.tar"), "w")
            for name, content in ((key + ".jpg", jpg), (key + ".txt", ex.captions[0].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            if i % per_shard == per_shard - 1 or i == images - 1:
                tar.close()
        with open(os.path.join(tmp, "captions.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
        inputs = {"shards": ["--source", "shards", "--shards", os.path.join(tmp, "*.tar")],
                  "folder": ["--source", "jsonl", "--captions", os.path.join(tmp, "captions.jsonl")]}
        secs, load = {k: [] for k in inputs}, {k: [] for k in inputs}
        for r in range(int(not warm), repeats + 1):  # run 0 warms the page cache
            for kind, args in inputs.items():
                out = os.path.join(tmp, f"out_{kind}{r}")
                cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), "--vae", vae, "--out", out, *args,
                       "--val-fraction", "0.01", "--batch-size", str(batch), "--workers", str(workers),
                       "--device", device]
                with LoadMeter() as lm:
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if p.returncode != 0:
                    raise RuntimeError(f"prepare.py failed: {p.stderr[-2000:]}")
                with open(os.path.join(out, "log.txt")) as f:
                    done = [l for l in f.read().splitlines() if l.startswith("done in ")]
                if r:
                    secs[kind].append(float(done[-1].split()[2]))
                    load[kind].append(lm.others)
    return {k: {"seconds": statistics.median(v), "runs": v, "images_per_s": images / statistics.median(v),
                "load": load[k]} for k, v in secs.items()}

PARTS = {"peak": peak_part, "train": train_part, "sample": sample_part, "quantizer": quantizer_part,
         "vae": vae_part, "tokenizer": tokenizer_part, "demo_stage": demo_stage_part, "prepare": prepare_part}


def worker_main(name: str, spec: dict, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    if spec.get("device", "cpu").startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as runtime.start_processes does for training
        torch.backends.cudnn.allow_tf32 = True
    result = PARTS[name](**spec)
    result["threads"] = torch.get_num_threads()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class Runner:
    """Runs parts in fresh processes (or in this one with in_process=True, for tests)."""

    def __init__(self, threads: int, in_process: bool, log=print):
        self.threads, self.in_process, self.log = threads, in_process, log

    def __call__(self, name: str, **spec) -> dict:
        t0 = time.perf_counter()
        if self.in_process:
            result = PARTS[name](**spec)
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", json.dumps(spec),
                   "--threads", str(self.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in r.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
            if r.returncode != 0 or not lines:
                raise RuntimeError(f"bench part {name} {spec} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
            result = json.loads(lines[-1][len(RESULT_PREFIX):])
        self.log(f"  {name} {json.dumps({k: v for k, v in spec.items() if k != 'device'})}: "
                 f"{time.perf_counter() - t0:.1f} s")
        return result


# -----------------------------------------------------------------------------------------
# the rows

def fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / MIB:.0f} MiB"


def fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def compare_quantizer(a: dict, b: dict) -> dict:
    state = all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    return {"indices": bool(torch.equal(a["indices"], b["indices"])), "counts": bool(torch.equal(a["counts"], b["counts"])),
            "state": state, "z_q": bool(torch.equal(a["z_q"], b["z_q"])),
            "loss_abs_diff": float((a["loss"] - b["loss"]).abs())}


def e2e_row(path: str, run: bool, timeout: float = 3600) -> dict:
    """Row 6 from `path` (demo.py's results.json, key 'seconds'); with run=True, first run
    `python demo.py` in a subprocess and time it."""
    res = {}
    if run:
        demo = os.path.join(ROOT, "demo.py")
        if not os.path.isfile(demo):
            return {"status": "demo.py not found"}
        with LoadMeter() as lm:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, demo], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            res["measured_s"] = time.perf_counter() - t0
        res["load"] = [lm.others]  # demo.py's own CPU counts as this process's children, not as others
        if r.returncode != 0:
            res["status"] = f"python demo.py failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"
            return res
    if not os.path.isfile(path):
        res.setdefault("status", f"the demo has not been run ({path} does not exist; `python demo.py` "
                                 "writes it, or pass --e2e)")
        return res
    with open(path) as f:
        doc = json.load(f)
    if "seconds" not in doc:
        res["status"] = f"{path} has no 'seconds'"
        return res
    res.update(seconds=float(doc["seconds"]), status=f"read from {path}" + (" after a timed run" if run else ""),
               mtime=time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path))))
    return res


class Rows:
    """What every row needs: the settings, the process runner, the table, JSON figures and notes."""

    def __init__(self, mode: str, device: torch.device, threads: int, in_process: bool, log=print):
        self.S = dict(SETTINGS[mode])
        if device.type == "cuda" and mode != "tiny":
            self.S.update(CUDA_SETTINGS)
        self.run = Runner(threads, in_process, log)
        self.dev = str(device)
        self.reps = self.S["repeats"]
        self.machine = runtime.machine(device)
        if threads:
            self.machine["threads"] = threads
        self.fp32_name = "fp32 (TF32)" if device.type == "cuda" else "fp32"
        self.log = log
        self.compile_model = False
        self.table, self.notes = [], []
        self.J = {"mfu": None, "sampling_cache_speedup": None, "quantizer_speedup": None,
                  "quantizer_memory_ratio": None}

    def add(self, row, what, ours, baseline, ratio, memory, load, settings):
        self.table.append(dict(row=row, what=what, ours=ours, baseline=baseline, ratio=ratio, memory=memory,
                               load=load, machine=machine_short(self.machine), settings=settings))

def row_train(c: Rows) -> None:
    """Row 1: peak matmul and BiART training (rows 1, 1b, 1c, 1d)."""
    S, run, dev, reps, add, J, notes, fp32_name = c.S, c.run, c.dev, c.reps, c.add, c.J, c.notes, c.fp32_name
    c.log("row 1: peak matmul, BiART training")
    peak = run("peak", device=dev, sizes=S["peak_sizes"], repeats=reps)
    p32, p16 = peak["float32"], peak["bfloat16"]
    J["peak_gflops"] = {k: {p: v["gflops"] for p, v in peak[k]["paths"].items()} for k in ("float32", "bfloat16")}
    notes.append("peak matmul GFLOP/s (best size of " + ", ".join(map(str, S["peak_sizes"])) + "): "
                 + "; ".join(f"{'fp32' if k == 'float32' else 'bf16'}: " + ", ".join(
                     f"{p} {v['gflops']:.0f}" for p, v in peak[k]["paths"].items()) for k in ("float32", "bfloat16"))
                 + f" (load {fmt_load(mean_load(p32, p16))}).")
    tr = dict(device=dev, preset=S["train_preset"], overrides=S["train_overrides"], batch=S["train_batch"],
              repeats=reps)
    ours = run("train", kind="ours", dtype="float32", **tr)
    base = run("train", kind="baseline", dtype="float32", **tr)
    bf16 = run("train", kind="ours", dtype="bfloat16", **tr)
    cfg = biart.BiARTConfig.preset(S["train_preset"], **S["train_overrides"])
    size = (f"{cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, vocab {cfg.vocab_size:,}, T {cfg.block_size - 1:,}, "
            f"batch {S['train_batch']}, dropout {cfg.dropout}, {ours['params'] / 1e6:.1f}M params")
    mfu = ours["model_gflops_per_s"] / p32["best_gflops"]
    mfu_base = base["model_gflops_per_s"] / p32["best_gflops"]
    mfu16 = bf16["model_gflops_per_s"] / p16["best_gflops"]
    add("1", f"BiART training tokens/s, {fp32_name}",
        f"{ours['tokens_per_s']:,.0f} tok/s, MFU {100 * mfu:.0f}%",
        f"minGPT-style: {base['tokens_per_s']:,.0f} tok/s (its MFU {100 * mfu_base:.0f}%)",
        f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}x", "",
        fmt_load(mean_load(ours, base)),
        f"{size}; step = fwd+bwd+clip+AdamW; MFU = {ours['flops_per_token'] / 1e6:.0f} MFLOP/token "
        f"x tok/s / peak {p32['best_gflops']:.0f} GFLOP/s ({p32['best_path']}); baseline "
        f"{base['flops_per_token'] / 1e6:.0f} MFLOP/token")
    add("1b", "BiART training tokens/s, bf16 autocast",
        f"{bf16['tokens_per_s']:,.0f} tok/s, MFU {100 * mfu16:.0f}% of bf16 peak",
        f"ours {fp32_name}: {ours['tokens_per_s']:,.0f} tok/s", f"{bf16['tokens_per_s'] / ours['tokens_per_s']:.2f}x",
        "", fmt_load(mean_load(bf16)),
        f"same; bf16 peak {p16['best_gflops']:.0f} GFLOP/s ({p16['best_path']})")
    J.update(mfu=mfu, mfu_bf16=mfu16, train_tokens_per_s=ours["tokens_per_s"],
             baseline_tokens_per_s=base["tokens_per_s"], baseline_mfu=mfu_base,
             train_speedup=ours["tokens_per_s"] / base["tokens_per_s"],
             train_bf16_tokens_per_s=bf16["tokens_per_s"], train_step_seconds=ours["median"],
             baseline_step_seconds=base["median"], train_flops_per_token=ours["flops_per_token"])
    notes.append(f"row 1 losses at the first step (same init seed, different formulations): ours "
                 f"{ours['first_loss']:.4f}, baseline {base['first_loss']:.4f}; per-step seconds ours "
                 f"{[round(t, 3) for t in ours['times']]}, baseline {[round(t, 3) for t in base['times']]}.")
    if c.compile_model:
        comp = run("train", kind="ours", dtype="float32", compile_model=True, **tr)
        add("1c", f"BiART training tokens/s, torch.compile, {fp32_name}",
            f"{comp['tokens_per_s']:,.0f} tok/s, MFU {100 * comp['model_gflops_per_s'] / p32['best_gflops']:.0f}%",
            f"ours eager: {ours['tokens_per_s']:,.0f} tok/s", f"{comp['tokens_per_s'] / ours['tokens_per_s']:.2f}x",
            "", fmt_load(mean_load(comp)), f"same; the first two steps (compiling) took {comp['warm_s']:.0f} s")
        J.update(compile_tokens_per_s=comp["tokens_per_s"], compile_seconds=comp["warm_s"])
    if S["train_dropout_row"]:
        drop = run("train", kind="ours", dtype="float32",
                   **{**tr, "overrides": {**S["train_overrides"], "dropout": 0.1}})
        add("1d", f"BiART training tokens/s, dropout 0.1 (the preset's), {fp32_name}",
            f"{drop['tokens_per_s']:,.0f} tok/s", f"ours dropout 0: {ours['tokens_per_s']:,.0f} tok/s",
            f"{drop['tokens_per_s'] / ours['tokens_per_s']:.2f}x", "", fmt_load(mean_load(drop)),
            "same; attention dropout leaves SDPA's fused kernel on CPU (CUDA's flash kernel has dropout)")
        J["train_dropout01_tokens_per_s"] = drop["tokens_per_s"]


def row_sampling(c: Rows) -> None:
    """Row 2: text->image sampling, KV cache against recompute."""
    S, run, dev, reps, add, J, notes = c.S, c.run, c.dev, c.reps, c.add, c.J, c.notes
    c.log("row 2: sampling")
    cfg = biart.BiARTConfig.preset(S["sample_preset"], **S["sample_overrides"])
    length = min(S["sample_length"], cfg.image_len)
    for b in S["sample_batches"]:
        sp = dict(device=dev, preset=S["sample_preset"], overrides=S["sample_overrides"], batch=b, length=length,
                  repeats=reps)
        e2e = b == min(S["sample_batches"])  # one whole generate() call checks the sum of steps
        cache = run("sample", mode="cache", points=S["sample_points"], check_tokens=S["check_tokens"],
                    end_to_end=e2e, **sp)
        rec = run("sample", mode="recompute", points=S["sample_points"], **sp)
        speedup = rec["seconds"] / cache["seconds"]
        e2e_speedup = rec["seconds"] / cache["end_to_end_seconds"] if e2e else None
        add("2", f"text->image sampling, batch {b}",
            f"KV cache {cache['tokens_per_s']:,.1f} img tok/s ({cache['seconds']:.1f} s"
            + (f"; one whole generate() call: {cache['end_to_end_seconds']:.1f} s)" if e2e else ")"),
            f"recompute {rec['tokens_per_s']:,.2f} img tok/s ({rec['seconds']:.0f} s)",
            f"{speedup:.1f}x" + (f" ({e2e_speedup:.1f}x by the whole call)" if e2e else ""),
            f"{fmt_bytes(cache['peak_bytes'])} / {fmt_bytes(rec['peak_bytes'])}",
            fmt_load(mean_load(cache, rec)),
            f"{cfg.n_layer}x{cfg.n_embd}, {cfg.text_len} text + {length} of {cfg.image_len} image tokens, fp32, "
            f"multinomial over the image ids; seconds = sum of steps timed at {len(rec['points'])} positions "
            f"(sum_of_quadratic), same method for both")
        key = "sampling_cache_speedup" if b == max(S["sample_batches"]) else f"sampling_cache_speedup_b{b}"
        J[key] = speedup
        J[f"sampling_b{b}"] = {
            "cache_tokens_per_s": cache["tokens_per_s"], "recompute_tokens_per_s": rec["tokens_per_s"],
            "cache_seconds": cache["seconds"], "cache_end_to_end_seconds": cache.get("end_to_end_seconds"),
            "recompute_seconds": rec["seconds"], "speedup": speedup, "speedup_end_to_end": e2e_speedup,
            "cache_peak_bytes": cache["peak_bytes"], "recompute_peak_bytes": rec["peak_bytes"],
            "cache_prefill_seconds": cache["prefill_seconds"],
            "cache_step_seconds": dict(zip(map(str, cache["points"]), cache["step_seconds"])),
            "recompute_step_seconds": dict(zip(map(str, rec["points"]), rec["step_seconds"])),
            "identical_tokens": cache.get("identical")}
        notes.append(f"row 2 batch {b}: cached and recompute sampling gave "
                     f"{'identical' if cache.get('identical') else 'DIFFERENT'} tokens ("
                     f"the first {min(S['check_tokens'], length)} of each of {b} rows, same seed); seconds per "
                     f"step at image token t: cache (prefill {cache['prefill_seconds']:.3f}) "
                     + ", ".join(f"{t}: {x:.4f}" for t, x in zip(cache["points"], cache["step_seconds"]))
                     + "; recompute " + ", ".join(f"{t}: {x:.3f}" for t, x in zip(rec["points"], rec["step_seconds"]))
                     + ".")


def row_quantizer(c: Rows) -> None:
    """Row 3: the EMA quantizer's step against the one-hot formulation."""
    S, run, dev, reps, add, J = c.S, c.run, c.dev, c.reps, c.add, c.J
    c.log("row 3: quantizer")
    with tempfile.TemporaryDirectory() as tmp:
        qp = dict(device=dev, shape=S["quant_shape"], codes=S["quant_codes"], chunk=S["quant_chunk"], repeats=reps)
        ours = run("quantizer", kind="ours", save=os.path.join(tmp, "ours.pt"), **qp)
        ref = run("quantizer", kind="reference", save=os.path.join(tmp, "ref.pt"), **qp)
        same = compare_quantizer(torch.load(os.path.join(tmp, "ours.pt"), weights_only=True),
                                 torch.load(os.path.join(tmp, "ref.pt"), weights_only=True))
    speed = ref["seconds"] / ours["seconds"]
    mem = ref["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] and ref["peak_bytes"] else None
    identical = same["indices"] and same["counts"] and same["state"]
    add("3", "EMA quantizer training step",
        f"{ours['seconds']:.3f} s, peak +{fmt_bytes(ours['peak_bytes'])}",
        f"one-hot: {ref['seconds']:.3f} s, peak +{fmt_bytes(ref['peak_bytes'])}",
        f"{speed:.1f}x time, {mem:.1f}x memory" if mem else f"{speed:.1f}x time",
        f"{fmt_bytes(ours['peak_bytes'])} / {fmt_bytes(ref['peak_bytes'])}", fmt_load(mean_load(ours, ref)),
        f"input {tuple(S['quant_shape'])}, {S['quant_codes']} x {S['quant_shape'][1]} codes, fp32, chunk "
        f"{S['quant_chunk']}; identical indices {same['indices']}, counts {same['counts']}, "
        f"codebook state after the step {same['state']}")
    J.update(quantizer_speedup=speed, quantizer_memory_ratio=mem, quantizer_identical=identical,
             quantizer_seconds=ours["seconds"], quantizer_reference_seconds=ref["seconds"],
             quantizer_peak_bytes=ours["peak_bytes"], quantizer_reference_peak_bytes=ref["peak_bytes"],
             quantizer_checks=same)


def row_vae(c: Rows) -> None:
    """Row 4: AugVAE-SL encode and decode, fp32 and bf16."""
    S, run, dev, reps, add, J, fp32_name = c.S, c.run, c.dev, c.reps, c.add, c.J, c.fp32_name
    c.log("row 4: AugVAE")
    vp = dict(device=dev, preset=S["vae_preset"], overrides=S["vae_overrides"], batch=S["vae_batch"], repeats=reps)
    vcfg = augvae.preset(S["vae_preset"], single_level=True, **S["vae_overrides"])
    for op in ("encode", "decode"):
        f32 = run("vae", op=op, dtype="float32", **vp)
        b16 = run("vae", op=op, dtype="bfloat16", **vp)
        settings = (f"{S['vae_preset']} SL, {f32['params'] / 1e6:.1f}M params, {vcfg.image_size} px, "
                    f"batch {S['vae_batch']}, random weights")
        add("4", f"AugVAE-SL {op} images/s, {fp32_name}", f"{f32['images_per_s']:.2f} img/s", "(none: the "
            "library path, as prepare.py runs it)", "", fmt_bytes(f32["peak_bytes"]), fmt_load(mean_load(f32)),
            settings)
        add("4", f"AugVAE-SL {op} images/s, bf16 autocast", f"{b16['images_per_s']:.2f} img/s",
            f"{fp32_name}: {f32['images_per_s']:.2f} img/s", f"{b16['images_per_s'] / f32['images_per_s']:.2f}x",
            fmt_bytes(b16["peak_bytes"]), fmt_load(mean_load(b16)),
            settings + "; bf16 changes the numerics (the VQ distances stay fp32)")
        J[f"vae_{op}_images_per_s"] = f32["images_per_s"]
        J[f"vae_{op}_bf16_images_per_s"] = b16["images_per_s"]
        J[f"vae_{op}_peak_bytes"] = f32["peak_bytes"]
        J[f"vae_{op}_bf16_peak_bytes"] = b16["peak_bytes"]


def row_tokenizer(c: Rows) -> None:
    """Row 5: tokenizer captions/s against CLIP's, and with BPE-dropout (5b)."""
    S, run, reps, add, J = c.S, c.run, c.reps, c.add, c.J
    c.log("row 5: tokenizer")
    ours = run("tokenizer", device="cpu", kind="ours", count=S["tok_count"], repeats=reps)
    clip = run("tokenizer", device="cpu", kind="clip", count=S["tok_count"], repeats=reps)
    drop = run("tokenizer", device="cpu", kind="ours", count=S["tok_count"], repeats=reps, dropout=0.1)
    has_clip = "skipped" not in clip
    add("5", "tokenizer captions/s (cold cache)", f"{ours['captions_per_s']:,.0f} captions/s",
        f"CLIP simple_tokenizer: {clip['captions_per_s']:,.0f} captions/s" if has_clip else clip["skipped"],
        f"{ours['captions_per_s'] / clip['captions_per_s']:.2f}x" if has_clip else "",
        "", fmt_load(mean_load(ours, clip if has_clip else None)),
        f"{S['tok_count']:,} COCO-style captions (bench.bench_captions: {ours['words_per_caption']:.1f} words, "
        f"{ours['tokens_per_caption']:.1f} tokens on average"
        + (f", CLIP's {clip['tokens_per_caption']:.1f}" if has_clip else "") + "), CLIP BPE, one process")
    add("5b", "tokenizer captions/s, BPE-dropout 0.1", f"{drop['captions_per_s']:,.0f} captions/s",
        f"ours without dropout: {ours['captions_per_s']:,.0f} captions/s",
        f"{drop['captions_per_s'] / ours['captions_per_s']:.2f}x", "", fmt_load(mean_load(drop)),
        f"same captions, random.Random(0); dropout caches no word: {drop['tokens_per_caption']:.1f} tokens "
        f"on average against {ours['tokens_per_caption']:.1f}")
    J.update(tokenizer_captions_per_s=ours["captions_per_s"],
             clip_tokenizer_captions_per_s=clip.get("captions_per_s"),
             tokenizer_dropout_captions_per_s=drop["captions_per_s"],
             tokenizer_tokens_per_caption=ours["tokens_per_caption"],
             tokenizer_dropout_tokens_per_caption=drop["tokens_per_caption"])


def row_demo_stages(c: Rows) -> None:
    """Row 7: each demo stage's training step, fp32 and bf16 autocast side by side, and the probe
    (runtime.cpu_bf16_speedup) that `demo.py --dtype auto` decides by, measured in the same run."""
    run, add, J, reps = c.run, c.add, c.J, c.reps
    c.log("row 7: demo stages, fp32 and bf16")
    for stage in ("vae_ml", "vae_sl", "gpt"):
        sp = dict(device=c.dev, stage=stage, repeats=reps, batch=c.S["demo_batch"])
        f32 = run("demo_stage", dtype="float32", **sp)
        b16 = run("demo_stage", dtype="bfloat16", **sp)
        add("7", f"demo {stage} training step, bf16 autocast", f"{b16['step_s']:.3f} s",
            f"{c.fp32_name}: {f32['step_s']:.3f} s", f"{f32['step_s'] / b16['step_s']:.2f}x",
            "", fmt_load(mean_load(f32, b16)),
            f"as python demo.py trains it: batch {c.S['demo_batch']}, {f32['params'] / 1e6:.2f}M params; "
            "ratio = fp32 time / bf16 time")
        J[f"demo_{stage}_step_s"] = {"float32": f32["step_s"], "bfloat16": b16["step_s"]}
    if c.dev == "cpu":
        probes = [runtime.cpu_bf16_speedup() for _ in range(c.S["demo_probes"])]
        add("7", "demo.py --dtype auto probe: fp32 time / bf16 time", ", ".join(f"{p:.2f}x" for p in probes), "", "",
            "", "", f"runtime.cpu_bf16_speedup, {len(probes)} call(s) in this process; the demo picks bf16 "
            "above 1.1x")
        J["bf16_probe"] = probes


def row_e2e(c: Rows, e2e: bool) -> None:
    """Row 6: the README demo end to end."""
    add, J = c.add, c.J
    e = e2e_row(os.path.join(ROOT, DEMO_RESULTS), run=e2e)
    secs = e.get("seconds")
    add("6", "README demo end to end (python demo.py)",
        f"{secs:.0f} s" if secs is not None else "not run", "", "", "",
        fmt_load(mean_load(e)) if e2e else "n/a",
        e["status"] + (f" (written {e['mtime']})" if "mtime" in e else "")
        + (f"; timed here: {e['measured_s']:.0f} s" if "measured_s" in e else ""))
    J.update(e2e_seconds=secs, e2e_measured_seconds=e.get("measured_s"))


def row_prepare(c: Rows) -> None:
    """Row 8: prepare.py's images/s from tar shards against from an image folder of the same files."""
    S, run, add, J = c.S, c.run, c.add, c.J
    c.log("row 8: prepare from shards and from a folder")
    pp = dict(device=c.dev, images=S["prep_images"], per_shard=S["prep_per_shard"], batch=S["prep_batch"],
              workers=S["prep_workers"], repeats=S["prep_repeats"], warm=S["prep_warm"])
    both = run("prepare", **pp)
    shards, folder = both["shards"], both["folder"]
    add("8", "prepare.py images/s from tar shards", f"{shards['images_per_s']:.1f} img/s",
        f"from an image folder (--source jsonl): {folder['images_per_s']:.1f} img/s",
        f"{shards['images_per_s'] / folder['images_per_s']:.2f}x", "", fmt_load(mean_load(shards, folder)),
        f"{S['prep_images']} JPEGs of 256 px shapes, {S['prep_per_shard']} per shard, small-preset AugVAE-SL "
        f"(random weights, 64 px), batch {S['prep_batch']}, --workers {S['prep_workers']}; prepare's own time, "
        "warm page cache, the two alternating")
    J["prepare_images_per_s"] = {"shards": shards["images_per_s"], "folder": folder["images_per_s"]}


ROWS = {1: row_train, 2: row_sampling, 3: row_quantizer, 4: row_vae, 5: row_tokenizer, 7: row_demo_stages,
        8: row_prepare}


def run_bench(mode: str, rows: list, device: torch.device, threads: int, in_process: bool,
              compile_model: bool, e2e: bool, log=print) -> dict:
    """Measure the requested rows -> {'table': [row dicts], 'json': figures, 'notes': [...]}."""
    c = Rows(mode, device, threads, in_process, log)
    c.compile_model = compile_model
    for n in sorted(rows):
        if n == 6:
            row_e2e(c, e2e)
        else:
            ROWS[n](c)
    return {"table": c.table, "json": c.J, "notes": c.notes, "machine": c.machine, "settings": c.S}


def print_table(result: dict, mode: str, elapsed: float) -> None:
    m = result["machine"]
    print(f"\nbench.py ({mode}) on {m['cpu']} ({m['cores']} cores, {m['threads']} threads), "
          + (f"{m['gpu']}, " if "gpu" in m else "") + f"torch {m['torch']}, device {m['device']}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {elapsed:.0f} s in all\n")
    cols = ["row", "what", "ours", "baseline", "ratio", "peak memory", "others' load (cores)", "machine", "settings"]
    keys = ["row", "what", "ours", "baseline", "ratio", "memory", "load", "machine", "settings"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in result["table"]:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print()
    for n in result["notes"]:
        print("- " + n)
    print("- others' load: cores' worth of CPU that other processes used during the timed runs "
          "(mean), from /proc/stat. Above 0 the runs shared memory bandwidth and caches; above cores - "
          "threads they also waited for cores. Times are then upper bounds.")
    print("- peak memory: what the measured call added above the memory in use before it, on its first "
          "call, each measurement in a fresh process (VmHWM reset by /proc/self/clear_refs on Linux CPU; "
          "torch.cuda.max_memory_allocated on CUDA); row 2: cache / recompute, row 3: ours / one-hot.")


# -----------------------------------------------------------------------------------------

def parse_rows(s: str) -> list:
    try:
        rows = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes numbers 1-8 separated by commas, got {s!r}")
    if not rows or any(r not in range(1, 9) for r in rows):
        raise argparse.ArgumentTypeError(f"--rows takes numbers 1-8, got {s!r}")
    return rows


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure this repo's hot paths against their baselines; print one table.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows: 1 BiART training, 2 sampling, 3 quantizer, 4 AugVAE, 5 tokenizer, "
                                       "6 README demo, 7 demo stages fp32/bf16, 8 prepare from shards/folder. "
                                       "See the docstring of bench.py for the method.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller settings: a few minutes on a 2-core CPU")
    mode.add_argument("--tiny", action="store_true", help="every path at toy sizes (for tests; the figures mean nothing)")
    p.add_argument("--rows", type=parse_rows, default=list(range(1, 9)), help="rows to run, e.g. 1,3 (default: all)")
    p.add_argument("--json", default="", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--compile", action="store_true", help="row 1 also with torch.compile")
    p.add_argument("--e2e", action="store_true", help="row 6: run `python demo.py` and time it (not in the default run)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch's default)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per measurement (faster; memory less isolated)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.worker:
        if args.worker not in PARTS:
            p.error(f"unknown worker {args.worker!r}")
        worker_main(args.worker, json.loads(args.spec), args.threads)
        return 0
    try:
        device = runtime.resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    mode_name = "quick" if args.quick else "tiny" if args.tiny else "full"
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  progress; the table goes to stdout
    result = run_bench(mode_name, args.rows, device, args.threads, args.in_process, args.compile, args.e2e, log)
    elapsed = time.perf_counter() - t0
    print_table(result, mode_name, elapsed)
    if args.json:
        doc = {**result["json"], "mode": mode_name, "rows_run": args.rows, "machine": result["machine"],
               "elapsed_s": elapsed, "table": result["table"], "notes": result["notes"],
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        runtime.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
