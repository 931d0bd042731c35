"""
The training runtime that train_vae.py, train_gpt.py and prepare.py share: torchrun start-up
(DDP: gloo on CPU, NCCL on CUDA), autocast, the learning-rate schedule, a resumable rank-sharded
order of micro-batches, RNG capture, checkpoints that hold everything an exact resume needs,
atomic file writes, and flag parsing. No dataset, no model: those live in data.py / shapes.py
and augvae.py / biart.py.
"""

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields

import torch

# -----------------------------------------------------------------------------
# files: one-line errors, atomic writes


def first_line(e: BaseException) -> str:
    """'Type: first line of the message', for one-line error reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_atomic(path, write, binary: bool = True, what: str = "") -> None:
    """write(f) fills a temp file beside `path` (its folder is created), which is fsynced and
    then os.replace'd onto `path`, so a kill or a full disk never leaves a half-written file
    where the previous one was. A failed write removes the temp file and raises one OSError
    naming `path` ("could not write [what ]path: reason")."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        # torch.save reports a failed write (full disk, file-size limit) as a RuntimeError
        # ("unexpected pos ...") raised while handling the OSError: name that one
        cause = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
        raise OSError(f"could not write {what + ' ' if what else ''}{path}: {reason}") from None


def write_text(path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text), binary=False)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# processes, devices, precision


def resolve_device(name: str) -> torch.device:
    """--device: 'auto' is cuda when there is one, else cpu; a CUDA device without CUDA is a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return torch.device(name)

# ----------------------------------------------------------------------------------------
# training plumbing shared by the train scripts: a resumable, rank-sharded order of
# micro-batches, RNG state capture, checkpoint files

class EpochIndexed(torch.utils.data.Dataset):
    """Index j = epoch * n + i -> dataset[i] with the dataset's augmentation RNG set for that
    epoch, so random crops depend only on (seed, epoch, i): reproducible across resumes and
    worker processes."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __getitem__(self, j):
        epoch, i = divmod(j, self.n)
        base = self.ds.dataset if isinstance(self.ds, torch.utils.data.Subset) else self.ds
        if hasattr(base, "set_epoch"):
            base.set_epoch(epoch)
        return self.ds[i]

    def __len__(self):
        return 1 << 62


class MicroBatches(torch.utils.data.Sampler):
    """Endless micro-batches of dataset indices, starting at micro-batch `start`. Each epoch
    is a permutation seeded by (seed, epoch); rank r takes the r-th slice of every group of
    `world` micro-batches, so the order depends only on (seed, batch size, world size)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int):
        self.n, self.bs, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{n} training images are fewer than one batch of {batch_size} x {world} processes")

    def __iter__(self):
        b, perm_epoch, perm = self.start, -1, None
        while True:
            epoch, k = divmod(b, self.per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
                perm_epoch = epoch
            s = (k * self.world + self.rank) * self.bs
            yield [epoch * self.n + int(i) for i in perm[s:s + self.bs]]
            b += 1


def start_processes(device: str) -> tuple:
    """torchrun-aware start of a training script -> (ddp, rank, world, device). DDP is on when
    torchrun set RANK: gloo on CPU, NCCL on CUDA, each process on cuda:LOCAL_RANK. 'auto'
    picks cuda when there is one. TF32 matmuls are allowed on CUDA."""
    device = str(resolve_device(device))
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    if ddp:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, world, device


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What a measured figure needs beside it: CPU model, cores, threads, torch, device (and GPU)."""
    m = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    return m


def cpu_bf16_speedup(repeats: int = 3) -> float:
    """Measured on this CPU, now: the time of a small fp32 training step over the same step's
    under bf16 autocast (> 1: bf16 is faster here). The step holds the two kinds of work the CPU
    demo trains: a 3x3 convolution at AugVAE's width and a transformer-sized linear layer at
    BiART's (about 8 GFLOP, forward and backward). Best of `repeats` after one warm-up; about a
    second in all, 4 s where bf16 is emulated (AMD Zen 3). Decides --dtype auto on the CPU instead
    of a cpuinfo flag, which says what instructions exist, not how fast this build of torch runs them."""
    g = torch.Generator().manual_seed(0)
    conv, lin = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Linear(256, 1024)
    x, y = torch.randn(16, 64, 32, 32, generator=g), torch.randn(2816, 256, generator=g)

    def best(dtype) -> float:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = conv(x).float().square().mean() + lin(y).float().square().mean()
            loss.backward()
            times.append(time.perf_counter() - t0)
        return min(times[1:])
    return best(torch.float32) / best(torch.bfloat16)


def autocast_context(device: torch.device, dtype: str) -> tuple:
    """-> (context, torch dtype, amp on?). 'auto': bf16 on a GPU that has it, else fp16 on CUDA;
    fp32 on CPU. 'bfloat16' also autocasts on CPU (faster where cpu_bf16_speedup() > 1); fp16 is
    CUDA only and needs a GradScaler."""
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dt == torch.float16 and device.type != "cuda":
        raise ValueError("--dtype float16 needs a CUDA device; on CPU use bfloat16 or float32")
    amp = dt != torch.float32
    return (torch.autocast(device.type, dtype=dt) if amp else contextlib.nullcontext()), dt, amp


def require_nonnegative(cfg: dict, keys) -> None:
    """A ValueError naming the first of these flags whose value is not >= 0 (nan included)."""
    for key in keys:
        if not cfg[key] >= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")


def resume_settings(cfg: dict, kind: str) -> tuple:
    """For --resume: load OUT/ckpt.pt and return (settings, checkpoint), where the settings are
    the saved run's, overridden by the flags given explicitly now (cfg['_given']); a setting
    the checkpoint predates takes its default."""
    if not cfg["out"]:
        raise ValueError("--resume needs --out (the folder of the run to continue)")
    path = os.path.join(cfg["out"], "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path, kind)
    missing = [k for k in ("train", "optimizer", "scaler", "rng", "step") if k not in ckpt]
    if missing:  # e.g. a best.pt copied over ckpt.pt: weights without the state of a run
        raise CheckpointError(f"{path} holds no training state ({', '.join(missing)} missing): --resume needs the "
                              "ckpt.pt a run wrote; to start from these weights use --init")
    given = set(cfg["_given"]) - {"resume"}
    defaults = {k: v for k, v in cfg.items() if k != "_given"}
    return {**defaults, **ckpt["train"], **{k: cfg[k] for k in given}, "resume": True}, ckpt


def scheduled_lr(lr: float, step: int, max_steps: int, warmup: int = 0, warmdown: int = 0,
                 min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from 0 over the first
    `warmup` steps, then `lr`, then a linear decay to `min_lr` over the last `warmdown` steps of
    `max_steps`. A function of the step alone, so a resumed run follows it exactly."""
    now = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    left = max_steps - step
    if left <= warmdown:
        now = min_lr + (now - min_lr) * left / warmdown
    return now


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def all_rng_states(world: int, data_position=None) -> list:
    """Every rank's RNG state (rank order), gathered on all ranks, for the checkpoint; with
    `data_position`, this rank's place in a data stream of its own goes with it ("data")."""
    mine = rng_state()
    if data_position is not None:
        mine["data"] = data_position
    if world == 1:
        return [mine]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------
# checkpoints and weight files: plain dicts of tensors and primitives, loaded weights-only
# (a pickle that would run code is refused), written atomically.

CHECKPOINT_FORMAT = 1  # bump when the layout changes; newer files are refused with a message


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another kind or of a newer format."""


def unreadable(path: str, e: BaseException, what: str) -> str:
    """Why torch.load failed on `path`, in one line. A refused pickle (one that would run code:
    weights_only) is 'not a loadable weights file'; an empty or cut-short file (a copy or a write
    that did not finish) says so, where torch's own message would be an EOFError, "PytorchStreamReader
    failed reading zip archive" or, on a truncated zip, OSError "[Errno 22] Invalid argument"."""
    message = first_line(e)[:200]
    if "weights only load failed" in message.lower():
        return f"{path}: not a loadable weights file ({message})"
    size = os.path.getsize(path)
    if size == 0:
        reason = "the file is empty (0 bytes)"
    else:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format: a zip, its directory at the end
        if zipped and not zipfile.is_zipfile(path):
            reason = f"the file is truncated ({size:,} bytes and no zip directory at the end)"
        else:
            reason = f"the file is truncated or not a {what} ({message})"
    return f"could not read {what} {path}: {reason}"


def load_weights(path, what: str = "weights file") -> dict:
    """torch.load a file of tensors safely (weights_only=True) with a one-line error naming the
    file (`what`: the word for it there, 'checkpoint' for a training checkpoint)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not loadable"
        raise CheckpointError(unreadable(path, e, what)) from None


def load_checkpoint(path, kind: str) -> dict:
    """Load a training checkpoint and check that it is a `kind` ('augvae', 'biart') one."""
    ckpt = load_weights(path, "checkpoint")
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no kind/config/model entries)")
    if ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: is a {ckpt['kind']!r} checkpoint, expected {kind!r}")
    if int(ckpt.get("format_version", 0)) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this code "
                              f"understands ({CHECKPOINT_FORMAT}); update the code")
    return ckpt


class TrainingError(Exception):
    """A failure that stops training with a one-line message (the last checkpoint is kept)."""


def check_finite_loss(loss: torch.Tensor, step: int, ckpt_path, world: int = 1) -> None:
    """Stop training on a NaN/inf loss: a TrainingError naming the step and what is kept at
    ckpt_path. With world > 1 (DDP) the ranks' losses are gathered first, so every rank stops
    at the same micro-step with the same message, where a rank stopping alone would leave the
    others waiting in the gradient all-reduce."""
    value = loss.detach().float().reshape(1)
    where = ""
    if world > 1:
        values = [torch.empty_like(value) for _ in range(world)]
        torch.distributed.all_gather(values, value)
        bad = [r for r, v in enumerate(values) if not torch.isfinite(v).all()]
        if bad:
            value, where = values[bad[0]], f" on rank {bad[0]}"
    if not torch.isfinite(value).all():
        raise TrainingError(f"loss is {float(value)} at step {step}{where}: stopping; " + kept_checkpoint(ckpt_path))


def kept_checkpoint(path) -> str:
    """What a training run that must stop leaves behind, for its error message."""
    if not os.path.exists(path):
        return f"no checkpoint was written yet ({path} does not exist)"
    try:
        step = int(load_weights(path, "checkpoint").get("step", 0))
        return f"the last good checkpoint is kept at {path} (step {step})"
    except CheckpointError as e:
        return f"the checkpoint at {path} is not loadable ({e})"


def save_checkpoint(obj: dict, path) -> None:
    """torch.save atomically (write_atomic): a kill never leaves a half-written checkpoint."""
    write_atomic(path, lambda f: torch.save(obj, f), what="checkpoint")


# -----------------------------------------------------------------------------
# the training loop's state, logging, model wrapping and checkpoints, shared by both trainers


@dataclass
class LoopState:
    """What the loop carries from step to step besides the model and optimizer; all of it is
    saved in the checkpoint, so a resume continues exactly. `lr` is the base rate: the peak
    of the schedule (scheduled_lr), halved at each validation plateau, never a scheduled value."""
    step: int = 0
    lr: float = 0.0
    best_val: float = math.inf
    bad_evals: int = 0

    def after_eval(self, val_loss: float, patience: int, min_lr: float, count: bool = True) -> str | None:
        """Record an evaluation -> 'better' (a new best loss; the count restarts), 'halved' (the
        `patience`-th evaluation in a row without one, counted only while `count`, halved the base
        rate, never below min_lr) or None."""
        if val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            return "better"
        if not count:
            return None
        self.bad_evals += 1
        if self.bad_evals >= patience and self.lr / 2 >= min_lr:
            self.lr, self.bad_evals = self.lr / 2, 0
            return "halved"
        return None


class Log:
    """Rank 0's log: each line to the console (above the progress bar) and appended to OUT/log.txt."""

    def __init__(self, out: str, master: bool):
        self.file = open(os.path.join(out, "log.txt"), "a") if master else None

    def __call__(self, msg: str) -> None:
        if self.file is not None:
            from tqdm import tqdm
            tqdm.write(msg)
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def distribute(model: torch.nn.Module, device: torch.device, ddp: bool, **ddp_kw) -> torch.nn.Module:
    """Move the model to `device`; under DDP every rank takes rank 0's weights and buffers and the
    model is wrapped in DistributedDataParallel. -> the model to call (the wrapper or the model)."""
    model.to(device)  # first: NCCL broadcasts CUDA tensors only
    if not ddp:
        return model
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, 0)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kw)


def loaders(train_ds, val_ds, batch_size: int, rank: int, world: int, seed: int, start: int, workers: int,
            device: torch.device) -> tuple:
    """-> (endless iterator of training micro-batches from micro-batch `start` on (MicroBatches
    over EpochIndexed), this rank's share of the validation set as a DataLoader)."""
    sampler = MicroBatches(len(train_ds), batch_size, rank, world, seed, start)
    train = iter(torch.utils.data.DataLoader(EpochIndexed(train_ds, len(train_ds)), batch_sampler=sampler,
                                             num_workers=workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(seed)))
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world))),
                                      batch_size=batch_size, num_workers=workers,
                                      generator=torch.Generator().manual_seed(seed))  # the global RNG untouched
    return train, val


def optimizer_step(model: torch.nn.Module, optimizer, scaler, grad_clip: float) -> None:
    """Clip the (unscaled) gradient norm when grad_clip > 0, step, update the scaler, zero the grads."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def training_checkpoint(kind: str, model_cfg: dict, model: torch.nn.Module, optimizer, scaler, state: LoopState,
                        cfg: dict, grad_accum: int, rngs: list, **extra) -> dict:
    """Everything an exact resume needs: weights, optimizer, scaler, the loop state (base lr
    included), the settings, the data position and every rank's RNG state."""
    return {"kind": kind, "format_version": CHECKPOINT_FORMAT, "config": model_cfg, "model": model.state_dict(),
            "train": {k: v for k, v in cfg.items() if k != "resume"},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            **asdict(state), "data_position": state.step * grad_accum, "rng": rngs, **extra}


def restore_training(ckpt: dict, optimizer, scaler, rank: int) -> LoopState:
    """Load the optimizer, scaler and this rank's RNG state from a training checkpoint -> its LoopState."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    if "lr" not in ckpt:  # written before checkpoints held the base rate: the last step's rate
        ckpt = {**ckpt, "lr": optimizer.param_groups[0]["lr"]}
    return LoopState(**{f.name: ckpt[f.name] for f in fields(LoopState)})


def end_training(log, step: int, t0: float, ddp: bool) -> None:
    """Close the log and, under DDP, the process group. The caller drops its DDP wrapper first:
    a wrapper that outlives destroy_process_group holds the last reference to the gloo group, and
    freeing it later (with the GIL held) joins gloo's worker threads, one of which may still be
    releasing the last collective's tensors and need the GIL: a hang for good, seen in 2 of 18
    two-process launches that ran a trainer's main three times. Freed here, with the group still
    registered, the wrapper leaves it to destroy_process_group, which releases the GIL."""
    log(f"done: {step} steps in {time.time() - t0:.0f} s this session")
    log.close()
    if ddp:
        gc.collect()  # a wrapper kept alive only by a reference cycle goes now, not at a random later point
        torch.distributed.destroy_process_group()


def save_training(path, make_checkpoint, master: bool, world: int, log, data_position=None) -> None:
    """Every rank's RNG state (and `data_position`, see all_rng_states) is gathered (a
    collective: all ranks call this), rank 0 writes make_checkpoint(rngs) atomically, and the
    ranks wait for it."""
    rngs = all_rng_states(world, data_position)
    if master:
        ckpt = make_checkpoint(rngs)
        save_checkpoint(ckpt, path)
        log(f"saved checkpoint step {ckpt['step']} to {path}")
    if world > 1:
        torch.distributed.barrier()


# -----------------------------------------------------------------------------
# CLI


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2, no usage dump), for every script's CLI."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def add_flags(parser: argparse.ArgumentParser, flags: dict, suppress: bool = False):
    """One flag per entry `name: (default, help)` or `name: (default, help, kind)` (underscores
    become dashes); `kind` is the type (needed for a None default: "take the preset's" or
    "derive it") or a tuple of the allowed values. Otherwise the type is the default's; bools
    get --x / --no-x; a value of the wrong type is refused. `suppress` leaves flags that were
    not given out of the result (to tell given flags from defaults)."""
    for name, (default, text, *kind) in flags.items():
        flag = "--" + name.replace("_", "-")
        kw = {} if suppress else {"default": default}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **kw)
            continue
        kind = kind[0] if kind else type(default)
        if isinstance(kind, tuple):
            kw["choices"], kind = kind, type(kind[0])
        if kind is type(None):
            raise TypeError(f"flag {flag}: a None default needs a type")
        shown = "" if default is None else f" (default: {default!r})"
        parser.add_argument(flag, type=kind, help=text + shown, **kw)


def run_cli(main, name: str, also: tuple = ()) -> None:
    """A script's entry point: main(), and bad input (ValueError: CheckpointError and ImageError
    are ValueErrors; OSError; a TrainingError; the `also` types) as one line "NAME: error: ..."
    on stderr and exit status 2, never a traceback."""
    try:
        main()
    except (ValueError, OSError, TrainingError, *also) as e:
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


def parse_flags(build_parser, argv: list) -> dict:
    """Parse argv with build_parser(suppress); '_given' lists the flags given explicitly
    (a resumed run keeps its saved settings except those)."""
    cfg = vars(build_parser(False).parse_args(argv))
    cfg["_given"] = sorted(vars(build_parser(True).parse_args(argv)))
    return cfg
