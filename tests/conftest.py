import os
import sys

# tests import the top-level modules (augvae, data, ...) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """In-process work shares 2 cores with subprocesses: 1 thread, like OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_when_logged():
    """ddp_launch.kill_when_logged as a fixture: run(cmd, log, marker, env, cwd) starts `cmd`,
    waits until `log` contains `marker` and kills it with kill -9."""
    from ddp_launch import kill_when_logged as kill

    def run(cmd: list, log, marker: str, env: dict, cwd: str):
        kill(cmd, log, marker, env=env, cwd=cwd)
    return run


def cli(run, capsys, name: str | None = None) -> tuple:
    """A script's command line in-process -> (exit status, stdout, stderr): `run` is a
    lambda calling its main(argv); with `name`, through runtime.run_cli as its __main__ does
    (scripts whose main handles its own errors, like tokenizer.py's, pass no name). Bad-input
    cases run here without a fresh interpreter each (about 2 s of imports); every script's tests
    keep one subprocess run of the real command line."""
    code = 0
    try:
        runtime.run_cli(run, name) if name else run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def kill_points(log_text: str, warmdown_from: int) -> dict:
    """From an uninterrupted run's log: the first checkpoint step inside the warmdown (after
    step `warmdown_from`) and the first step whose evaluation halved the lr, where (with
    --ckpt-every equal to --eval-every) a checkpoint follows the halving at once."""
    lines = log_text.splitlines()
    saved = [int(l.split()[3]) for l in lines if l.startswith("saved checkpoint step ")]
    halved = [int(lines[i - 1].split()[2].rstrip(":")) for i, l in enumerate(lines)
              if "lr halved" in l and lines[i - 1].startswith("eval step ")]
    assert halved, "no plateau halving in the uninterrupted run: make the plateau test harder"
    return {"warmdown": min(s for s in saved if s > warmdown_from), "plateau": halved[0]}


# --- the tiny pipeline several test files share --------------------------------------------

import augvae  # noqa: E402
import runtime  # noqa: E402
import data  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def save_tiny_vae(path, single_level: bool = True, codebook_size: int = 512, images: int = 32):
    """A tiny AugVAE (the small preset at 32 px: 4x4 SL tokens) in train_vae.py's checkpoint
    layout. One training-mode forward lets the quantizer take its codebook from encoder
    outputs, so tokens vary with the image (a fresh N(0, 1) codebook maps nearly everything to
    one code, and would make every check weak)."""
    torch.manual_seed(0)
    cfg = augvae.preset("small", image_size=32, single_level=single_level, codebook_size=codebook_size)
    model = augvae.AugVAE(cfg)
    model.train()(torch.stack([data.ShapesDataset("train", 32, 32)[i] for i in range(images)]))
    runtime.save_checkpoint({"kind": augvae.CHECKPOINT_KIND, "format_version": runtime.CHECKPOINT_FORMAT,
                          "config": cfg.to_dict(), "model": model.state_dict(), "step": 0}, path)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory):
    """prepare.py on 64 shapes (1 crop each) with a tiny AugVAE-SL, and a BPE learned from the
    training captions with `python tokenizer.py train`. -> (tokens dir, bpe path, vae path)."""
    import prepare
    folder = tmp_path_factory.mktemp("tiny_tokens")
    vae = folder / "vae.pt"
    save_tiny_vae(vae)
    tokens = folder / "tokens"
    prepare.main(["--vae", str(vae), "--out", str(tokens), "--train-size", "64", "--val-size", "8",
                  "--test-size", "0", "--heldout-size", "0", "--crops", "1", "--chunk-size", "32"])
    bpe = folder / "bpe.txt.gz"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), "train", str(tokens / "train.jsonl"),
                        "--vocab-size", "600", "--out", str(bpe)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return tokens, bpe, vae


@pytest.fixture(scope="session")
def tiny_models(tiny_tokens):
    """tiny_tokens plus 30 steps of train_gpt.py (1 layer, 32 wide). -> (vae path, gpt path)."""
    import train_gpt
    tokens, bpe, vae = tiny_tokens
    gpt = tokens.parent / "gpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_gpt.main(["--tokens", str(tokens), "--bpe", str(bpe), "--out", str(gpt), "--n-layer", "1",
                    "--n-embd", "32", "--n-head", "2", "--batch-size", "8", "--eval-images", "8",
                    "--max-steps", "30", "--lr", "3e-3", "--device", "cpu"])
    torch.set_num_threads(threads)
    return str(vae), str(gpt / "ckpt.pt")


def write_tar(path, members) -> list:
    """A tar file of (name, bytes) members, in order, as WebDataset's writer lays them out
    (Python's tarfile: two zero blocks at the end, padded to 10 KiB). -> each member's header offset."""
    import io
    import tarfile
    offsets = []
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, content in members:
            offsets.append(f.tell())
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return offsets


def png_bytes(pixels) -> bytes:
    """An (H, W, 3) uint8 array as PNG file bytes."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()
