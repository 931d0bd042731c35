"""AugVAE library: architecture sizes, the EMA quantizer's maths, ML -> SL, LPIPS."""

import pytest
import torch
import torch.nn.functional as F

import augvae
from augvae import AugVAE, AugVAEConfig, EMAQuantizer


def tiny(**kw) -> AugVAEConfig:
    """A narrow model with the paper's structure (levels, strides, decoders)."""
    base = dict(image_size=32, hidden=8, num_res_blocks=1, z_channels=16, codebook_size=64, norm_groups=4)
    return AugVAEConfig(**{**base, **kw})


# -- the paper preset -------------------------------------------------------------------------

def test_paper_parameter_counts_match_release():
    with torch.device("meta"):
        ml = AugVAE(augvae.preset("paper"))
        sl = AugVAE(augvae.preset("paper", single_level=True))
    assert augvae.count_parameters(ml) == 221_224_195  # the release, measured
    # The release's SL keeps the pre/post-quant biases of all 4 levels; ours keeps only the
    # biases its forward uses (1 pre + 1 post): 6 x 256 fewer.
    assert augvae.count_parameters(sl) == 112_290_819 - 6 * 256
    # the shared codebook is a buffer, not a parameter
    assert ml.quantizer.embed.shape == (8192, 256)


def _codebook_from_latents(m: AugVAE, x: torch.Tensor) -> list:
    """Set the codebook to encoder outputs of `x` (so many codes are in use, as after the
    data-driven init) and return each token level's pre-quantization vectors (B, D, h, w)."""
    with torch.no_grad():
        lat = m._latents(x)
        zs = [m.quant_conv(lat[l], l) for l in m.cfg.token_levels]
        g, per_level = torch.Generator().manual_seed(0), m.cfg.codebook_size // len(zs)
        codes = []
        for z in zs:  # the same number of codes from every level
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            codes.append(flat[torch.randperm(flat.shape[0], generator=g)[:per_level]])
        codes = torch.cat(codes)
        m.quantizer.embed[:len(codes)] = codes + 0.01 * torch.randn(codes.shape, generator=g)
    return zs


def _brute_force_codes(z: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    return torch.cdist(flat, embed.double()).argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])


@pytest.mark.parametrize("single_level", [False, True])
def test_paper_token_grids_are_nearest_codes_and_decode_as_the_forward(single_level):
    """The paper's layout at a narrow width: ML gives 64, 32, 16, 8 grids (5,440 tokens) at 256 px,
    SL one 32 x 32 grid; each token is the brute-force nearest code of its level's vector, and
    decoding the tokens gives the training forward's reconstruction."""
    torch.manual_seed(0)
    cfg = augvae.preset("paper", hidden=16, num_res_blocks=1, z_channels=16, codebook_size=64, norm_groups=8,
                        single_level=single_level)
    assert [cfg.grid(l) for l in range(4)] == [64, 32, 16, 8]
    m = AugVAE(cfg).eval()
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    zs = _codebook_from_latents(m, x)
    if single_level:
        grids = [m.encode(x)]
        assert tuple(grids[0].shape) == (1, 32, 32)
        decoded = m.decode(grids[0])
    else:
        grids = m.encode_levels(x)
        assert [tuple(g.shape) for g in grids] == [(1, 64, 64), (1, 32, 32), (1, 16, 16), (1, 8, 8)]
        assert sum(g.numel() for g in grids) == 5440
        decoded = m.decode_levels(grids)
    for z, g in zip(zs, grids):
        assert torch.equal(g, _brute_force_codes(z, m.quantizer.embed))
        assert len(g.unique()) > 4  # a real check: several codes in use
    with torch.no_grad():
        recon = m(x)[0]
    assert decoded.shape == (1, 3, 256, 256)
    torch.testing.assert_close(decoded, recon, rtol=1e-4, atol=3e-4)  # the forward adds z + (z_q - z): rounding


# -- the quantizer -----------------------------------------------------------------------------

def test_nearest_code_matches_brute_force_across_chunks():
    torch.manual_seed(0)
    q = EMAQuantizer(tiny(codebook_size=50, z_channels=8, distance_chunk=7)).eval()
    z = torch.randn(3, 8, 5, 4)
    _, _, idx, _ = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(flat, q.embed).argmin(1)
    assert torch.equal(idx.flatten(), brute)


def test_straight_through_and_commitment_loss():
    torch.manual_seed(0)
    q = EMAQuantizer(tiny(z_channels=8)).eval()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    zq, loss, idx, _ = q(z)
    codes = F.embedding(idx, q.embed).permute(0, 3, 1, 2)
    assert torch.allclose(zq, codes, atol=1e-6)  # forward: the code
    g = torch.randn_like(zq)
    zq.backward(g)
    assert torch.equal(z.grad, g)  # backward: identity to the encoder
    assert torch.allclose(loss, 0.25 * ((z.detach() - codes) ** 2).mean())
    z2 = z.detach().clone().requires_grad_(True)
    _, loss2, _, _ = q(z2)
    loss2.backward()  # the commitment loss pulls z towards its (fixed) code only
    assert torch.allclose(z2.grad, 0.25 * 2 * (z2.detach() - codes) / z2.numel(), atol=1e-7)
    assert q.embed.grad is None


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    cfg = tiny(codebook_size=4, z_channels=2, quantizer_mode="faithful")
    q = EMAQuantizer(cfg).train()
    q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]]))
    q.embed_sum.copy_(q.embed)
    q.cluster_size.zero_()
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [11.0, -1.0], [9.5, 0.5]])
    z = vecs.t().reshape(1, 2, 5, 1)  # (B, D, H, W) with the 5 vectors along H
    e0 = q.embed.clone()
    _, _, idx, stats = q(z)
    assert idx.flatten().tolist() == [0, 0, 1, 1, 1]
    d, eps, K = 0.99, 1e-5, 4
    counts = torch.tensor([2.0, 3.0, 0.0, 0.0])
    sums = torch.stack([vecs[:2].sum(0), vecs[2:].sum(0), torch.zeros(2), torch.zeros(2)])
    cs = (1 - d) * counts
    es = d * e0 + (1 - d) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + K * eps) * n
    assert torch.equal(stats["counts"], counts)
    assert torch.allclose(q.cluster_size, cs)
    assert torch.allclose(q.embed_sum, es)
    assert torch.allclose(q.embed, es / smoothed[:, None], rtol=1e-5)


def test_faithful_mode_reproduces_the_release_collapse():
    """The release's defect: with N(0,1) init and zero cluster sizes, every code unused in the first
    step jumps to a huge norm (~1e6 for D = 256) and cannot be chosen again."""
    torch.manual_seed(0)
    q = EMAQuantizer(augvae.preset("paper", quantizer_mode="faithful")).train()
    z = torch.randn(2, 256, 8, 8) * 0.1
    _, _, idx, _ = q(z)
    used = torch.unique(idx)
    unused = torch.ones(8192, dtype=torch.bool)
    unused[used] = False
    assert used.numel() < 128
    assert float(q.embed[unused].norm(dim=1).min()) > 1e5
    _, _, idx2, _ = q(z)
    assert set(torch.unique(idx2).tolist()) <= set(used.tolist())


def _toy_usage(mode: str) -> int:
    """Train only the quantizer on 64 well separated clusters; count codes in use."""
    torch.manual_seed(0)
    q = EMAQuantizer(tiny(codebook_size=64, z_channels=8, quantizer_mode=mode,
                          restart_every=5, restart_after=10)).train()
    centres = torch.randn(64, 8) * 3
    for _ in range(60):
        pts = centres[torch.randint(0, 64, (256,))] + 0.05 * torch.randn(256, 8)
        _, _, _, stats = q(pts.t().reshape(1, 8, 256, 1))
        q.restart_dead(stats["flat"], stats["dist2"])  # a no-op in faithful mode
    q.eval()
    _, _, idx, _ = q(centres.t().reshape(1, 8, 64, 1))
    return torch.unique(idx).numel()


def test_robust_mode_does_not_collapse_where_faithful_does():
    robust, faithful = _toy_usage("robust"), _toy_usage("faithful")
    assert robust >= 48, robust  # most clusters keep a code of their own (54 measured)
    assert faithful <= 8, faithful  # the release's init collapses (3 measured)


def test_eval_mode_leaves_the_codebook_alone_and_vq_runs_fp32_under_autocast():
    torch.manual_seed(0)
    q = EMAQuantizer(tiny(z_channels=8)).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, loss, _, _ = q(z)
    assert zq.dtype == torch.float32 and loss.dtype == torch.float32
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dead_codes_are_restarted_on_data():
    torch.manual_seed(0)
    q = EMAQuantizer(tiny(codebook_size=16, z_channels=4, restart_every=1, restart_after=1)).train()
    z = torch.randn(1, 4, 8, 8)
    q(z)  # init + first update
    q.embed[5] = 1e6  # make code 5 unusable
    q.embed_sum[5] = 1e6
    _, _, _, stats = q(z)  # unused once
    assert float(q.embed[5].abs().max()) > 1e5
    q.restart_dead(stats["flat"], stats["dist2"])  # -> restarted at a data vector
    assert float(q.embed[5].abs().max()) < 100
    assert int(q.unused[5]) == 0
    assert any(torch.equal(q.embed[5], v) for v in stats["flat"])


def test_codebook_init_draws_from_every_level():
    torch.manual_seed(0)
    m = AugVAE(tiny(codebook_size=64)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = m._latents(x)
    flats = {l: m.quant_conv(lat[l], l).detach().permute(0, 2, 3, 1).reshape(-1, 16) for l in range(4)}
    m(x)
    # each code starts near (within the 1% noise) a vector of some level; all levels present
    levels_hit = set()
    for e in m.quantizer.embed_sum:
        for l, f in flats.items():
            if float((f - e).norm(dim=1).min()) < 0.1 * float(f.std()) * 4:
                levels_hit.add(l)
    assert levels_hit == {0, 1, 2, 3}


# -- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("single_level", [False, True])
def test_training_forward_backward_reaches_every_parameter(single_level):
    torch.manual_seed(0)
    m = AugVAE(tiny(single_level=single_level)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, commit, stats = m(x)
    assert recon.shape == x.shape
    assert len(stats["counts"]) == len(m.cfg.levels)
    (F.mse_loss(recon, x) + commit).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing  # DDP needs every parameter used


def test_shared_weights_and_per_level_biases():
    m = AugVAE(tiny())
    names = [n for n, _ in m.named_parameters() if n.startswith(("quant_conv", "post_quant_conv"))]
    assert sorted(names) == sorted([f"{c}.weight" for c in ("quant_conv", "post_quant_conv")]
                                   + [f"{c}.bias.{l}" for c in ("quant_conv", "post_quant_conv") for l in range(4)])
    assert m.quant_conv.weight.shape == (16, 16, 1, 1)


def test_ml_to_sl_keeps_trained_weights_and_tokens():
    torch.manual_seed(0)
    ml = AugVAE(tiny()).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ml(x)  # data-init the codebook
    ml.eval()
    sl = augvae.ml_to_sl(ml).eval()
    assert sl.cfg.single_level and len(sl.enc) == 2 and len(sl.dec) == 2 and len(sl.connect) == 2
    assert torch.equal(sl.encode(x), ml.encode_levels(x)[1])  # same 32 / 4 / 2 = 4x4 tokens
    assert torch.equal(sl.quantizer.embed, ml.quantizer.embed)
    assert torch.equal(sl.dec[0].conv_out.weight, ml.dec[0].conv_out.weight)
    # the connectors start by routing each signal where the ML decoder had it
    tokens = sl.encode(x)
    p = ml.post_quant_conv(F.embedding(tokens, ml.quantizer.embed).permute(0, 3, 1, 2), 1)
    h = ml.dec[1](torch.cat([p, torch.zeros_like(p)], 1))
    expect = ml.dec[0](torch.cat([torch.zeros_like(h), h], 1))
    assert torch.allclose(sl.decode(tokens), expect, atol=1e-5)
    with pytest.raises(ValueError):
        augvae.ml_to_sl(sl)


def test_sl_quantize_finest_release_quirk():
    torch.manual_seed(0)
    ml = AugVAE(tiny()).train()
    ml(torch.rand(2, 3, 32, 32) * 2 - 1)
    sl = augvae.ml_to_sl(ml, sl_quantize_finest=True).train()
    assert sl.cfg.levels == [0, 1] and sl.cfg.token_levels == [1]
    before = int(sl.quantizer.updates)
    recon, commit, stats = sl(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert int(sl.quantizer.updates) == before + 2  # two codebook updates per step, as released
    (recon.mean() + commit).backward()
    assert all(p.grad is not None for p in sl.parameters())


def test_decode_rejects_bad_tokens_and_ml_encode():
    m = AugVAE(tiny(single_level=True)).eval()
    with pytest.raises(ValueError, match="tokens must be"):
        m.decode(torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m.decode(torch.full((1, 4, 4), 64, dtype=torch.long))
    with pytest.raises(ValueError, match="SL model"):
        AugVAE(tiny()).encode(torch.zeros(1, 3, 32, 32))


def test_config_round_trip_and_unknown_keys():
    cfg = augvae.preset("small", single_level=True)
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, bool, list)) for v in d.values())
    assert AugVAEConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        AugVAEConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        augvae.preset("nope")


# -- LPIPS and the loss --------------------------------------------------------------------------

def _lpips_files_state():
    torch.manual_seed(0)
    ref = augvae.LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    heads = {f"lin{i}.model.1.weight": torch.rand_like(l.weight) for i, l in enumerate(ref.lins)}
    return vgg, heads


def test_lpips_loads_published_key_layout_and_behaves_like_a_distance(tmp_path):
    vgg, heads = _lpips_files_state()
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    m = augvae.load_lpips(torch.load(tmp_path / "vgg16.pth", weights_only=True),
                          torch.load(tmp_path / "vgg.pth", weights_only=True))
    assert torch.equal(m.lins[2].weight, heads["lin2.model.1.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.allclose(m(x, x), torch.zeros(2))
    d = m(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="lin4"):
        augvae.load_lpips(vgg, {k: v for k, v in heads.items() if not k.startswith("lin4")})
    with pytest.raises(ValueError, match="VGG16"):
        augvae.load_lpips({"features.0.weight": vgg["features.0.weight"]}, heads)


def test_reconstruction_loss_terms():
    x = torch.full((1, 3, 16, 16), 0.8)
    x[:, :, 4:8, 4:8] = -1.0  # a dark object on a light background
    recon = x.clone()
    recon[:, :, 4:8, 4:8] = 0.0
    plain, terms = augvae.ReconstructionLoss()(recon, x)
    assert torch.allclose(plain, F.mse_loss(recon, x)) and set(terms) == {"mse"}
    weighted, _ = augvae.ReconstructionLoss(fg_weight=10.0)(recon, x)
    assert torch.allclose(weighted, 10 * plain)  # all the error is on the object
    vgg, heads = _lpips_files_state()
    loss, terms = augvae.ReconstructionLoss(augvae.load_lpips(vgg, heads), 0.1)(recon, x)
    assert torch.allclose(loss, terms["mse"] + 0.1 * terms["lpips"])


def test_psnr():
    x = torch.zeros(1, 3, 4, 4)
    assert abs(float(augvae.psnr(x + 0.2, x)) - 10 * torch.log10(torch.tensor(4 / 0.04))) < 1e-4


def test_sl_restarts_codes_the_token_level_does_not_use():
    torch.manual_seed(0)
    ml = AugVAE(tiny(restart_every=1)).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ml(x)
    sl = augvae.ml_to_sl(ml).train()
    _, _, stats = sl(x)  # one step: codes unused by level 1 move onto level-1 vectors
    used = set(stats["indices"][1].flatten().tolist())
    flat = sl.quant_conv(sl._latents(x)[1], 1).detach().permute(0, 2, 3, 1).reshape(-1, 16)
    moved = [k for k in range(64) if k not in used]
    assert moved and all(float((flat - sl.quantizer.embed[k]).norm(dim=1).min()) < 1e-4 for k in moved)
