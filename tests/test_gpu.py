"""The CUDA paths, each once, on a GPU (every test here is skipped without one):
  1. BiART: train steps under bf16 autocast and under fp16 with a GradScaler, fused AdamW;
     SDPA's flash kernel forced on for a training step with dropout; cached vs recompute sampling.
  2. AugVAE ML: train steps under bf16 autocast, fused AdamW; the VQ statistics stay fp32.
  3. torch.compile of a BiART training step.
  4. The scripts under torchrun with NCCL (min(2, GPUs) processes): train_vae.py --ml (bf16),
     --sl (fp16 + GradScaler), prepare.py, tokenizer.py train, train_gpt.py (bf16); with two
     processes, both ranks must end with bit-identical weights (on CPU, with gloo, the other
     test files check that too).
  5. `python bench.py --quick` on the GPU: every row runs there (its table is printed).

    python -m pytest tests/test_gpu.py -v -s    # -s shows each check's figures and bench.py's table

For the benchmark table alone: `python bench.py --quick --device cuda`.
"""

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch.nn import functional as F

import augvae
import bench
import biart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
DEV_FLAG = ["--device", "cuda"]
VAE_ARGS = ["--image-size", "32", "--batch-size", "4", "--train-size", "64", "--val-size", "8",
            "--grid-images", "4", "--log-every", "1", *DEV_FLAG]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False): AMP, NCCL DDP and CUDA sampling checks")


@pytest.fixture(scope="module")
def device():
    """cuda:0 with TF32 matmuls and convolutions allowed, as the training scripts run."""
    dev = torch.device("cuda", 0)  # torch.cuda.set_device needs an index
    torch.cuda.set_device(dev)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"\ntorch {torch.__version__}, device {dev} ({torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} GPU(s), bf16 {torch.cuda.is_bf16_supported()}, "
          f"NCCL {torch.distributed.is_nccl_available()})")
    yield dev
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def world(device) -> int:
    """Processes per torchrun: two where there are two GPUs, else one."""
    return min(2, torch.cuda.device_count())


# -----------------------------------------------------------------------------------------
# 1-3: the two models' steps in this process

def biart_steps(device: torch.device, dtype: torch.dtype, steps: int = 3, flash: bool = False) -> str:
    """train_gpt.py's step (autocast, GradScaler for fp16, clip at 1, AdamW) on a 2-layer medium
    BiART with dropout 0.1, alternating directions; the losses must stay finite."""
    cfg = biart.BiARTConfig.preset("medium", n_layer=2, dropout=0.1)
    torch.manual_seed(0)
    model = biart.BiART(cfg).to(device).train()
    opt = model.configure_optimizers(0.01, 3e-4, (0.9, 0.95), 1e-8, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    text, image = bench.fake_batch(cfg, 4, 0)
    losses = []
    for i in range(steps):
        idx, seg, targets = (t.to(device) for t in biart.build_sequence(text, image, biart.DIRECTIONS[i % 2], cfg))
        ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        kern = contextlib.nullcontext()
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kern = sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # raises if flash cannot run these inputs
        with ctx, kern:
            loss = model(idx, seg, targets)[1]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses), f"non-finite losses {losses}"
    fused = opt.param_groups[0].get("fused")
    return f"losses {', '.join(f'{x:.3f}' for x in losses)}; fused AdamW {fused}"


def test_biart_bf16_autocast_train_steps(device):
    print(biart_steps(device, torch.bfloat16))


def test_biart_fp16_autocast_gradscaler_train_steps(device):
    print(biart_steps(device, torch.float16))


def test_biart_train_step_with_sdpa_forced_to_flash(device):
    """Dropout 0.1 inside the flash kernel (CUDA only: the CPU flash kernel has no dropout)."""
    print(biart_steps(device, torch.bfloat16, 1, flash=True))


def test_biart_cached_vs_recompute_sampling(device):
    """generate against generate_nocache, same seed, exact fp32 (TF32 off), 32 tokens: text->image
    unguided and with guidance 2, image->text. The count of identical rows is reported (printed,
    and a warning when some differ), not asserted: on CUDA the cached and the full-sequence
    attention are different kernels (on CPU, tests/test_bench.py asserts identical tokens)."""
    torch.manual_seed(0)
    model = biart.BiART(biart.BiARTConfig.preset("medium", n_layer=2)).to(device).eval()
    text, _ = bench.fake_batch(model.config, 2, 0)
    text = text.to(device)
    g = torch.Generator(device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
    image = torch.randint(0, model.config.image_vocab, (2, model.config.image_len), device=device)
    runs, differ = [], False
    try:
        for cond, direction, guidance in ((text, "t2i", 1.0), (text, "t2i", 2.0), (image, "i2t", 1.0)):
            a = model.generate(cond, direction, length=32, generator=g.manual_seed(0), guidance=guidance)
            b = model.generate_nocache(cond, direction, length=32, generator=g.manual_seed(0), guidance=guidance)
            assert a.shape == b.shape == (2, 32), (a.shape, b.shape)
            same = int((a == b).all(1).sum())
            differ |= same < a.size(0)
            runs.append(f"{direction} guidance {guidance:g}: {same} of {a.size(0)}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    detail = "rows identical over 32 tokens (cached vs recompute, fp32, same seed): " + "; ".join(runs)
    print(detail)
    if differ:
        warnings.warn(detail)


def test_augvae_ml_bf16_autocast_train_steps(device):
    torch.manual_seed(0)
    model = augvae.AugVAE(augvae.preset("small")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.rand(4, 3, 64, 64, device=device) * 2 - 1
    losses = []
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            recon, commit, _ = model(x)
            loss = F.mse_loss(recon.float(), x) + commit
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    q = model.quantizer
    assert all(b.dtype in (torch.float32, torch.long, torch.bool) for b in q.buffers()), \
        "a quantizer buffer is no longer fp32 after autocast steps"
    assert all(math.isfinite(v) for v in losses), f"non-finite losses {losses}"
    print(f"losses {', '.join(f'{v:.3f}' for v in losses)}")


def test_compiled_biart_train_step(device):
    """torch.compile (an optional path: the scripts run eager unless asked) of bench.py's step."""
    step, _ = bench.make_trainer("ours", biart.BiARTConfig.preset("medium", n_layer=2, dropout=0.0), 2,
                                 "bfloat16", device, compile_model=True)
    t0 = time.perf_counter()
    step()
    step()
    bench.sync(device)
    print(f"2 compiled steps (compiling included) in {time.perf_counter() - t0:.0f} s, losses {step.state['losses']}")


# -----------------------------------------------------------------------------------------
# 4: the scripts under torchrun with NCCL, each on the previous one's output

def torchrun(script: str, args: list, procs: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           os.path.join(ROOT, script), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd[3:])} exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"


def same_ranks(folder, world: int) -> str:
    """With two processes, rank0.pt and rank1.pt (tests/ddp_train.py) must be bit-identical."""
    if world < 2:
        return "one process (one GPU): NCCL DDP ran with world size 1"
    a = torch.load(os.path.join(folder, "rank0.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(folder, "rank1.pt"), map_location="cpu", weights_only=True)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"ranks differ in {len(bad)} tensors, e.g. {bad[0]}"
    return f"{world} processes, ranks bit-identical ({len(a)} tensors)"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_pipeline")


@pytest.fixture(scope="module")
def vae_ml(work, world):
    out = work / "vae_ml"
    torchrun("tests/ddp_train.py", ["train_vae", "--ml", *VAE_ARGS, "--max-steps", "4", "--eval-every", "2",
                                        "--dtype", "bfloat16", "--out", str(out)], world)
    return out


@pytest.fixture(scope="module")
def vae_sl(work, world, vae_ml):
    out = work / "vae_sl"
    torchrun("tests/ddp_train.py", ["train_vae", "--sl", "--init", str(vae_ml / "best.pt"), *VAE_ARGS,
                                        "--max-steps", "2", "--dtype", "float16", "--out", str(out)], world)
    return out


@pytest.fixture(scope="module")
def tokens(work, world, vae_sl):
    out = work / "tokens"
    torchrun("prepare.py", ["--vae", str(vae_sl / "best.pt"), "--out", str(out), "--train-size", "64",
                            "--val-size", "8", "--test-size", "0", "--heldout-size", "0", "--chunk-size", "16",
                            *DEV_FLAG], world)
    return out


@pytest.fixture(scope="module")
def bpe(work, tokens):
    """`python tokenizer.py train` on the training captions prepare.py wrote."""
    out = work / "bpe.txt.gz"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), "train", str(tokens / "train.jsonl"),
                        "--vocab-size", "600", "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-1000:]
    return out


def test_train_vae_ml_under_torchrun_nccl_bf16(vae_ml, world):
    print(same_ranks(vae_ml, world))


def test_train_vae_sl_under_torchrun_fp16_gradscaler(vae_sl, world):
    print(same_ranks(vae_sl, world))


def test_prepare_under_torchrun(tokens, world):
    assert (tokens / "train.jsonl").is_file()
    print(f"{world} process(es), {len(os.listdir(tokens))} files in the token folder")


def test_tokenizer_train(bpe):
    assert bpe.is_file()


def test_train_gpt_under_torchrun_bf16(work, world, tokens, bpe):
    out = work / "gpt"
    torchrun("tests/ddp_train.py", [
        "train_gpt", "--tokens", str(tokens), "--bpe", str(bpe), "--n-layer", "2", "--n-embd", "64", "--n-head", "2",
        "--batch-size", "4", "--eval-images", "8", "--log-every", "1", "--max-steps", "4", "--eval-every", "2",
        "--dtype", "bfloat16", *DEV_FLAG, "--out", str(out)], world)
    print(same_ranks(out, world))


# -----------------------------------------------------------------------------------------
# 5: bench.py's rows on the GPU

def test_bench_rows_on_the_device(device, tmp_path):
    """`python bench.py --quick --device cuda:0` runs every row on the GPU; its table is printed."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", str(device), "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       timeout=1800)
    print(r.stdout, flush=True)
    assert r.returncode == 0, r.stderr[-2000:]
    j = json.loads(out.read_text())
    print(", ".join(f"{k} {j[k]:.3g}" for k in ("mfu", "sampling_cache_speedup", "quantizer_speedup",
                                                 "quantizer_memory_ratio") if j.get(k) is not None))
