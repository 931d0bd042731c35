"""bench.py at toy sizes: every benchmark path runs, and each fast path agrees with the reference
it is measured against (no speed is asserted: that is what bench.py prints)."""

import json
import os
import random
import statistics
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import biart
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = bench.SETTINGS["tiny"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_config(**overrides) -> biart.BiARTConfig:
    return biart.BiARTConfig.preset("medium", **{**TINY["train_overrides"], **overrides})


def restricted_mask(targets: torch.Tensor, config: biart.BiARTConfig) -> torch.Tensor:
    """(B, T) targets -> (B, T, V) True where an id is impossible at that position: the other
    modality's ids and the special ids (positions with ignored targets are left unmasked)."""
    ids = torch.arange(config.vocab_size)
    is_image = ids < config.image_vocab
    is_text = (ids >= config.text_offset) & (ids < config.pad_id)
    tgt_image = (targets >= 0) & (targets < config.image_vocab)
    tgt_text = (targets >= config.text_offset) & (targets < config.pad_id)
    return (tgt_image[..., None] & ~is_image) | (tgt_text[..., None] & ~is_text)


def test_baseline_and_biart_losses_agree_on_the_same_weights():
    config = tiny_config()
    torch.manual_seed(0)
    ours = biart.BiART(config).eval()
    base = bench.BaselineGPT(config).eval()
    base.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    text, image = bench.fake_batch(config, 3, seed=0)
    for direction in biart.DIRECTIONS:
        idx, seg, targets = biart.build_sequence(text, image, direction, config)
        full_logits, full_loss, _ = ours(idx, seg, targets, full_vocab=True)
        base_logits, base_loss = base(idx, seg, targets)
        assert torch.allclose(base_logits, full_logits, atol=1e-5)  # manual attention, written-out GELU: same model
        assert torch.allclose(base_loss, full_loss, atol=1e-5)  # the full-vocabulary loss
        # the fast restricted loss = the baseline's logits with each position's impossible ids masked
        _, loss, _ = ours(idx, seg, targets)
        masked = base_logits.masked_fill(restricted_mask(targets, config), float("-inf"))
        expect = F.cross_entropy(masked.flatten(0, 1), targets.flatten(), ignore_index=biart.IGNORE_INDEX)
        assert torch.allclose(loss, expect, atol=1e-5)


def test_flop_counts_match_torch_flop_counter():
    """The MFU numerators against torch's count of every matmul: the baseline's attention is
    bmm's; for ours, whose attention is SDPA, the matmuls outside attention are counted by torch
    and the causal attention term is the formula's own."""
    config = tiny_config()
    B, d, L, T = 2, config.n_embd, config.n_layer, config.block_size - 1
    text, image = bench.fake_batch(config, B, seed=0)
    idx, seg, targets = biart.build_sequence(text, image, "t2i", config)
    for kind, model in (("baseline", bench.BaselineGPT(config)), ("ours", biart.BiART(config))):
        with FlopCounterMode(display=False) as counter:
            model(idx, seg, targets)[1].backward()
        counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot" not in str(op))
        expect = B * bench.train_flops_per_sequence(config, kind)
        if kind == "ours":
            expect -= B * 3 * 2 * 2 * d * (T * (T + 1) // 2) * L  # q.k and att.v over the causal triangle
        assert counted == expect, kind
    medium = biart.BiARTConfig.preset("medium")
    assert bench.train_flops_per_sequence(medium, "ours") < bench.train_flops_per_sequence(medium, "baseline")


@pytest.mark.parametrize("kind,dtype", [("ours", "float32"), ("ours", "bfloat16"), ("baseline", "float32")])
def test_training_steps_run_and_learn(kind, dtype):
    step, _ = bench.make_trainer(kind, tiny_config(), 2, dtype, torch.device("cpu"))
    for _ in range(6):
        step()
    losses = step.state["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-2] < losses[0] and losses[-1] < losses[1]  # per direction (steps alternate)


def test_timed_sampling_steps_are_generates():
    """The cached and recompute steps bench.py times are generate's and generate_nocache's loop
    bodies: chained, they give the same tokens under one seed."""
    config = tiny_config()
    torch.manual_seed(0)
    model = biart.BiART(config).eval()
    text, _ = bench.fake_batch(config, 3, seed=1)
    g = torch.Generator()
    cached = model.generate(text, "t2i", generator=g.manual_seed(5))
    stepped = bench.sample_by_cache(model, text, config.image_len, g.manual_seed(5))
    recomputed = bench.sample_by_recompute(model, text, config.image_len, g.manual_seed(5))
    nocache = model.generate_nocache(text, "t2i", generator=g.manual_seed(5))
    assert torch.equal(cached, stepped) and torch.equal(cached, recomputed) and torch.equal(cached, nocache)


def test_sum_of_quadratic_is_exact_for_quadratics():
    f = lambda t: 0.5 + 0.01 * t + 3e-5 * t * t  # noqa: E731
    ts = [0, 511, 1023]
    assert bench.sum_of_quadratic(ts, [f(t) for t in ts], 1024) == pytest.approx(sum(f(t) for t in range(1024)))


@pytest.mark.parametrize("grid", [True, False])
def test_quantizer_matches_the_one_hot_reference(grid):
    """Identical indices, counts, outputs and codebook state after the EMA step (the chunked
    distances cover 4 chunks). On a 1/16 grid the sums are exact in any order, so everything is
    bit-identical; on arbitrary inputs the per-code sums may differ by summation order only."""
    shape, codes, chunk = [2, 16, 8, 8], 64, 32
    vq_a, z = bench.make_quantizer(shape, codes, chunk, torch.device("cpu"))
    vq_b, _ = bench.make_quantizer(shape, codes, chunk, torch.device("cpu"))
    if not grid:
        z = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    z_q, loss, idx, stats = vq_a(z)
    z_q_ref, loss_ref, idx_ref, counts_ref = bench.onehot_quantizer_step(vq_b, z)
    assert torch.equal(idx, idx_ref) and torch.equal(stats["counts"], counts_ref)
    assert int((counts_ref > 0).sum()) > 8  # a real test: many codes in use
    a, b = bench.quantizer_state(vq_a), bench.quantizer_state(vq_b)
    for k in a:
        if grid or a[k].dtype != torch.float32:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert torch.allclose(loss, loss_ref) and torch.allclose(z_q, z_q_ref)
    if grid:
        assert torch.equal(z_q, z_q_ref)


def test_bench_captions_deterministic():
    captions = bench.bench_captions(500)
    assert captions == bench.bench_captions(500)
    assert all(8 <= len(c.split()) <= 21 for c in captions)  # 8-20 words (+ a detached period)
    assert len({w for c in captions for w in c.lower().split()}) > 150


def test_tokenizer_part_with_and_without_dropout():
    """Row 5's measurement: captions/s without and with BPE-dropout 0.1, and the mean words and
    tokens per caption, each equal to what the test counts itself; dropout only splits words further."""
    captions = bench.bench_captions(300)
    tok = tokenizer.Tokenizer()
    tokens = sum(len(tok.encode(c)) for c in captions) / 300
    rng = random.Random(0)
    tokens_drop = sum(len(tok.encode(c, dropout=0.1, rng=rng)) for c in captions) / 300
    plain = bench.tokenizer_part("cpu", "ours", 300, 2)
    drop = bench.tokenizer_part("cpu", "ours", 300, 2, dropout=0.1)
    for r in (plain, drop):
        assert len(r["times"]) == 2 and r["captions_per_s"] == pytest.approx(300 / statistics.median(r["times"]))
        assert r["words_per_caption"] == pytest.approx(sum(len(c.split()) for c in captions) / 300)
    assert plain["tokens_per_caption"] == pytest.approx(tokens)
    assert drop["tokens_per_caption"] == pytest.approx(tokens_drop) and tokens_drop > tokens
    with pytest.raises(ValueError, match="no BPE-dropout"):
        bench.tokenizer_part("cpu", "clip", 10, 1, dropout=0.1)


MEMORY_PROBE = """
import torch, bench
with bench.MemoryProbe(torch.device("cpu")) as probe, bench.LoadMeter() as load:
    x = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
    del x
print(probe.peak, load.others)
"""


def test_memory_probe_and_load_meter():
    """In a fresh process, as bench.py measures every part: a 64 MiB tensor is a 64 MiB peak, whether
    or not this kernel lets VmHWM be reset (earlier tests' models are not in that process)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status: MemoryProbe reports None there")
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, others = r.stdout.split()
    assert 62 * bench.MIB <= int(peak) <= 80 * bench.MIB, peak
    assert float(others) >= 0.0


def test_e2e_row_reads_the_demo_results(tmp_path):
    missing = bench.e2e_row(str(tmp_path / "results.json"), run=False)
    assert "seconds" not in missing and "has not been run" in missing["status"]
    (tmp_path / "results.json").write_text(json.dumps({"seconds": 123.4, "other": 1}))
    row = bench.e2e_row(str(tmp_path / "results.json"), run=False)
    assert row["seconds"] == 123.4 and "read from" in row["status"]


def test_every_row_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--in-process", "--json", str(out)]) == 0
    j = json.loads(out.read_text())
    for key in ("mfu", "sampling_cache_speedup", "quantizer_speedup"):
        assert isinstance(j[key], float) and j[key] > 0, key
    # in one process a toy step may fit in memory the heap already holds: a peak of 0, no ratio
    assert j["quantizer_memory_ratio"] is None or j["quantizer_memory_ratio"] > 0
    assert j["quantizer_identical"] is True
    assert all(j[f"sampling_b{b}"]["identical_tokens"] is True for b in TINY["sample_batches"])
    assert {r["row"] for r in j["table"]} == {"1", "1b", "1d", "2", "3", "4", "5", "5b", "6", "7", "8"}
    assert set(j["prepare_images_per_s"]) == {"shards", "folder"} and all(v > 0 for v in j["prepare_images_per_s"].values())
    assert set(j["demo_vae_ml_step_s"]) == {"float32", "bfloat16"} and len(j["bf16_probe"]) == 1
    for r in j["table"]:
        assert r["machine"] and r["settings"]


def test_a_measurement_in_a_fresh_process():
    """The worker protocol the full run uses: one part in its own process, JSON on the last line."""
    spec = dict(device="cpu", kind="ours", shape=[2, 16, 8, 8], codes=64, chunk=32, repeats=3)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--worker", "quantizer",
                        "--spec", json.dumps(spec), "--threads", "1"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1][len(bench.RESULT_PREFIX):])
    assert len(result["times"]) == 3 and result["seconds"] > 0 and result["threads"] == 1
    assert result["peak_bytes"] is None or result["peak_bytes"] >= 0


def test_bad_flags_are_refused():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--rows", "1,9"], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and "--rows" in r.stderr
