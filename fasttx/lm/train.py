"""`python -m fasttx train`: train the reference GPT on byte-level text (the stdlib's sources by default).

- AdamW, betas (0.9, 0.95). Weight decay applies to the 2-D matmul weights of the blocks only: not to
  biases and norm parameters, and not to the embeddings (tok_emb, tied to lm_head, and pos_emb), which are
  lookup tables whose rare rows get few updates that decay would keep pulling to zero.
- lr: linear warmup over --warmup updates, then cosine decay to --min-lr at --steps (``lr_at``).
- Batches are a pure function of (seed, step): update ``step`` uses one global batch of
  batch_size * world_size * grad_accum rows, drawn by ``TokenData.get_batch(step=step, micro_step=0)``;
  micro-batch m of rank r is slice m * world_size + r of it. So the rows of an update depend only on
  that product: 2 ranks of batch b, 1 rank of batch b with --grad-accum 2 and 1 rank of batch 2b train
  on the same rows (up to float rounding in the sums). Global batch = batch_size * world_size * grad_accum.
- ``--resume`` reloads DIR/ckpt.pt (model, optimizer, step, every rank's RNG state, which dropout draws
  from) and continues the loop at the saved step, so an interrupted run gives the losses of an
  uninterrupted one. DIR/metrics.jsonl keeps its lines up to that step (later ones, written after the
  last checkpoint, are dropped) and is appended to. Model flags left out take the checkpoint's values;
  flags that disagree with it are an error (except --kernels: both paths share the parameters).
- ``--arch llama`` trains the LLaMA-style model (``--n-kv-head``, ``--d-hidden``, ``--rope-base``); its
  untied lm_head.weight is a 2-D matmul weight and decays like the blocks' weights.
- Ctrl-C (SIGINT) finishes the current update, saves a checkpoint, prints where, and exits with code
  130. Further SIGINTs are ignored (torchrun forwards the terminal's one again); kill -TERM aborts.
- A non-finite loss or gradient norm stops the run (TrainingDiverged, exit 1) without saving: the last
  checkpoint, written before, stays the one to resume from (with a lower --lr, say). save_checkpoint
  also refuses NaN/Inf weights, so a diverged model never replaces a good file.
- Distributed: ``torchrun --nproc_per_node=N -m fasttx train ...`` (gloo on CPU, nccl on CUDA, DDP).
  Rank 0 alone writes checkpoints, metrics and the progress bar; reported losses are means over ranks.
  ``python -m fasttx train --nproc-per-node N ...`` runs torchrun's launcher in this process on one
  machine: a Ctrl-C there forwards SIGINT to the workers, which checkpoint, and exits with 130 and one
  line, where torchrun itself ends in a SignalException traceback and exit code 1.
- ``--fsdp``: with more than one rank, shard the model with FSDP2 instead of DDP (fasttx/lm/fsdp.py): every
  transformer block, then the root. Checkpoints are the same file, gathered full onto rank 0 through
  torch.distributed.checkpoint's get_state_dict, and loaded back with set_state_dict.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fasttx.lm import args as argtypes
from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.data import TokenData, default_cache_dir, prepare_corpus
from fasttx.models.gpt import ARCHS, KERNELS, POSITION_ENCODINGS, GPT, GPTConfig

MODEL_FIELDS = ("n_layer", "n_head", "d_model", "block_size", "pos_encoding", "dropout", "kernels", "arch",
                "n_kv_head", "d_hidden", "rope_base")
# Changing these on --resume makes a different run from then on: allowed, with a warning.
TRAJECTORY_FIELDS = ("data", "batch_size", "grad_accum", "steps", "lr", "min_lr", "warmup", "weight_decay",
                     "grad_clip", "seed", "dtype", "world_size")
INTERRUPTED_EXIT_CODE = 130
FAILED_EXIT_CODE = 1        # the run went wrong: diverged, disk full
BAD_INPUT_EXIT_CODE = 2     # the flags or the checkpoint are wrong (argparse's code too)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or Inf."""


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/lm"
    data: list[str] | None = None             # None: the stdlib's sources
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    block_size: int = 256
    pos_encoding: str | None = None           # None: GPTConfig's default for the arch
    dropout: float = 0.0
    kernels: str = "fused"
    arch: str = "gpt"                         # "gpt" | "llama"
    n_kv_head: int | None = None              # None: n_head
    d_hidden: int | None = None               # None: GPTConfig's default for the arch
    rope_base: float = 10000.0
    steps: int = 1000
    batch_size: int = 16                      # per rank and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0                    # <= 0: no clipping
    dtype: str = "fp32"                       # "fp32" | "bf16" (autocast)
    seed: int = 0
    eval_every: int = 100                     # 0: only at the end
    eval_batches: int = 20
    ckpt_every: int = 500                     # 0: only at the end (and on Ctrl-C)
    log_every: int = 10                       # text log lines when there is no progress bar
    resume: bool = False
    save_safetensors: bool = False
    stop_at: int | None = None                # stop after this step as if interrupted; the schedule keeps --steps
    threads: int | None = None
    device: str | None = None                 # None: cuda if available, else cpu
    cache_dir: str | None = None
    progress: bool | None = None              # None: a bar when stderr is a terminal
    fsdp: bool = False                        # shard with FSDP2 instead of DDP (more than one rank)

    def __post_init__(self):
        positive = ("steps", "batch_size", "grad_accum", "eval_batches", "log_every")
        if any(getattr(self, f) < 1 for f in positive) or self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"TrainConfig: {positive} must be >= 1 and dtype fp32|bf16; got {self}")
        floats = {f: getattr(self, f) for f in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout")}
        bad = [f"{k}={v}" for k, v in floats.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"TrainConfig: {', '.join(bad)}: must be finite")
        if not 0 <= self.min_lr <= self.lr or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"TrainConfig: need 0 <= min_lr <= lr, lr > 0 and warmup >= 0, got {self.min_lr}, "
                             f"{self.lr}, {self.warmup}")
        negative = [f"{f}={getattr(self, f)}" for f in ("weight_decay", "seed", "eval_every", "ckpt_every")
                    if getattr(self, f) < 0]
        negative += [f"{f}={getattr(self, f)}" for f in ("stop_at", "threads")
                     if getattr(self, f) is not None and getattr(self, f) < (0 if f == "stop_at" else 1)]
        if negative:
            raise ValueError(f"TrainConfig: {', '.join(negative)} out of range (weight_decay, seed, eval_every, "
                             f"ckpt_every, stop_at must be >= 0, threads >= 1)")

    def model_config(self) -> GPTConfig:
        return GPTConfig(**{f: getattr(self, f) for f in MODEL_FIELDS})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """lr of update `step` (0-based): lr*(step+1)/warmup while step < warmup, then cosine from lr to min_lr at steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied lm_head.weight is listed once, as tok_emb.weight
        (decay if p.dim() >= 2 and not name.startswith(("tok_emb.", "pos_emb.")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW: one kernel over all parameters. On the reference GPT's CPU step
    # (6 x 384, 2 threads) it takes 7 ms against 35 ms for the default foreach version.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)


def step_batches(data: TokenData, cfg: TrainConfig, step: int, rank: int = 0, world_size: int = 1, device="cpu"):
    """This rank's grad_accum micro-batches of update `step`: rank-like slices m * world_size + rank."""
    n = world_size * cfg.grad_accum
    return [tuple(t.to(device) for t in data.get_batch("train", step, 0, cfg.batch_size, cfg.seed,
                                                         rank=m * world_size + rank, world_size=n))
            for m in range(cfg.grad_accum)]


def _autocast(device_type: str, dtype: str):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(model, optimizer, micro_batches, lr: float, grad_clip: float = 1.0, dtype: str = "fp32"):
    """One AdamW update from the micro-batches; returns (this rank's mean loss, grad norm before clipping).

    Under DDP all micro-batches but the last run in no_sync(), so gradients are all-reduced once per update.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total, n = 0.0, len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        sync = model.no_sync() if isinstance(model, DDP) and i < n - 1 else contextlib.nullcontext()
        if _is_fsdp(model):  # reduce-scatter the gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == n - 1)
        with sync:
            with _autocast(x.device.type, dtype):
                _, loss = model(x, y)
            (loss / n).backward()
        total = total + loss.detach().float()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n, norm


@torch.no_grad()
def evaluate(model, batches, dtype="fp32", rank=0, world_size=1, device="cpu") -> float:
    """Mean loss over the fixed val batches; rank r evaluates batches r, r + world_size, ... and sums are reduced."""
    was_training, total = model.training, torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    mine = batches[rank::world_size]
    # Under FSDP a forward is a collective: every rank runs as many, the spare ones on a batch not counted.
    rounds = -(-len(batches) // world_size) if _is_fsdp(model) else len(mine)
    with torch.random.fork_rng(devices=[]):  # evaluation must never shift the RNG stream dropout draws from
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else batches[0]
            with _autocast(torch.device(device).type, dtype):
                loss = model(x.to(device), y.to(device))[1].double()
            if i < len(mine):
                total += loss
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / len(batches)


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class _StopOnSigint:
    """SIGINT sets `requested`; the loop finishes its update, checkpoints and stops."""

    def __enter__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _setup_distributed(requested: str | None):
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a caller's own group (tests/fsdp_worker.py's, several runs in one) is used as is
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _open_metrics(path: Path, keep_until: int | None):
    """metrics.jsonl opened for appending, keeping only lines with step <= keep_until (none when None)."""
    kept = []
    if keep_until is not None and path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(line).get("step", 0) <= keep_until:
                    kept.append(line + "\n")
    ckpt_io.atomic_write(path, "".join(kept).encode())
    return open(path, "a")


def train(cfg: TrainConfig) -> dict:
    """Train per cfg (under torchrun: one rank of it). Returns {"losses", "start_step", "step", "val",
    "interrupted", "checkpoint", "tokens_per_s"}; losses are this call's per-update mean losses over ranks."""
    argtypes.check_device(cfg.device)
    owned = not dist.is_initialized()
    rank, world_size, device = _setup_distributed(cfg.device)
    try:
        return _train(cfg, rank, world_size, device)
    finally:
        if world_size > 1 and owned:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict:
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main, out = rank == 0, Path(cfg.out)
    ckpt_path, saved = out / "ckpt.pt", None
    run_dict = {**dataclasses.asdict(cfg), "world_size": world_size}
    if cfg.resume:
        saved = ckpt_io.load_checkpoint(ckpt_path, map_location="cpu")
        ckpt_io.check_model_config(saved["model_config"], cfg.model_config(), ckpt_path)
        changed = [f for f in TRAJECTORY_FIELDS if saved["train_config"].get(f) != run_dict[f]]
        if changed and main:
            print(f"warning: resuming {ckpt_path} with different {changed}: the run differs from an "
                  f"uninterrupted one from here on", file=sys.stderr)
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if world_size > 1 and not main:
        dist.barrier()  # rank 0 builds the token cache first, the others then find it
    data = TokenData(prepare_corpus(cfg.data, cache_dir), cfg.block_size)
    if world_size > 1 and main:
        dist.barrier()
    val_batches = list(data.val_batches(cfg.batch_size, cfg.eval_batches, cfg.seed))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(cfg.model_config(), device=device)
    fsdp = cfg.fsdp and world_size > 1
    if cfg.fsdp and world_size == 1 and main:
        print("note: --fsdp with one process: nothing to shard, training unsharded", file=sys.stderr)
    load = None
    if fsdp:
        from fasttx.lm import fsdp as fsdp_io
        fsdp_io.shard(model)  # in place: parameters become DTensors, so the optimizer is built after
    optimizer, start = make_optimizer(model, cfg), 0
    if fsdp:
        load = functools.partial(fsdp_io.load_full_state, model, optimizer)
    if saved is not None:
        start = saved["step"]
        if not ckpt_io.restore_training_state(saved, ckpt_path, model, optimizer, rank, world_size, device,
                                              load=load):
            torch.manual_seed(_seed(cfg.seed, "dropout", rank, start))
            if main:
                print(f"warning: {ckpt_path} holds the RNG states of {saved['world_size']} ranks, not {world_size}: "
                      f"dropout masks differ from the original run's", file=sys.stderr)
    else:
        torch.manual_seed(_seed(cfg.seed, "dropout", rank))  # each rank its own dropout masks
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 and not fsdp else model
    model.train()

    last_saved = start if saved is not None else None

    def save(step):
        nonlocal last_saved
        rng = ckpt_io.capture_rng(device, world_size)  # collective: every rank takes part
        model_state = optim_state = None
        if fsdp:  # collective too: the full state, gathered onto rank 0's CPU
            model_state, optim_state = fsdp_io.full_state(model, optimizer)
        failed = None
        if main:
            try:
                ckpt_io.save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step,
                                        model_config=model.config, train_config=run_dict, rng=rng,
                                        world_size=world_size, model_state=model_state, optimizer_state=optim_state)
                if cfg.save_safetensors:
                    ckpt_io.save_safetensors(out / "model.safetensors", model, step, state=model_state)
            except ckpt_io.CheckpointWriteError as err:
                failed = err
        if world_size > 1:  # every rank stops together, rather than waiting on a rank 0 that left
            flag = torch.tensor([float(failed is not None)], device=device)
            dist.all_reduce(flag)
            if flag.item() and failed is None:
                failed = ckpt_io.CheckpointWriteError(f"rank 0 could not write {ckpt_path}")
        if failed is not None:
            raise failed
        last_saved = step

    end = cfg.steps if cfg.stop_at is None else max(start, min(cfg.steps, cfg.stop_at))
    tokens_per_step = cfg.batch_size * world_size * cfg.grad_accum * cfg.block_size
    show_bar = main and (sys.stderr.isatty() if cfg.progress is None else cfg.progress)
    bar = tqdm(total=cfg.steps, initial=start, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = (lambda msg: bar.write(msg) if show_bar else print(msg, flush=True)) if main else (lambda msg: None)
    metrics = _open_metrics(out / "metrics.jsonl", start if saved is not None else None) if main else None

    def log(**record):
        try:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        except OSError as err:
            raise ckpt_io.write_error(err, out / "metrics.jsonl") from None
    losses, vals, speeds, interrupted, done = [], [], [], False, start
    if main:
        say(f"training {model.num_parameters():,} parameters on {device} x{world_size} from step {start} to {end} "
            f"of {cfg.steps}; {tokens_per_step:,} tokens per update; {data.n_train_tokens:,} train tokens")
    try:
        with _StopOnSigint() as sigint:
            for step in range(start, end):
                t0, lr = time.perf_counter(), lr_at(step, cfg)
                loss, norm = train_step(ddp, optimizer, step_batches(data, cfg, step, rank, world_size, device),
                                        lr, cfg.grad_clip, cfg.dtype)
                stats = torch.tensor([loss.item(), float(sigint.requested), norm.item()], dtype=torch.float64,
                                     device=device)
                if world_size > 1:
                    dist.all_reduce(stats)  # mean loss over ranks; stop if any rank got SIGINT
                loss, stopping, done = stats[0].item() / world_size, stats[1].item() > 0, step + 1
                if not (math.isfinite(loss) and math.isfinite(stats[2].item())):
                    kept = f"{ckpt_path} (step {last_saved}) is kept" if last_saved is not None else "nothing was saved"
                    raise TrainingDiverged(f"training diverged at step {done}: loss {loss}, gradient norm "
                                           f"{norm.item()}; {kept}. Resume with a lower --lr or --grad-clip")
                dt = time.perf_counter() - t0
                losses.append(loss)
                speeds.append(tokens_per_step / dt)
                if main:
                    log(step=done, loss=loss, lr=lr, tokens_per_s=speeds[-1], step_time_s=dt, grad_norm=norm.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speeds[-1]:,.0f}", refresh=False)
                    if not show_bar and (done % cfg.log_every == 0 or done == end):
                        say(f"step {done}/{cfg.steps} loss {loss:.4f} lr {lr:.2e} {speeds[-1]:,.0f} tokens/s")
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    val = evaluate(model, val_batches, cfg.dtype, rank, world_size, device)
                    vals.append((done, val))
                    if main:
                        log(step=done, val_loss=val, val_ppl=math.exp(val))
                        say(f"step {done}: val loss {val:.4f}, perplexity {math.exp(val):.2f}")
                if done == end or stopping or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
                    save(done)
                if stopping:
                    interrupted = True
                    break
            if start == end:
                say(f"{ckpt_path} is already at step {start} of {end}: nothing to do")
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if interrupted:
        say(f"interrupted: checkpoint of step {done} saved to {ckpt_path}; continue with --resume")
    elif losses:
        say(f"done: step {done}, checkpoint {ckpt_path}, median {sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s")
    return {"losses": losses, "start_step": start, "step": done, "val": vals, "interrupted": interrupted,
            "checkpoint": str(ckpt_path), "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None}


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    d, count, whole, real = TrainConfig(), argtypes.integer(1), argtypes.integer(0), argtypes.real
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or folders (default: the stdlib's sources)")
    p.add_argument("--out", default=d.out, help=f"folder for ckpt.pt and metrics.jsonl (default {d.out})")
    model = p.add_argument_group("model (default: GPTConfig's, or the checkpoint's with --resume)")
    for name in ("n_layer", "n_head", "d_model", "block_size"):
        model.add_argument("--" + name.replace("_", "-"), type=count, default=None)
    model.add_argument("--dropout", type=real(0.0, below=1.0), default=None, help="in [0, 1)")
    model.add_argument("--pos-encoding", choices=POSITION_ENCODINGS, default=None)
    model.add_argument("--kernels", choices=KERNELS, default=None)
    model.add_argument("--arch", choices=ARCHS, default=None, help="gpt (GPT-2 style, default) or llama (RMSNorm, "
                       "rotary, SwiGLU, grouped-query attention, untied head, no biases)")
    model.add_argument("--n-kv-head", type=count, default=None, help="llama: key/value heads, dividing --n-head "
                       "(default: n_head)")
    model.add_argument("--d-hidden", type=count, default=None, help="FFN width (default: 4 d_model for gpt, "
                       "8/3 d_model rounded up to a multiple of 64 for llama)")
    model.add_argument("--rope-base", type=real(1.0, above=True), default=None, help="llama: rotary base (10000)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=count, default=d.steps, help="optimizer updates in the whole run")
    opt.add_argument("--batch-size", type=count, default=d.batch_size,
                     help="sequences per rank and micro-step; global batch = batch_size*world_size*grad_accum")
    opt.add_argument("--grad-accum", type=count, default=d.grad_accum, help="micro-steps per update")
    opt.add_argument("--lr", type=real(0.0, above=True), default=d.lr, help=f"peak learning rate (default {d.lr})")
    opt.add_argument("--min-lr", type=real(0.0), default=d.min_lr, help=f"end of the cosine, <= --lr (default "
                     f"{d.min_lr})")
    opt.add_argument("--weight-decay", type=real(0.0), default=d.weight_decay)
    opt.add_argument("--grad-clip", type=real(0.0), default=d.grad_clip, help="max gradient norm; 0: no clipping")
    opt.add_argument("--warmup", type=whole, default=d.warmup, help="linear warmup updates")
    opt.add_argument("--dtype", choices=("fp32", "bf16"), default=d.dtype)
    opt.add_argument("--seed", type=argtypes.SEED, default=d.seed)
    run = p.add_argument_group("run")
    run.add_argument("--eval-every", type=whole, default=d.eval_every, help="0: only at the end")
    run.add_argument("--eval-batches", type=count, default=d.eval_batches)
    run.add_argument("--ckpt-every", type=whole, default=d.ckpt_every, help="0: only at the end and on Ctrl-C")
    run.add_argument("--log-every", type=count, default=d.log_every, help="log lines when there is no progress bar")
    run.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    run.add_argument("--stop-at", type=whole, default=None, help="stop (and checkpoint) after this update, as "
                     "Ctrl-C would; the lr schedule still spans --steps")
    run.add_argument("--save-safetensors", action="store_true", help="also write OUT/model.safetensors")
    run.add_argument("--threads", type=count, default=None, help="torch.set_num_threads")
    run.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    run.add_argument("--nproc-per-node", type=count, default=None, help="launch N ranks on this machine, as "
                     "torchrun --standalone --nproc_per_node=N would (Ctrl-C: checkpoint and exit 130)")
    run.add_argument("--fsdp", action="store_true", help="with several ranks, shard the model with FSDP2 "
                     "(per block, then the root) instead of DDP; the checkpoint stays one full file")
    run.add_argument("--cache-dir", default=None, help="token cache (default: $FASTTX_CACHE or ~/.cache/fasttx)")


def config_from_args(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    missing = [f for f in MODEL_FIELDS if f not in values]
    if missing and args.resume:  # model flags left out: the checkpoint's
        saved = ckpt_io.load_checkpoint(Path(args.out) / "ckpt.pt")["model_config"]
        values.update({f: saved[f] for f in missing})
    return TrainConfig(**values)


def launch(argv: list[str], nproc: int) -> int:
    """`torchrun --standalone --nproc_per_node=nproc -m fasttx train argv` in this process, its endings in one line.

    On SIGINT torchrun's agent forwards the signal to the workers (they finish the update, checkpoint and
    exit), waits for them, then raises SignalException: here that is exit code 130 and one line.
    """
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    targs = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "fasttx", "train", *argv])
    for name in list(logging.Logger.manager.loggerDict):  # its warnings say what the one line below says
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(targs)
    except SignalException as err:
        print(f"fasttx train: interrupted by signal {err.sigval}: the workers saved a checkpoint if they had "
              f"started training; continue with --resume", file=sys.stderr)
        _exit_now(INTERRUPTED_EXIT_CODE)
    except ChildFailedError as err:  # the failing rank printed its error already
        codes = [f.exitcode for f in err.failures.values()]
        return next((c for c in codes if c > 0), FAILED_EXIT_CODE)
    return 0


def main(args) -> int:
    """Every failure is one line on stderr: exit 2 for bad flags or checkpoints, 1 for a run that went wrong."""
    def fail(err, code, every_rank=False):
        if every_rank or os.environ.get("RANK", "0") == "0":  # the others hit the same error: say it once
            print(f"fasttx train: error: {err}", file=sys.stderr)
        return code
    if args.nproc_per_node and args.nproc_per_node > 1 and "RANK" not in os.environ:
        argv = getattr(args, "argv", None) or sys.argv[1:]
        argv = list(argv[argv.index("train") + 1:])
        for i, a in enumerate(argv):  # the workers are single ranks of this launch
            if len(a.split("=")[0]) > 2 and "--nproc-per-node".startswith(a.split("=")[0]):  # argparse abbreviates
                del argv[i: i + (1 if "=" in a else 2)]
                break
        return launch(argv, args.nproc_per_node)
    # A torchrun rank whose process group train() creates and destroys leaves a finished run, once everything
    # is saved and said, without the interpreter's teardown (_exit_now): on a loaded 2-core machine gloo's and
    # the store's threads were seen still joinable there, aborting finished DDP and FSDP runs with exit -6.
    # Not after an error: a rank leaving at once would get its peers killed by torchrun before rank 0 has
    # said what went wrong. A caller's own group (tests/fsdp_worker.py) is the caller's to end.
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and not dist.is_initialized()
    code = _run(args, fail)
    if own_group and code == 0:
        _exit_now(code)
    return code


def _run(args, fail) -> int:
    try:
        result = train(config_from_args(args))
    except KeyboardInterrupt:  # before the loop's own SIGINT handler was installed
        print("fasttx train: interrupted before training started; nothing was saved", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except (TrainingDiverged, ckpt_io.CheckpointWriteError) as err:
        return fail(err, FAILED_EXIT_CODE)
    except (ckpt_io.CheckpointError, ValueError, FileExistsError) as err:
        return fail(err, BAD_INPUT_EXIT_CODE)
    except OSError as err:  # unreadable --data, a full disk for the token cache, ...
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            err = ckpt_io.write_error(err, err.filename or "the token cache or metrics")
        return fail(err, FAILED_EXIT_CODE, every_rank=True)
    if result["interrupted"] and "RANK" in os.environ:
        _exit_now(INTERRUPTED_EXIT_CODE)
    return INTERRUPTED_EXIT_CODE if result["interrupted"] else 0


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, once everything is saved and said. After a Ctrl-C, threads
    of gloo and of torchrun's store can still be joinable then, and destroying them prints "terminate
    called without an active exception" under the one line we promise (seen on a loaded 2-core machine)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
