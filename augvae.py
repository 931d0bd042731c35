"""
AugVAE: the feature-augmented VQ-VAE of L-Verse (stage 1), as a pure library.

Two shapes of one model (paper section 3.3, appendix A):
- AugVAE-ML: 4 latent levels (64, 32, 16, 8 px for a 256 px image). Each encoder reads the
  CONTINUOUS output of the one before; every level is quantized by the ONE shared codebook
  ("cross-level feature augmentation"), and decoders go coarse to fine, each reading the
  concatenation of its level's quantized latent and the coarser decoder's output.
- AugVAE-SL: fine-tuned from ML. Keeps the two finest encoders and decoders, quantizes only
  the 32x32 level, and replaces each concatenation by a fresh 1x1 "connector" conv that
  doubles the channels. Its 32x32 token grid is what BiART reads and writes.

Level l has resolution image_size / 4 / 2**l; level 0 is the finest. Decoders are indexed by
the level whose latent they read: dec[L-1] is the coarsest, dec[0] is the final RGB decoder.

The EMA vector quantizer is written by hand. Differences from the authors' release, each
fixing a defect of it: no N x K one-hot anywhere (bincount / index_add_, chunked distances),
statistics all-reduced across DDP ranks, and in the default 'robust' mode a data-driven
codebook init plus dead-code restarts. `quantizer_mode='faithful'` keeps the release's
N(0, 1) init, zero cluster sizes and no restarts, to reproduce its behaviour.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import runtime

CHECKPOINT_KIND = "augvae"
CPU_DISTANCE_BLOCK_BYTES = 8 * 2 ** 20  # on CPU the distance matrix is built in blocks of at most this (L2-sized)


@dataclass
class AugVAEConfig:
    image_size: int = 256          # input resolution (square), pixels
    hidden: int = 128              # base channel width of encoders/decoders
    num_res_blocks: int = 2        # ResBlocks per resolution in the encoders (decoders: +1)
    stem_mult: tuple = (1, 2, 4)   # channel multipliers of enc[0] / dec[0]: downsample by 4
    level_mult: tuple = (2, 4)     # channel multipliers of the other encoders/decoders: by 2
    z_channels: int = 256          # channels of every latent map
    codebook_size: int = 8192      # K, number of codes shared by all levels
    num_levels: int = 4            # latent levels of the ML model
    single_level: bool = False     # True: AugVAE-SL (tokens at `token_level` only)
    token_level: int = 1           # the SL level: 1 -> 32x32 tokens at 256 px
    sl_quantize_finest: bool = False  # SL: also quantize level 0 like the release's dead branch
    norm_groups: int = 32          # GroupNorm groups
    dropout: float = 0.0           # ResBlock dropout (0 in the release)
    beta: float = 0.25             # commitment loss weight
    ema_decay: float = 0.99        # EMA decay of the codebook statistics
    ema_eps: float = 1e-5          # Laplace smoothing epsilon
    quantizer_mode: str = "robust" # 'robust' (data init + dead-code restart) | 'faithful'
    restart_every: int = 10        # robust: look for dead codes every N training steps
    restart_after: int = 100       # robust: a code is dead after N updates with no vector
    distance_chunk: int = 4096     # rows per block of the N x K distance matrix

    def __post_init__(self):
        self.stem_mult = tuple(self.stem_mult)
        self.level_mult = tuple(self.level_mult)
        for name in ("image_size", "codebook_size", "z_channels", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quantizer_mode not in ("robust", "faithful"):
            raise ValueError(f"quantizer_mode must be 'robust' or 'faithful', got {self.quantizer_mode!r}")
        if not 0 <= self.token_level < self.num_levels:
            raise ValueError(f"token_level {self.token_level} outside 0..{self.num_levels - 1}")
        if self.image_size % self.downsample(self.num_levels - 1):
            raise ValueError(f"image_size {self.image_size} not divisible by {self.downsample(self.num_levels - 1)}")

    def downsample(self, level: int) -> int:
        """Image pixels per latent cell at `level`."""
        return 2 ** (len(self.stem_mult) - 1) * 2 ** (level * (len(self.level_mult) - 1))

    def grid(self, level: int) -> int:
        return self.image_size // self.downsample(level)

    @property
    def levels(self) -> list:
        """The levels this model quantizes (finest first)."""
        if not self.single_level:
            return list(range(self.num_levels))
        return ([0] if self.sl_quantize_finest and self.token_level != 0 else []) + [self.token_level]

    @property
    def token_levels(self) -> list:
        """The levels whose tokens the decoder reads (what encode() returns)."""
        return [self.token_level] if self.single_level else list(range(self.num_levels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stem_mult"], d["level_mult"] = list(self.stem_mult), list(self.level_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown AugVAE config keys: {sorted(unknown)}")
        return cls(**d)


# presets: `paper` is the released configuration; `small` trains in minutes on a laptop CPU
# on the built-in 64 px shapes: SL tokens 8x8 (image / 8, as the paper's 32x32 at 256 px), but
# from three ML levels 8x8, 4x4, 2x2 with the token level the finest. The paper's token level
# (32x32) is the second finest: its ML model puts most detail in the 64x64 level, which SL
# drops, so SL relearns from a blurry start. At CPU budgets that costs most of the run (SL
# from a 16/8/4/2 ML: 21.1 dB after 150 ML + 150 SL steps; from this layout: 28.5 dB after
# 150 + 250), so here the level SL keeps is the one ML trained hardest.
PRESETS = {
    "paper": dict(),
    "small": dict(image_size=64, hidden=16, num_res_blocks=1, z_channels=64, codebook_size=512,
                  norm_groups=8, stem_mult=(1, 2, 4, 4), num_levels=3, token_level=0),
    # Fashion-MNIST at 32 px (28 px padded): the small preset with a 4x stem, so SL tokens are
    # 8x8 (ML levels 8x8, 4x4, 2x2). The small preset's 4x4 tokens at 32 px lose the class:
    # after 300 ML + 300 SL steps, 21.1 dB and a CNN that knows 92% of the test images knows
    # 73% of their reconstructions; here 24.5 dB and 85%, at about the same cost per step
    # (64 px with the small preset would be 4x the pixels for the same 8x8 tokens).
    "fashion": dict(image_size=32, hidden=16, num_res_blocks=1, z_channels=64, codebook_size=512,
                    norm_groups=8, stem_mult=(1, 2, 4), num_levels=3, token_level=0),
}


def preset(name: str, **overrides) -> AugVAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown AugVAE preset {name!r}; choose from {sorted(PRESETS)}")
    return AugVAEConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------
# building blocks (the taming-transformers encoder/decoder family, no attention)

def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, cin, H, W) -> (B, cout, H / 2**(len(mult)-1), ...)."""

    def __init__(self, mult: tuple, cin: int, cout: int, cfg: AugVAEConfig):
        super().__init__()
        g, p, hid = cfg.norm_groups, cfg.dropout, cfg.hidden
        self.conv_in = nn.Conv2d(cin, hid, 3, padding=1)
        blocks, ch = [], hid
        for i, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, hid * m, g, p))
                ch = hid * m
            if i != len(mult) - 1:
                blocks.append(Downsample(ch))
        blocks += [ResBlock(ch, ch, g, p), ResBlock(ch, ch, g, p)]  # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """(B, cin, h, w) -> (B, cout, h * 2**(len(mult)-1), ...)."""

    def __init__(self, mult: tuple, cin: int, cout: int, cfg: AugVAEConfig):
        super().__init__()
        g, p, hid = cfg.norm_groups, cfg.dropout, cfg.hidden
        ch = hid * mult[-1]
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        blocks = [ResBlock(ch, ch, g, p), ResBlock(ch, ch, g, p)]  # middle
        for i in reversed(range(len(mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, hid * mult[i], g, p))
                ch = hid * mult[i]
            if i != 0:
                blocks.append(Upsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class SharedConv1x1(nn.Module):
    """A 1x1 conv whose weight is shared by all levels, with one bias per level.
    The bias table is indexed by level; in SL only the quantized levels keep a row."""

    def __init__(self, channels: int, levels: list):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 1, 1))
        self.bias = nn.ParameterDict({str(l): nn.Parameter(torch.empty(channels)) for l in levels})
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default init
        bound = 1 / math.sqrt(channels)
        for b in self.bias.values():
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias[str(level)])


# ----------------------------------------------------------------------------------------
# the EMA vector quantizer

def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


class EMAQuantizer(nn.Module):
    """Nearest-code quantizer whose codebook learns by exponential moving averages
    (van den Oord et al. 2017, appendix; Razavi et al. 2019). All state lives in buffers, so
    it is saved with the model; the update runs in the training-mode forward, in fp32, with
    the per-code counts and sums all-reduced so every DDP rank keeps the same codebook."""

    def __init__(self, cfg: AugVAEConfig):
        super().__init__()
        K, D = cfg.codebook_size, cfg.z_channels
        self.K, self.D = K, D
        self.decay, self.eps, self.beta = cfg.ema_decay, cfg.ema_eps, cfg.beta
        self.mode = cfg.quantizer_mode
        self.restart_every, self.restart_after = cfg.restart_every, cfg.restart_after
        self.chunk = cfg.distance_chunk
        embed = torch.randn(K, D)
        self.register_buffer("embed", embed)                    # (K, D) the codebook
        self.register_buffer("embed_sum", embed.clone())        # (K, D) EMA of assigned sums
        self.register_buffer("cluster_size", torch.zeros(K))    # (K,) EMA of assigned counts
        self.register_buffer("unused", torch.zeros(K, dtype=torch.long))  # updates since last use
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # EMA updates
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # restart_dead calls
        self.register_buffer("initted", torch.tensor(self.mode == "faithful"))

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> tuple:
        """flat (N, D) fp32 -> (indices (N,), squared distances (N,)). The N x K distance
        matrix is built `chunk` rows at a time (on CPU fewer, see CPU_DISTANCE_BLOCK_BYTES), so
        memory stays O(chunk * K). Each row's distances do not depend on the block it is in."""
        e = self.embed
        e_sq = (e * e).sum(1)  # (K,)
        n = flat.shape[0]
        idx = torch.empty(n, dtype=torch.long, device=flat.device)
        dmin = torch.empty(n, dtype=flat.dtype, device=flat.device)
        rows = self.chunk
        if flat.device.type == "cpu":  # a block that stays in cache: 1.3-1.8x faster at 8 x 64 x 64 x 8192
            rows = min(rows, max(64, CPU_DISTANCE_BLOCK_BYTES // (4 * e.shape[0])))
        # one (rows, K) block reused by every chunk, results written in place: a fresh block
        # per chunk costs page faults on CPU
        block = torch.empty(min(rows, n), e.shape[0], dtype=flat.dtype, device=flat.device)
        for s in range(0, n, rows):
            x = flat[s:s + rows]
            d = torch.addmm(e_sq, x, e.t(), alpha=-2.0, out=block[:x.shape[0]])  # (n, K) = |e|^2 - 2 x.e
            torch.min(d, 1, out=(dmin[s:s + rows], idx[s:s + rows]))
            dmin[s:s + rows] += (x * x).sum(1)
        return idx, dmin

    def forward(self, z: torch.Tensor) -> tuple:
        """z (B, D, H, W) -> z_q (straight-through), commitment loss, indices (B, H, W), stats.
        stats: 'counts' (K,) codes chosen here; 'flat' (N, D) and 'dist2' (N,) the detached
        inputs and their squared distance to the chosen code (for restart_dead)."""
        with torch.autocast(z.device.type, enabled=False):  # keep VQ maths in fp32
            z = z.float()
            B, D, H, W = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
            if self.training and not bool(self.initted):
                self.init_from([flat.detach()])
            idx, dist2 = self.nearest(flat.detach())
            counts = torch.bincount(idx, minlength=self.K).float()
            if self.training:
                self._ema_update(flat.detach(), idx, counts)
            # (B, D, H, W) in z's layout: the loss and the straight-through sum then run 25% faster on CPU
            q = F.embedding(idx, self.embed).view(B, H, W, D).permute(0, 3, 1, 2).contiguous()
            loss = self.beta * F.mse_loss(z, q.detach())  # the codebook learns by EMA only
            z_q = z + (q - z).detach()  # straight-through estimator
        return z_q, loss, idx.view(B, H, W), {"counts": counts, "flat": flat.detach(), "dist2": dist2}

    @torch.no_grad()
    def init_from(self, flats: list):
        """Robust mode: start the codebook on encoder outputs, an equal share drawn from each
        tensor in `flats` (one per level), each code counted once, so no code starts at zero
        cluster size (the release's N(0, 1) init with zero counts leaves most codes dead). Rank 0 draws, every rank copies."""
        per = [self.K // len(flats) + (i < self.K % len(flats)) for i in range(len(flats))]
        new = torch.cat([f[torch.randint(0, f.shape[0], (n,), device=f.device)] for f, n in zip(flats, per)])
        new = new + 0.01 * new.std() * torch.randn_like(new)
        new = _broadcast(new.contiguous())
        self.embed.copy_(new)
        self.embed_sum.copy_(new)
        self.cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor):
        sums = torch.zeros(self.K, self.D, device=flat.device).index_add_(0, idx, flat)
        both = _all_reduce_sum(torch.cat([counts[:, None], sums], 1))  # one collective
        counts, sums = both[:, 0], both[:, 1:]
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n  # Laplace
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        self.unused.add_(1).masked_fill_(counts > 0, 0)
        self.updates.add_(1)

    @torch.no_grad()
    def restart_dead(self, flat: torch.Tensor, dist2: torch.Tensor):
        """Robust mode, once per training step: every `restart_every` steps, move each code
        unused for `restart_after` codebook updates onto an input vector drawn with
        probability proportional to its quantization error, so badly represented vectors get
        codes. flat (N, D), dist2 (N,): the step's inputs (all levels pooled) and errors.
        Rank 0 draws, every rank copies."""
        self.steps.add_(1)
        if self.mode != "robust" or int(self.steps) % self.restart_every:
            return
        dead = (self.unused >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        w = dist2.float().clamp_min(0) + 1e-12
        pick = torch.multinomial(w, dead.numel(), replacement=dead.numel() > w.numel())
        new = _broadcast(flat[pick].float().contiguous())
        self.embed[dead] = new
        self.embed_sum[dead] = new
        self.cluster_size[dead] = 1.0
        self.unused[dead] = 0


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution given by per-code counts."""
    p = counts / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


# ----------------------------------------------------------------------------------------
# the model

class AugVAE(nn.Module):
    def __init__(self, cfg: AugVAEConfig):
        super().__init__()
        self.cfg = cfg
        z, L = cfg.z_channels, cfg.num_levels
        top = cfg.token_level if cfg.single_level else L - 1  # coarsest level kept
        self.enc = nn.ModuleList(
            [Encoder(cfg.stem_mult, 3, z, cfg)] + [Encoder(cfg.level_mult, z, z, cfg) for _ in range(top)])
        # dec[l] reads level l's latent (concatenated with, or in SL connected from, the
        # coarser decoder's output) and upsamples it; dec[0] is the final RGB decoder.
        dec_in = lambda l: z if l == L - 1 else 2 * z
        self.dec = nn.ModuleList(
            [Decoder(cfg.stem_mult, dec_in(0), 3, cfg)] +
            [Decoder(cfg.level_mult, dec_in(l), z, cfg) for l in range(1, top + 1)])
        if cfg.single_level:  # 1x1 connectors in place of the concatenations (section 3.3)
            self.connect = nn.ModuleList([nn.Conv2d(z, 2 * z, 1) for l in range(top + 1) if dec_in(l) == 2 * z])
        self.quant_conv = SharedConv1x1(z, cfg.levels)
        self.post_quant_conv = SharedConv1x1(z, cfg.token_levels)  # only decoded levels
        self.quantizer = EMAQuantizer(cfg)

    # -- encoding ------------------------------------------------------------------------
    def _latents(self, x: torch.Tensor) -> dict:
        """x (B, 3, H, W) in [-1, 1] -> {level: continuous latent (B, z, h_l, w_l)}."""
        out, h = {}, x
        for l, enc in enumerate(self.enc):
            h = enc(h)
            out[l] = h
        return out

    def _quantize(self, latents: dict) -> tuple:
        """Quantize each of cfg.levels with the shared codebook, finest first (the release's
        order: in training each level updates the codebook in turn). In training, robust mode
        initialises the codebook from all levels' first outputs and restarts dead codes once
        per step from all levels' vectors, so every level gets codes (cross-level sharing)."""
        zs = {l: self.quant_conv(latents[l], l) for l in self.cfg.levels}
        vq = self.quantizer
        robust = self.training and vq.mode == "robust"
        if robust and not bool(vq.initted):
            vq.init_from([z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]) for z in zs.values()])
        q, idx, loss, counts, flats, dists = {}, {}, 0.0, [], [], []
        for l in self.cfg.levels:
            zq, commit, i, stats = vq(zs[l])
            q[l], idx[l] = zq, i
            loss = loss + commit
            counts.append(stats["counts"])
            flats.append(stats["flat"])
            dists.append(stats["dist2"])
        if robust:
            vq.restart_dead(torch.cat(flats), torch.cat(dists))
        return q, idx, loss, counts

    # -- decoding ------------------------------------------------------------------------
    def _decode_quantized(self, q: dict) -> torch.Tensor:
        """{level: quantized latent} for cfg.token_levels -> image (B, 3, H, W)."""
        cfg = self.cfg
        if cfg.single_level:
            h = self.post_quant_conv(q[cfg.token_level], cfg.token_level)
            for l in reversed(range(cfg.token_level + 1)):
                if l < cfg.num_levels - 1:
                    h = self.connect[l](h)
                h = self.dec[l](h)
            return h
        h = None
        for l in reversed(range(cfg.num_levels)):
            p = self.post_quant_conv(q[l], l)
            h = self.dec[l](p if h is None else torch.cat([p, h], 1))
        return h

    def forward(self, x: torch.Tensor) -> tuple:
        """Training forward: x (B, 3, H, W) in [-1, 1] -> (reconstruction, commitment loss,
        stats). stats['counts'] is a list of per-code counts, one per quantized level."""
        q, idx, commit, counts = self._quantize(self._latents(x))
        return self._decode_quantized(q), commit, {"counts": counts, "indices": idx}

    # -- the narrow interface the next stages use ---------------------------------------
    @torch.no_grad()
    def encode_levels(self, x: torch.Tensor) -> list:
        """x (B, 3, H, W) in [-1, 1] -> token grids, one (B, h, w) LongTensor per level in
        cfg.token_levels (finest first). Never updates the codebook."""
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            lat = self._latents(x)
            out = []
            for l in self.cfg.token_levels:
                _, _, i, _ = self.quantizer(self.quant_conv(lat[l], l))
                out.append(i)
            return out
        finally:
            self.quantizer.train(was)

    @torch.no_grad()
    def decode_levels(self, indices: list) -> torch.Tensor:
        """Inverse of encode_levels: token grids -> images (B, 3, H, W), unclamped."""
        levels = self.cfg.token_levels
        if len(indices) != len(levels):
            raise ValueError(f"expected {len(levels)} token grids, got {len(indices)}")
        q = {}
        for l, i in zip(levels, indices):
            g = self.cfg.grid(l)
            if i.dim() != 3 or tuple(i.shape[1:]) != (g, g):
                raise ValueError(f"level {l} tokens must be (B, {g}, {g}), got {tuple(i.shape)}")
            if i.numel() and (int(i.min()) < 0 or int(i.max()) >= self.cfg.codebook_size):
                raise ValueError(f"token ids must be in 0..{self.cfg.codebook_size - 1}")
            q[l] = F.embedding(i, self.quantizer.embed).permute(0, 3, 1, 2)
        return self._decode_quantized(q)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """SL only: images (B, 3, H, W) in [-1, 1] -> tokens (B, g, g), g = 32 at 256 px."""
        if not self.cfg.single_level:
            raise ValueError("encode() gives one token grid and needs an SL model; use encode_levels() for ML")
        return self.encode_levels(x)[0]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """SL only: tokens (B, g, g) -> images (B, 3, H, W)."""
        if not self.cfg.single_level:
            raise ValueError("decode() reads one token grid and needs an SL model; use decode_levels() for ML")
        return self.decode_levels([indices])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def from_checkpoint(ckpt: dict) -> AugVAE:
    """The model of a loaded checkpoint dict (its 'config' and 'model' entries), strict."""
    model = AugVAE(AugVAEConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def load(path, single_level: bool | None = None, flag: str = "--vae") -> AugVAE:
    """The AugVAE of a train_vae.py checkpoint (ckpt.pt or best.pt), loaded strictly, fp32, eval
    mode, on the CPU. single_level True / False refuses the other kind with a one-line
    ValueError that names `flag`, the command-line flag the path came from."""
    ckpt = runtime.load_checkpoint(path, CHECKPOINT_KIND)
    cfg = AugVAEConfig.from_dict(ckpt["config"])  # checked before the weights are built
    if single_level is True and not cfg.single_level:
        raise ValueError(f"{flag} {path}: is a multi-level (ML) checkpoint; give the fine-tuned SL one "
                         f"(python train_vae.py --sl --init ML.pt)")
    if single_level is False and cfg.single_level:
        raise ValueError(f"{flag} {path}: is already a single-level (SL) checkpoint; give the ML one")
    return from_checkpoint(ckpt).float().eval()


def ml_to_sl(ml: AugVAE, **overrides) -> AugVAE:
    """AugVAE-ML -> AugVAE-SL: keep every trained weight the SL model still has (encoders and
    decoders up to the token level, the shared codebook and 1x1 conv weights, the biases of
    the quantized levels), drop the coarser levels, and add the 1x1 connectors, initialised
    to pass each signal where the ML decoder expected it (the rest of its input starts at 0)."""
    if ml.cfg.single_level:
        raise ValueError("ml_to_sl needs an ML model")
    cfg = AugVAEConfig(**{**asdict(ml.cfg), "single_level": True, **overrides})
    sl = AugVAE(cfg).to(next(ml.parameters()).device)
    src = ml.state_dict()
    dst = sl.state_dict()
    fresh = [k for k in dst if k.startswith("connect.")]
    for k in dst:
        if k in fresh:
            continue
        if k not in src or src[k].shape != dst[k].shape:
            raise ValueError(f"cannot carry {k} from the ML model")
        dst[k] = src[k]
    sl.load_state_dict(dst, strict=True)
    # Start the connectors where the ML model was: each routes its input to the half of the
    # next decoder's input that carried the same signal in ML (the level's own latent -> first
    # half, the coarser decoder's output -> second half) and zeros the other half.
    z = cfg.z_channels
    with torch.no_grad():
        for l, conv in enumerate(sl.connect):
            conv.weight.zero_()
            conv.bias.zero_()
            rows = slice(0, z) if l == cfg.token_level else slice(z, 2 * z)
            conv.weight[rows, :, 0, 0] = torch.eye(z)
        # Codes the finer ML levels used mean nothing to the token level: mark every code as
        # dead, so the first restart moves each code the token level does not use onto its data.
        sl.quantizer.unused.fill_(cfg.restart_after)
    return sl


# ----------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), VGG16 variant, written here so the loss needs no package.
# Weights cannot be downloaded here: load them from files the user gives.

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """Perceptual distance: VGG16 features at 5 taps, unit-normalised over channels, squared
    differences weighted by non-negative 1x1 linear heads, spatially averaged, summed.
    Module names match torchvision's vgg16 (`features.N.*`) and the LPIPS heads
    (`lin{i}.model.1.weight`) so the published files load directly (see load_lpips)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        total = 0.0
        for lin, a, b in zip(self.lins, self._taps(x), self._taps(y)):
            total = total + lin((a - b) ** 2).mean((1, 2, 3))
        return total


def load_lpips(vgg_state: dict, heads_state: dict) -> LPIPS:
    """Build LPIPS from two state dicts: torchvision's vgg16 weights (e.g. the file
    vgg16-397923af.pth; only `features.*` is used) and the LPIPS v0.1 linear heads for vgg
    (the lpips project's weights/v0.1/vgg.pth, keys `lin0.model.1.weight` ... `lin4...`)."""
    m = LPIPS()
    feats = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
    want = {k[len("features."):] for k in m.state_dict() if k.startswith("features.")}
    missing = want - set(feats)
    if missing:
        raise ValueError(f"VGG16 weights lack {len(missing)} tensors, e.g. features.{sorted(missing)[0]}")
    m.features.load_state_dict({k: feats[k] for k in want}, strict=True)
    for i, lin in enumerate(m.lins):
        key = f"lin{i}.model.1.weight"
        if key not in heads_state:
            raise ValueError(f"LPIPS heads lack {key}")
        lin.weight.data.copy_(heads_state[key])
    return m.eval()


class ReconstructionLoss(nn.Module):
    """MSE + lpips_weight * LPIPS (appendix A: weight 0.1). Without LPIPS weights it is the
    MSE alone. `fg_weight` > 1 weights pixels that differ from the image's median colour
    more (for flat-background data such as the built-in shapes, where objects cover a few
    percent of the image and plain MSE lets small ones vanish); 1 is the paper's plain MSE."""

    def __init__(self, lpips: LPIPS | None = None, lpips_weight: float = 0.1, fg_weight: float = 1.0):
        super().__init__()
        self.lpips, self.lpips_weight, self.fg_weight = lpips, lpips_weight, fg_weight

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> tuple:
        recon = recon.float()
        err = (recon - x) ** 2
        if self.fg_weight != 1.0:
            bg = x.flatten(2).median(2).values[:, :, None, None]  # (B, 3, 1, 1)
            fg = ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
            err = err * (1 + (self.fg_weight - 1) * fg)
        terms = {"mse": err.mean()}
        if self.lpips is not None:
            terms["lpips"] = self.lpips(recon, x).mean()
        loss = terms["mse"] + self.lpips_weight * terms.get("lpips", 0.0)
        return loss, terms


def psnr(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((recon.float().clamp(-1, 1) - x.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


if __name__ == "__main__":
    # `python augvae.py`: parameter counts and token grids of each preset (built on the meta
    # device: nothing is allocated), a check anyone can run.
    for name in PRESETS:
        ml_cfg = preset(name)
        sl_cfg = preset(name, single_level=True)
        with torch.device("meta"):
            ml, sl = AugVAE(ml_cfg), AugVAE(sl_cfg)
        grids = " ".join(f"{ml_cfg.grid(l)}x{ml_cfg.grid(l)}" for l in range(ml_cfg.num_levels))
        g = sl_cfg.grid(sl_cfg.token_level)
        print(f"{name:>6}: {ml_cfg.image_size} px, codebook {ml_cfg.codebook_size} x {ml_cfg.z_channels}")
        print(f"        ML {count_parameters(ml):>13,} trainable parameters, token grids {grids}")
        print(f"        SL {count_parameters(sl):>13,} trainable parameters, token grid {g}x{g} ({g * g} tokens)")
