"""Tests for biart.py: parameter count, sequence layout, losses, sampling, scoring, optimizer."""

import os
import sys

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from biart import (GEN, IGNORE_INDEX, REF, BiART, BiARTConfig, KVCache, build_sequence,  # noqa: E402
                   caption_to_model, check_text, filter_logits, text_from_model, text_to_model)

pytestmark = pytest.mark.usefixtures("one_thread")  # 1 thread: float64 sums in a fixed order


def tiny_config(**overrides) -> BiARTConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, text_len=6, image_len=8, image_vocab=16, text_vocab=20,
                dropout=0.0)
    return BiARTConfig(**{**base, **overrides})


def random_batch(config: BiARTConfig, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image): captions of random length 0 .. text_len - 1 (so every row has an EOT, most
    have [PAD]s) and random image tokens."""
    g = torch.Generator().manual_seed(seed)
    raw_eot = config.eot_id - config.text_offset
    rows = []
    for _ in range(B):
        n = int(torch.randint(0, config.text_len, (1,), generator=g))
        ids = torch.randint(0, config.text_vocab, (n,), generator=g)
        ids[ids == raw_eot] = 0
        rows.append(caption_to_model(ids.tolist(), config))
    image = torch.randint(0, config.image_vocab, (B, config.image_len), generator=g)
    return torch.stack(rows), image


def make_model(config: BiARTConfig, seed: int = 0, double: bool = False, sharpen: float = 1.0) -> BiART:
    """An eval-mode model; sharpen > 1 scales every matrix so that outputs depend strongly on the
    condition (at GPT-2 init they barely do), which the sampling tests need to be able to fail."""
    torch.manual_seed(seed)
    model = BiART(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(sharpen)
    return (model.double() if double else model).eval()


def favour_tokens(model: BiART, ids: torch.Tensor, strength: float = 6.0) -> None:
    """Add `strength` to the logits of `ids` at every position, through ln_f's bias."""
    with torch.no_grad():
        model.transformer.ln_f.bias[0] += 1.0
        model.lm_head.weight[ids, 0] += strength


# --- config and parameter count ----------------------------------------------------------

def test_paper_param_count_exact():
    config = BiARTConfig.preset('paper')
    with torch.device('meta'):
        model = BiART(config)
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    per_block = 12 * d * d + 13 * d  # qkv + proj + 2 MLP matrices, their biases, 2 LayerNorms
    assert per_block * L + V * d + config.block_size * d + 2 * d + 2 * d + V * d == 522_170_368
    assert model.get_num_params() == 522_170_368
    assert (config.vocab_size, config.block_size) == (57_603, 1_090)
    assert (config.pad_id, config.soc_id, config.soi_id, config.eot_id) == (57_600, 57_601, 57_602, 57_599)


def test_config_dict_round_trip_and_rejections():
    config = BiARTConfig.preset('small', text_vocab=300, eot_token=5)
    d = config.to_dict()
    assert all(v is None or type(v) in (int, float, bool, str) for v in d.values())
    assert BiARTConfig.from_dict(d) == config
    with pytest.raises(ValueError):
        BiARTConfig.from_dict({**d, 'n_layers': 3})
    with pytest.raises(ValueError):
        BiARTConfig.from_dict({k: v for k, v in d.items() if k != 'bias'})
    with pytest.raises(ValueError):
        BiARTConfig.preset('small', bogus=1)
    with pytest.raises(ValueError):
        BiARTConfig.preset('huge')
    with pytest.raises(ValueError):
        BiARTConfig(n_embd=100, n_head=16)
    with pytest.raises(ValueError):
        BiARTConfig(bias=1)
    with pytest.raises(ValueError):
        BiARTConfig(positions='absolute')
    # checkpoints written before the positions field existed load with minGPT's positions
    old = {k: v for k, v in d.items() if k != 'positions'}
    assert BiARTConfig.from_dict(old).positions == 'sequence'


def test_canonical_positions_give_each_token_one_place_in_both_directions():
    c = tiny_config(positions='canonical')
    model = make_model(c, double=True, sharpen=4.0)
    text, image = random_batch(c, 2, seed=3)
    seq = {d: build_sequence(text, image, d, c)[0] for d in ('t2i', 'i2t')}
    places = {d: model._positions(seq[d], 0, None) for d in seq}
    assert places['t2i'].tolist() == [list(range(c.block_size - 1))] * 2
    p = places['i2t'][0].tolist()  # [SOI] image [SOC] text[:-1]
    assert p[0] == c.text_len + 1 and p[1:c.image_len + 1] == list(range(c.text_len + 2, c.block_size))
    assert p[c.image_len + 1:] == list(range(0, c.text_len))
    # one step of the cached loop, given the direction, equals the same place from the start token
    assert torch.equal(model._positions(seq['i2t'][:, 5:6], 5, 'i2t'), places['i2t'][:, 5:6])
    # minGPT's: the place itself in both orders
    seq_model = make_model(tiny_config(), double=True)
    assert seq_model._positions(seq['i2t'], 0, None).tolist() == list(range(c.block_size - 1))
    # mixed directions in one batch (train_gpt --mix) get each row's own places
    mixed = torch.cat([seq['t2i'][:1], seq['i2t'][:1]])
    got = model._positions(mixed, 0, None)
    assert got[0].tolist() == list(range(c.block_size - 1)) and got[1].tolist() == p
    # the places change the outputs: canonical and minGPT positions differ in i2t, agree in t2i
    seq_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for d, same in (('t2i', True), ('i2t', False)):
            seg = build_sequence(text, image, d, c)[1]
            a, b = model(seq[d], seg)[0], seq_model(seq[d], seg)[0]
            assert torch.allclose(a, b) == same


# --- sequences ---------------------------------------------------------------------------

def test_build_sequence_layout():
    c = tiny_config()
    text = caption_to_model([3, 4], c)  # raw ids -> [3+16, 4+16, EOT, PAD, PAD, PAD]
    assert text.tolist() == [19, 20, c.eot_id, c.pad_id, c.pad_id, c.pad_id]
    text, image = text[None], torch.arange(8)[None]
    I = IGNORE_INDEX
    idx, seg, tgt = build_sequence(text, image, 't2i', c)
    assert idx[0].tolist() == [c.soc_id, 19, 20, c.eot_id, c.pad_id, c.pad_id, c.pad_id, c.soi_id, 0, 1, 2, 3, 4, 5, 6]
    assert seg[0].tolist() == [REF] * 7 + [GEN] * 8
    assert tgt[0].tolist() == [19, 20, c.eot_id, I, I, I, I, 0, 1, 2, 3, 4, 5, 6, 7]
    idx, seg, tgt = build_sequence(text, image, 'i2t', c)
    assert idx[0].tolist() == [c.soi_id, 0, 1, 2, 3, 4, 5, 6, 7, c.soc_id, 19, 20, c.eot_id, c.pad_id, c.pad_id]
    assert seg[0].tolist() == [REF] * 9 + [GEN] * 6
    assert tgt[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, I, 19, 20, c.eot_id, I, I, I]
    with pytest.raises(ValueError):
        build_sequence(text - c.text_offset, image, 't2i', c)  # raw ids, not offset
    with pytest.raises(ValueError):
        build_sequence(text, image, 'x2y', c)


def test_text_helpers():
    c = tiny_config()
    text = torch.stack([caption_to_model([1, 2, 3], c), caption_to_model([], c)])
    assert text_from_model(text, c) == [[1, 2, 3], []]
    assert text_to_model(torch.tensor([0, 19, -1]), c, raw_pad=-1).tolist() == [16, 35, c.pad_id]
    with pytest.raises(ValueError):
        caption_to_model([1] * 6, c)  # no room for the EOT
    assert caption_to_model([1] * 9, c, truncate=True).tolist() == [17] * 5 + [c.eot_id]
    with pytest.raises(ValueError):
        caption_to_model([1, 19], c)  # contains the raw EOT
    bad = text.clone()
    bad[1, 3] = 20  # a text token after the EOT and a [PAD]
    with pytest.raises(ValueError):
        check_text(bad, c)


# --- forward and losses ------------------------------------------------------------------

def test_forward_at_paper_sequence_length():
    config = BiARTConfig.preset('paper', n_layer=1, n_head=2, n_embd=64)
    model = make_model(config)
    text, image = random_batch(config, 2, seed=1)
    with torch.no_grad():
        for direction in ('t2i', 'i2t'):
            idx, seg, targets = build_sequence(text, image, direction, config)
            assert idx.shape == (2, 1089)
            logits, loss, parts = model(idx, seg, targets)
            assert logits is None
            # near-uniform at init: ln 8192 = 9.0 for images, ln 49408 = 10.8 for text
            assert 8.5 < loss.item() < 11.5
            image_part, text_part = (parts['gen'], parts['ref']) if direction == 't2i' else (parts['ref'], parts['gen'])
            assert abs(image_part.item() - 9.01) < 0.5 and abs(text_part.item() - 10.81) < 0.5
        logits, loss, parts = model(idx[:, :100], seg[:, :100])
        assert logits.shape == (2, 100, 57_603) and loss is None and parts is None


def test_segments_change_output():
    c = tiny_config()
    model = make_model(c)
    text, image = random_batch(c, 2, seed=2)
    idx, seg, targets = build_sequence(text, image, 't2i', c)
    with torch.no_grad():
        a, _, _ = model(idx, seg)
        b, _, _ = model(idx, 1 - seg)
        assert not torch.allclose(a, b, atol=1e-4)
        # the first position differs only by its segment
        assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)


def masked_full_vocab_loss(model: BiART, idx, seg, targets):
    """Reference: full-vocabulary logits with the ids that cannot occur at a position set to -inf."""
    c = model.config
    logits, _, _ = model(idx, seg)  # (B, T, V)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    nll = torch.zeros(targets.shape)
    valid = (targets != IGNORE_INDEX)
    ref = torch.zeros_like(valid)
    for b in range(idx.size(0)):
        t2i = idx[b, 0].item() == c.soc_id
        for p in range(idx.size(1)):
            predicts_image = (p > c.text_len) if t2i else (p < c.image_len)
            lo, hi = (0, c.image_vocab) if predicts_image else (c.text_offset, c.pad_id)
            mask[b, p, :lo] = True
            mask[b, p, hi:] = True
            ref[b, p] = p < (c.text_len if t2i else c.image_len)
    logits = logits.masked_fill(mask, -float('inf'))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction='none').view(targets.shape)
    loss = nll[valid].mean()
    return loss, nll[valid & ref].mean(), nll[valid & ~ref].mean(), nll[valid & ref].sum(), nll[valid & ~ref].sum(), \
        (valid & ref).sum(), (valid & ~ref).sum()


@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_restricted_loss_equals_masked_full_vocab_loss(positions):
    c = tiny_config(positions=positions)
    model = make_model(c, double=True)
    text, image = random_batch(c, 4, seed=3)
    with torch.no_grad():
        batches = [build_sequence(text, image, d, c) for d in ('t2i', 'i2t')]
        # a batch mixing both directions as well
        batches.append(tuple(torch.cat([x[:2], y[2:]]) for x, y in zip(*batches)))
        for idx, seg, targets in batches:
            _, loss, parts = model(idx, seg, targets)
            ref_loss, ref_part, gen_part, ref_sum, gen_sum, ref_n, gen_n = masked_full_vocab_loss(model, idx, seg, targets)
            torch.testing.assert_close(loss, ref_loss)
            torch.testing.assert_close(parts['ref'], ref_part)
            torch.testing.assert_close(parts['gen'], gen_part)
            for w in (0.0, 0.25):  # --ref-weight: each condition token counts w, each target token 1
                _, loss_w, parts_w = model(idx, seg, targets, ref_weight=w)
                torch.testing.assert_close(loss_w, (w * ref_sum + gen_sum) / (w * ref_n + gen_n))
                torch.testing.assert_close(parts_w['gen'], gen_part)
            full_logits, full_loss, _ = model(idx, seg, targets, full_vocab=True)
            assert full_logits.shape == (4, c.block_size - 1, c.vocab_size)
            assert full_loss.item() > loss.item() + 1e-3  # the unmasked loss spends mass on impossible ids


def test_loss_ignores_pad_targets_and_includes_eot():
    c = tiny_config()
    model = make_model(c, double=True)
    text, image = random_batch(c, 4, seed=4)
    assert (text == c.pad_id).any()
    with torch.no_grad():
        for direction in ('t2i', 'i2t'):
            idx, seg, targets = build_sequence(text, image, direction, c)
            _, loss, parts = model(idx, seg, targets)
            # [PAD] targets given as pad_id instead of IGNORE_INDEX: the same loss
            shifted = torch.cat([idx[:, 1:], idx[:, :1]], dim=1)  # raw next tokens (wrong only at the end)
            raw_targets = torch.where((targets == IGNORE_INDEX) & (shifted == c.pad_id), c.pad_id, targets)
            assert (raw_targets == c.pad_id).any()
            _, loss2, parts2 = model(idx, seg, raw_targets)
            torch.testing.assert_close(loss, loss2)
            torch.testing.assert_close(parts['ref'], parts2['ref'])
            # the end-of-text targets count: dropping them changes the text part's loss
            no_eot = targets.masked_fill(targets == c.eot_id, IGNORE_INDEX)
            _, loss3, parts3 = model(idx, seg, no_eot)
            text_part = 'ref' if direction == 't2i' else 'gen'
            assert abs(parts3[text_part].item() - parts[text_part].item()) > 1e-6
            assert abs(loss3.item() - loss.item()) > 1e-6


# --- scoring -----------------------------------------------------------------------------

def slow_score(model: BiART, cond: torch.Tensor, target: torch.Tensor, direction: str) -> float:
    """log p(target | cond) of one pair, one full forward per target token."""
    c = model.config
    first, second = (c.soc_id, c.soi_id) if direction == 't2i' else (c.soi_id, c.soc_id)
    lo, hi = (0, c.image_vocab) if direction == 't2i' else (c.text_offset, c.pad_id)
    prefix = [first] + cond.tolist() + [second]
    segs = [REF] * (len(prefix) - 1) + [GEN]
    total = 0.0
    for tok in target.tolist():
        if tok != c.pad_id:
            with torch.no_grad():
                logits, _, _ = model(torch.tensor([prefix]), torch.tensor([segs]))
            total += logits[0, -1, lo:hi].log_softmax(-1)[tok - lo].item()
        prefix.append(tok)
        segs.append(GEN)
    return total


@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_score_equals_slow_sum_of_log_probs(positions):
    c = tiny_config(positions=positions)
    model = make_model(c, double=True, sharpen=4.0)
    text, image = random_batch(c, 3, seed=5)
    for direction in ('t2i', 'i2t'):
        cond, target = (text, image) if direction == 't2i' else (image, text)
        got = model.score(cond, target, direction)
        assert got.shape == (3,)
        # one condition broadcast over candidate targets: its prefix runs once, shared through the cache
        shared = model.score(cond[:1], target, direction)
        assert shared.shape == (3,)
        for b in range(3):  # fp64 throughout: attention in fp32 gave ~2e-8
            assert abs(got[b].item() - slow_score(model, cond[b], target[b], direction)) < 1e-11
            assert abs(shared[b].item() - slow_score(model, cond[0], target[b], direction)) < 1e-11
        # and one target broadcast over conditions
        torch.testing.assert_close(model.score(cond, target[:1], direction),
                                   model.score(cond, target[:1].expand(3, -1), direction), rtol=0, atol=1e-11)


@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_cache_takes_several_tokens_after_a_prefix(positions):
    """The trunk run in pieces through the KV cache (a prefix, then several tokens at once, then
    one) gives the states of one causal pass over the whole sequence."""
    c = tiny_config(positions=positions)
    model = make_model(c, double=True, sharpen=4.0)
    text, image = random_batch(c, 2, seed=7)
    for direction in ('t2i', 'i2t'):
        idx, seg, _ = build_sequence(text, image, direction, c)
        whole = model._trunk(idx, seg)
        caches = [KVCache(c.block_size) for _ in range(c.n_layer)]
        cuts = [0, 5, 11, idx.size(1) - 1, idx.size(1)]
        parts = [model._trunk(idx[:, a:b], seg[:, a:b], caches, pos=a, direction=direction)
                 for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_text_logits_are_each_caption_places_next_token_logits(positions):
    c = tiny_config(positions=positions)
    model = make_model(c, double=True, sharpen=4.0)
    text, image = random_batch(c, 3, seed=6)
    got = model.text_logits(image, text)
    assert got.shape == (3, c.text_len, c.text_vocab)
    for b in range(3):  # place j: the image, [SOC] and the caption's first j tokens read one by one
        prefix, segs = [c.soi_id] + image[b].tolist() + [c.soc_id], [REF] * (c.image_len + 1) + [GEN]
        for j in range(c.text_len):
            with torch.no_grad():
                logits, _, _ = model(torch.tensor([prefix]), torch.tensor([segs]))
            torch.testing.assert_close(got[b, j], logits[0, -1, c.text_offset:c.pad_id])
            prefix.append(int(text[b, j]))
            segs.append(GEN)


# --- sampling ----------------------------------------------------------------------------

@pytest.mark.parametrize('direction', ['t2i', 'i2t'])
@pytest.mark.parametrize('num_samples,top_k,top_p,temperature,eot_boost', [
    (1, None, None, 1.0, 4.0), (3, 5, None, 1.0, 4.0), (3, None, 0.8, 1.3, 4.0), (2, 7, 0.9, 0.7, 4.0),
    (3, 5, None, 1.0, 8.0)])  # with the last, every caption ends early and sampling stops
@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_generate_cache_equals_nocache(direction, num_samples, top_k, top_p, temperature, eot_boost, positions):
    c = tiny_config(positions=positions)
    model = make_model(c, double=True, sharpen=8.0)
    favour_tokens(model, torch.tensor([c.eot_id]), strength=eot_boost)  # captions end early
    text, image = random_batch(c, 3, seed=6)
    cond = text if direction == 't2i' else image
    kwargs = dict(num_samples=num_samples, top_k=top_k, top_p=top_p, temperature=temperature)
    a = model.generate(cond, direction, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.generate_nocache(cond, direction, generator=torch.Generator().manual_seed(7), **kwargs)
    target_len = c.image_len if direction == 't2i' else c.text_len
    assert a.shape == (3 * num_samples, target_len)
    assert torch.equal(a, b)
    c2 = model.generate(cond, direction, generator=torch.Generator().manual_seed(8), **kwargs)
    if top_k != 1:
        assert not torch.equal(a, c2)  # the seed matters
    if direction == 'i2t':
        ended = (a[:, :-1] == c.eot_id).any(1)
        assert ended.any()  # the EOT path is exercised


@pytest.mark.parametrize('direction', ['t2i', 'i2t'])
@pytest.mark.parametrize('guidance', [0.0, 2.5])
@pytest.mark.parametrize('positions', ['sequence', 'canonical'])
def test_guided_generate_cache_equals_nocache(direction, guidance, positions):
    c = tiny_config(positions=positions)
    model = make_model(c, double=True, sharpen=8.0)
    favour_tokens(model, torch.tensor([c.eot_id]), strength=4.0)
    text, image = random_batch(c, 3, seed=6)
    cond = text if direction == 't2i' else image
    kwargs = dict(num_samples=2, top_k=5, temperature=0.9, guidance=guidance)
    a = model.generate(cond, direction, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.generate_nocache(cond, direction, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(a, b)
    plain = model.generate(cond, direction, generator=torch.Generator().manual_seed(7), num_samples=2, top_k=5,
                           temperature=0.9)
    assert not torch.equal(a, plain)  # guidance changes the samples


@pytest.mark.parametrize('direction', ['t2i', 'i2t'])
def test_guidance_combines_conditional_and_unconditional_logits(direction):
    """Greedy guided sampling = a step-by-step argmax of uncond + s (cond - uncond), both from plain
    forward passes: cond after `[S1] condition [S2]` and the tokens so far, uncond after the
    target's start token alone as [REF] (the other direction's order) and the tokens so far;
    s = 0 ignores the condition."""
    c = tiny_config(positions='canonical')
    model = make_model(c, double=True, sharpen=8.0)
    text, image = random_batch(c, 4, seed=11)
    cond = text if direction == 't2i' else image
    first, second = (c.soc_id, c.soi_id) if direction == 't2i' else (c.soi_id, c.soc_id)
    lo, hi = (0, c.image_vocab) if direction == 't2i' else (c.text_offset, c.pad_id)
    length = 4

    def reference(s):
        rows = []
        for b in range(4):
            prefix = [first] + cond[b].tolist() + [second]
            segs = [REF] * (len(prefix) - 1) + [GEN]
            uprefix, out = [second], []
            for _ in range(length):
                if out and out[-1] in (c.eot_id, c.pad_id):
                    tok = c.pad_id  # a caption that ended continues with [PAD]
                else:
                    with torch.no_grad():
                        lc = model(torch.tensor([prefix]), torch.tensor([segs]))[0][0, -1, lo:hi]
                        lu = model(torch.tensor([uprefix]), torch.tensor([[REF] * len(uprefix)]))[0][0, -1, lo:hi]
                    tok = int((lu + s * (lc - lu)).argmax()) + lo
                out.append(tok)
                prefix.append(tok)
                segs.append(GEN)
                uprefix.append(tok)
            rows.append(out)
        return torch.tensor(rows)

    plain = model.generate(cond, direction, length=length, top_k=1)
    assert torch.equal(plain, reference(1.0))
    for s in (0.0, 3.0):
        got = model.generate(cond, direction, length=length, top_k=1, guidance=s)
        assert torch.equal(got, reference(s))
        assert not torch.equal(got, plain)  # guidance changes what is drawn here
    unconditional = model.generate(cond, direction, length=length, top_k=1, guidance=0.0)
    assert (unconditional == unconditional[:1]).all()  # s = 0: the same tokens whatever the condition
    with pytest.raises(ValueError, match='guidance'):
        model.generate(cond, direction, guidance=-1.0)


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = lambda **kw: filter_logits(logits, **kw).softmax(-1)[0]  # noqa: E731
    torch.testing.assert_close(probs(), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(probs(top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs(top_p=0.6), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(probs(top_p=0.3), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(probs(top_k=3, top_p=0.55), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    hot = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 0.5
    torch.testing.assert_close(probs(temperature=2.0), hot / hot.sum())


def test_generate_length_and_num_samples_grouping():
    c = tiny_config()
    model = make_model(c, double=True, sharpen=8.0)
    text, image = random_batch(c, 2, seed=9)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = model.generate(image, 'i2t', num_samples=4, length=3, top_k=1, generator=g1)
    assert out.shape == (8, 3)
    # greedy: the 4 samples of one condition are identical, and equal to a single sample
    assert torch.equal(out[:4], out[:1].expand(4, -1)) and torch.equal(out[4:], out[4:5].expand(4, -1))
    assert not torch.equal(out[0], out[4])  # the two conditions give different captions
    assert torch.equal(out[::4], model.generate_nocache(image, 'i2t', length=3, top_k=1, generator=g2))
    with pytest.raises(ValueError):
        model.generate(text, 't2i', length=c.image_len + 1)
    with pytest.raises(ValueError):
        model.generate(text, 'i2t')  # text is not an image condition


def test_generate_only_target_modality():
    c = tiny_config()
    model = make_model(c)
    special = torch.tensor([c.pad_id, c.soc_id, c.soi_id])
    # make everything but the target modality very likely under the full-vocabulary head
    favour_tokens(model, torch.cat([torch.arange(c.text_offset, c.pad_id), special]), strength=20.0)
    text, image = random_batch(c, 2, seed=10)
    g = torch.Generator().manual_seed(0)
    img = model.generate(text, 't2i', num_samples=4, generator=g)
    assert ((img >= 0) & (img < c.image_vocab)).all()

    model = make_model(c)
    favour_tokens(model, torch.cat([torch.arange(c.image_vocab), special]), strength=20.0)
    favour_tokens(model, torch.tensor([c.eot_id]), strength=1.5)
    txt = model.generate(image, 'i2t', num_samples=4, generator=g)
    is_text = (txt >= c.text_offset) & (txt < c.pad_id)
    is_pad = txt == c.pad_id
    assert (is_text | is_pad).all()
    assert is_pad.any()
    is_eot = (txt == c.eot_id).long()
    after_eot = (is_eot.cumsum(1) - is_eot) > 0
    assert torch.equal(is_pad, after_eot)  # [PAD] exactly after the first EOT


# --- training ----------------------------------------------------------------------------

def test_overfit_one_batch_both_directions():
    c = tiny_config(n_layer=2, n_embd=64, n_head=4)
    torch.manual_seed(0)
    model = BiART(c)
    text, image = random_batch(c, 4, seed=11)
    batches = {d: build_sequence(text, image, d, c) for d in ('t2i', 'i2t')}
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                     device_type='cpu')
    first = {}
    for step in range(100):
        direction = ('t2i', 'i2t')[step % 2]  # alternate each iteration (section 3.4)
        _, loss, parts = model(*batches[direction])
        first.setdefault(direction, (loss.item(), parts['ref'].item(), parts['gen'].item()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for direction, (loss0, ref0, gen0) in first.items():
            _, loss, parts = model(*batches[direction])
            assert loss.item() < 0.2 * loss0, (direction, loss0, loss.item())
            assert parts['ref'].item() < 0.3 * ref0 and parts['gen'].item() < 0.3 * gen0


def test_optimizer_groups():
    c = tiny_config()
    model = BiART(c)
    opt = model.configure_optimizers(weight_decay=0.01, learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8,
                                     device_type='cpu')
    decay = {id(p) for p in opt.param_groups[0]['params']}
    no_decay = {id(p) for p in opt.param_groups[1]['params']}
    assert opt.param_groups[0]['weight_decay'] == 0.01 and opt.param_groups[1]['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay | no_decay == set(names) and not decay & no_decay
    decay_names = sorted(names[i] for i in decay)
    no_decay_names = sorted(names[i] for i in no_decay)
    for n in ('transformer.wte.weight', 'transformer.wpe.weight', 'transformer.wse.weight',
              'transformer.ln_f.weight', 'transformer.ln_f.bias', 'transformer.h.0.ln_1.weight',
              'transformer.h.0.attn.c_attn.bias', 'transformer.h.1.mlp.c_proj.bias'):
        assert n in no_decay_names, n
    assert all(n.endswith('.weight') and ('c_' in n or n == 'lm_head.weight') for n in decay_names)
    assert len(decay_names) == 4 * c.n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj; lm_head
    assert opt.param_groups[0]['betas'] == (0.9, 0.95) and opt.param_groups[0]['eps'] == 1e-8


