"""Training checkpoints of the reference LM: plain data, checksummed, written atomically, read with weights_only.

A checkpoint (``DIR/ckpt.pt``) is a dict of tensors and plain Python values only,
so ``torch.load(..., weights_only=True)`` reads it and a file holding anything
else (a pickled object that could run code) is refused:

    format        "fasttx.lm.checkpoint"
    version       FORMAT_VERSION (bumped when the layout changes; versions not in READABLE_VERSIONS are refused)
    step          optimizer updates done; a resumed run continues the loop at this step
    model         the GPT's state_dict (tied lm_head.weight and tok_emb.weight both present; arch "llama": untied)
    optimizer     the AdamW state_dict
    model_config  GPTConfig.to_dict() (files written before arch "llama" lack arch, n_kv_head, d_hidden,
                  rope_base: their defaults describe the GPT-2 style model they hold)
    train_config  the TrainConfig as a dict of plain types
    rng           {"cpu": [state per rank], "cuda": [state per rank] or None}: dropout's RNG
    world_size    ranks of the run that wrote it
    sha256        ``state_digest`` of all the above (version 2 on)

Every failure to read one raises CheckpointError (a RuntimeError) or ValueError
with the file's name and what is wrong, never a bare torch/pickle traceback or a
crash later: besides the layout, loading checks the checksum (a flipped byte), that
the model config describes exactly the tensors the file holds (so a config cannot
make anyone allocate more than the file's size), that every tensor is finite, and
the RNG states; ``restore_training_state`` checks the optimizer state against the
live parameters before handing it to the fused AdamW. Version 1 files (no checksum,
written before 2026-12-07) are read with a CheckpointWarning; the next save adds one.

Files are serialised in memory first, then written to a temp file next to the
target, fsynced and renamed over it (``atomic_write``): a full disk, a kill -9 or a
crash leaves the previous file as it was. Temp files a killed writer left behind
are removed by the next write of the same file.

``save_safetensors`` writes the weights alone for other tools: the state_dict
*without* ``lm_head.weight`` (safetensors refuses tensors sharing storage, and
it is tok_emb.weight anyway), with the model config as JSON and a sha256 of the
tensors in the metadata.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from fasttx.lm.data import open_temp_beside
from fasttx.models.gpt import GPT, GPTConfig

FORMAT = "fasttx.lm.checkpoint"
FORMAT_VERSION = 2               # 2: adds "sha256"
READABLE_VERSIONS = (1, 2)
TIED_KEY, TIED_TO = "lm_head.weight", "tok_emb.weight"
_REQUIRED = {"format": str, "version": int, "step": int, "model": dict, "optimizer": dict, "model_config": dict,
             "train_config": dict, "rng": dict, "world_size": int}
# Sinusoidal positions have no tensor in the file to bound block_size, and generation allocates
# block_size x d_model per layer for its cache: 65536 positions is far past any model trained here.
MAX_SINUSOIDAL_BLOCK_SIZE = 1 << 16
_CPU_RNG_BYTES = torch.get_rng_state().numel()
_CUDA_RNG_BYTES = 16              # Philox seed and offset


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, corrupt, refused, or of another format."""


class CheckpointWriteError(CheckpointError):
    """A file of a run (checkpoint, metrics, weights) that could not be written; the previous one is unchanged."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but whose integrity cannot be verified (no checksum)."""


# ---- writing -------------------------------------------------------------------------------------------


def _temp_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{16}}\.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of atomic_write(path) left by a killed writer (one writer per file is assumed)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.iterdir() if _temp_pattern(path).fullmatch(p.name)]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def write_error(err: OSError, path) -> CheckpointWriteError:
    """One line for a failed write of path; the disk-full case says so in words."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointWriteError(f"no space left on device while writing {path}; the previous {Path(path).name} "
                                    f"(if any) is unchanged. Free some space and rerun (with --resume)")
    return CheckpointWriteError(f"cannot write {path}: {err.strerror or err}; the previous {Path(path).name} "
                                f"(if any) is unchanged")


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """data into a temp file next to path, fsync, then os.replace: readers never see half a file.

    The temp file is created with mode 0o666, so the umask gives path the mode any new file gets.
    Any OSError (disk full, permissions) removes the temp file and raises CheckpointWriteError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp, fd = open_temp_beside(path)
    except OSError as err:
        raise write_error(err, path) from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def state_digest(state: dict) -> str:
    """sha256 of a checkpoint dict without its "sha256" entry: dict entries in sorted key order, tensors as
    dtype, shape and raw bytes, plain values by type and repr. The same values give the same digest."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"fasttx checkpoint: holds a {value.layout} tensor; checkpoints hold dense tensors only")
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for k, v in sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))):
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}:".encode())
        for v in value:
            _feed(h, v)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        h.update(f"{type(value).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"fasttx checkpoint: cannot checksum a {type(value).__name__}")


def _nonfinite(tensors: dict) -> list[str]:
    return [str(k) for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def save_checkpoint(path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    model_config: GPTConfig, train_config: dict, rng: dict, world_size: int = 1,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint; a model or optimizer state holding NaN/Inf is refused (CheckpointWriteError),
    so a diverged run never replaces the last good file. model_state/optimizer_state, when given, are
    written instead of model.state_dict()/optimizer.state_dict() (FSDP: the full state gathered on rank 0)."""
    state = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step),
             "model": model.state_dict() if model_state is None else model_state,
             "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "model_config": model_config.to_dict(),
             "train_config": dict(train_config), "rng": rng, "world_size": int(world_size)}
    bad = _nonfinite(state["model"]) + [f"optimizer state {i} {k}" for i, s in state["optimizer"]["state"].items()
                                       for k in _nonfinite(s)]
    if bad:
        raise CheckpointWriteError(f"not writing {path}: the model or optimizer holds NaN or Inf ({bad[:3]}); "
                                   f"the previous checkpoint is kept")
    state["sha256"] = state_digest(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, buffer.getbuffer())


# ---- reading -------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict, its layout, checksum, config, tensors and RNG states checked.

    Raises CheckpointError naming the file on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds objects other than tensors and plain data, "
                f"which could run code when loaded (torch.load weights_only=True). Nothing was executed. "
                f"({_first_line(err)})") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({_first_line(err)})") from None
    except Exception as err:  # truncated zip, random bytes, EOF, ...: torch raises many types
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a torch file "
                              f"({_first_line(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a fasttx checkpoint: it holds a {type(ckpt).__name__}, "
                              f"not a dict")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fasttx LM checkpoint: format is {ckpt.get('format')!r}, "
                              f"expected {FORMAT!r}")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')!r}; this fasttx reads "
                              f"versions {list(READABLE_VERSIONS)}")
    missing = sorted(set(_REQUIRED) - set(ckpt))
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing keys {missing}")
    for key, kind in _REQUIRED.items():
        if not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            raise CheckpointError(f"checkpoint {path}: {key!r} should be a {kind.__name__}, "
                                  f"got {type(ckpt[key]).__name__}")
    _check_digest(ckpt, path)
    if ckpt["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: step is negative ({ckpt['step']})")
    if ckpt["world_size"] < 1:
        raise CheckpointError(f"checkpoint {path}: world_size must be >= 1, got {ckpt['world_size']}")
    config = model_config_from_dict(ckpt["model_config"], path)
    check_state_fits_config(ckpt["model"], config, path)
    _check_rng(ckpt["rng"], ckpt["world_size"], path)
    _check_optimizer_layout(ckpt["optimizer"], path)
    ckpt["model_config"] = config.to_dict()
    return ckpt


def _check_digest(ckpt: dict, path) -> None:
    if ckpt["version"] < 2:
        warnings.warn(f"checkpoint {path} was written by an older fasttx (format version {ckpt['version']}) and "
                      f"has no checksum: a corrupted byte in it cannot be detected. Saving it again adds one.",
                      CheckpointWarning, stacklevel=3)
        return
    stored = ckpt.get("sha256")
    if not isinstance(stored, str):
        raise CheckpointError(f"checkpoint {path} has no sha256 checksum, which format version "
                              f"{ckpt['version']} requires")
    try:
        actual = state_digest(ckpt)
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    if actual != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the sha256 stored in it "
                              f"(a changed byte, on disk or in transit); use an intact copy")


def _check_rng(rng: dict, world_size: int, path) -> None:
    cpu, cuda = rng.get("cpu"), rng.get("cuda")
    if not isinstance(cpu, list) or len(cpu) != world_size or \
            (cuda is not None and (not isinstance(cuda, list) or len(cuda) != world_size)):
        raise CheckpointError(f"checkpoint {path}: rng must hold one CPU (and CUDA, or None) state per rank of "
                              f"its {world_size}")
    for kind, states, size in (("cpu", cpu, _CPU_RNG_BYTES), ("cuda", cuda or [], _CUDA_RNG_BYTES)):
        for rank, state in enumerate(states):
            if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.shape != (size,):
                got = f"{state.dtype} {tuple(state.shape)}" if isinstance(state, torch.Tensor) else type(state).__name__
                raise CheckpointError(f"checkpoint {path}: the {kind} RNG state of rank {rank} should be a uint8 "
                                      f"tensor of {size} bytes, got {got}")
            if kind == "cpu":
                try:  # the generator checks its own invariants; a scratch one leaves the global RNG alone
                    torch.Generator().set_state(state)
                except RuntimeError as err:
                    raise CheckpointError(f"checkpoint {path}: the CPU RNG state of rank {rank} is invalid "
                                          f"({_first_line(err)})") from None


def _check_optimizer_layout(opt: dict, path) -> None:
    groups, state = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or \
            not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"checkpoint {path}: the optimizer state must be a dict with 'state' (a dict) and "
                              f"'param_groups' (a list of dicts with 'params')")


def check_state_fits_config(state: dict, config: GPTConfig, path) -> None:
    """CheckpointError unless `state` holds exactly the tensors (keys, shapes, dtypes) a GPT of `config` has,
    all of them finite.

    The config's sizes are first read off the tensors themselves, so a config whose model would be far
    larger than the file (vocab_size 1e9, n_layer 1e6) is refused before anything of its size exists; then
    a GPT on the meta device (no memory) gives the exact layout to compare with.
    """
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or v.layout != torch.strided]
    if bad:
        raise CheckpointError(f"checkpoint {path}: model state holds entries that are not dense tensors {bad[:5]}")
    emb = state.get(TIED_TO)
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"checkpoint {path}: model state has no 2-D {TIED_TO}")
    layers = {int(k.split(".")[1]) for k in state if re.fullmatch(r"blocks\.\d+\..*", k)}
    sizes = {"vocab_size": emb.shape[0], "d_model": emb.shape[1], "n_layer": len(layers)}
    if config.pos_encoding == "learned" and isinstance(state.get("pos_emb.weight"), torch.Tensor):
        sizes["block_size"] = state["pos_emb.weight"].shape[0]
    if config.arch == "llama" and isinstance(state.get("blocks.0.mlp.gate_proj.weight"), torch.Tensor):
        sizes["d_hidden"] = state["blocks.0.mlp.gate_proj.weight"].shape[0]
    diffs = [f"{k} {getattr(config, k)} but the tensors give {v}" for k, v in sizes.items() if getattr(config, k) != v]
    # no tensor gives block_size for formula positions: it is bounded instead
    if config.pos_encoding in ("sinusoidal", "rope") and config.block_size > MAX_SINUSOIDAL_BLOCK_SIZE:
        diffs.append(f"block_size {config.block_size} is over the {MAX_SINUSOIDAL_BLOCK_SIZE} allowed for "
                     f"{config.pos_encoding} positions")
    if diffs:
        raise CheckpointError(f"checkpoint {path}: its model config does not match its tensors: " + "; ".join(diffs))
    with torch.device("meta"):
        expected = GPT(config, device="meta").state_dict()
    problems = _layout_problems(expected, state)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes: " + "; ".join(problems))
    nonfinite = _nonfinite(state)
    if nonfinite:
        raise CheckpointError(f"checkpoint {path}: model tensors hold NaN or Inf: {nonfinite[:5]}")


def _layout_problems(expected: dict, state: dict) -> list[str]:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    dtypes = [f"{k} {state[k].dtype} vs model {v.dtype}" for k, v in expected.items()
              if k in state and state[k].shape == v.shape and state[k].dtype != v.dtype]
    return ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {unexpected[:5]}"] if unexpected else []) \
        + ([f"shape {shapes[:5]}"] if shapes else []) + ([f"dtype {dtypes[:5]}"] if dtypes else [])


def model_config_from_dict(data: dict, path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: invalid model config {repr(data)[:300]}: {err}") from None


def check_model_config(saved: dict, wanted: GPTConfig, path) -> None:
    """ValueError naming the file and every field where the checkpoint and the requested model differ.

    ``kernels`` is ignored: both compute with the same parameters, so a run may switch.
    """
    wanted = wanted.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, requested {v!r}" for k, v in wanted.items()
             if k != "kernels" and saved.get(k) != v]
    if diffs:
        raise ValueError(f"checkpoint {path} was written for a different model: " + "; ".join(diffs))


def load_model_state(model: torch.nn.Module, state: dict, path) -> None:
    """model.load_state_dict, with missing/unexpected keys and shape mismatches reported in one line."""
    problems = _layout_problems(model.state_dict(), state)
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, step: int, path) -> None:
    """ValueError unless `saved` (an Adam/AdamW state_dict) fits `optimizer`'s parameters exactly.

    torch's load_state_dict checks only the group sizes, and the fused AdamW then trusts every
    state tensor: a wrong shape there reads past the end of a buffer and crashes the process.
    """
    def fail(what):
        raise ValueError(f"checkpoint {path}: the optimizer state does not fit the model: {what}")

    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        fail(f"{len(saved['param_groups'])} parameter groups, the optimizer has {len(groups)}")
    params = {}
    for i, (mine, theirs) in enumerate(zip(groups, saved["param_groups"])):
        ids = theirs["params"]
        if len(ids) != len(mine["params"]):
            fail(f"group {i} has {len(ids)} parameters, the optimizer's has {len(mine['params'])}")
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in ids):
            fail(f"group {i} lists parameter ids that are not ints")
        params.update({k: (p, mine) for k, p in zip(ids, mine["params"])})
    if len(params) != sum(len(g["params"]) for g in groups):
        fail("a parameter id is listed twice")
    unknown = sorted(set(saved["state"]) - set(params), key=repr)
    if unknown:
        fail(f"state for parameter ids {unknown[:5]} that no group lists")
    for k, entry in saved["state"].items():
        param, group = params[k]
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        if not isinstance(entry, dict) or set(entry) != keys:
            fail(f"parameter {k}: state keys {sorted(entry) if isinstance(entry, dict) else entry!r}, "
                 f"expected {sorted(keys)}")
        for name in sorted(keys - {"step"}):
            t = entry[name]
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.shape != param.shape \
                    or t.dtype != param.dtype:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                fail(f"parameter {k} {name}: {got}, the parameter is {param.dtype} {tuple(param.shape)}")
            if not bool(torch.isfinite(t).all()) or (name != "exp_avg" and bool((t < 0).any())):
                fail(f"parameter {k} {name} holds NaN, Inf" + ("" if name == "exp_avg" else " or negative values"))
        count = entry["step"]
        if isinstance(count, torch.Tensor) and count.numel() == 1 and count.is_floating_point():
            count = count.item()
        if not isinstance(count, (int, float)) or not math.isfinite(count) or count != int(count) \
                or not 1 <= count <= step:
            fail(f"parameter {k} has taken {count!r} steps, expected a whole number in [1, {step}]")


def restore_training_state(saved: dict, path, model, optimizer, rank: int = 0, world_size: int = 1,
                           device=torch.device("cpu"), load=None) -> bool:
    """Load the model, optimizer and this rank's RNG states of `saved` (from load_checkpoint, on the CPU).

    Everything is checked before anything is loaded. The optimizer keeps its own hyperparameters
    (lr, weight decay, ...: the run's flags); only the per-parameter state comes from the file.
    Returns False, leaving the RNG alone, when the checkpoint has RNG states of another number of ranks.
    load(model_state, optimizer_state), when given, loads both instead of load_state_dict (FSDP's
    set_state_dict); the checks are the same.
    """
    if load is None:
        load_model_state(model, saved["model"], path)
    else:
        problems = _layout_problems(model.state_dict(), saved["model"])  # DTensors: their global shapes
        if problems:
            raise ValueError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    check_optimizer_state(saved["optimizer"], optimizer, saved["step"], path)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if load is None:
        optimizer.load_state_dict(saved["optimizer"])
    else:
        load(saved["model"], saved["optimizer"])
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    cpu, cuda = saved["rng"]["cpu"], saved["rng"]["cuda"]
    if len(cpu) != world_size:
        return False
    torch.set_rng_state(cpu[rank])
    if torch.device(device).type == "cuda" and cuda:
        try:
            torch.cuda.set_rng_state(cuda[rank], device)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: the CUDA RNG state of rank {rank} is invalid "
                                  f"({_first_line(err)})") from None
    return True


def capture_rng(device, world_size: int = 1) -> dict:
    """{"cpu": [state of each rank], "cuda": [...] or None}. With world_size > 1 a collective: all ranks call it."""
    device = torch.device(device)
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    states = [mine]
    if world_size > 1:
        states = [None] * world_size
        torch.distributed.all_gather_object(states, mine)
    cuda = [s["cuda"] for s in states]
    return {"cpu": [s["cpu"] for s in states], "cuda": None if cuda[0] is None else cuda}


def build_model(ckpt: dict, path, kernels: str | None = None, device=None) -> GPT:
    """A GPT with the checkpoint's config (kernels overridable) and weights, in eval mode."""
    config = dict(ckpt["model_config"])
    if kernels is not None:
        config["kernels"] = kernels
    model = GPT(model_config_from_dict(config, path), device=device)
    load_model_state(model, ckpt["model"], path)
    return model.eval()


# ---- safetensors -------------------------------------------------------------------------------------


def save_safetensors(path, model: GPT, step: int | None = None, state: dict | None = None) -> Path:
    """DIR/model.safetensors: the state_dict minus the tied lm_head.weight; metadata "model_config" (JSON) and
    "sha256" (state_digest of the tensors)."""
    from safetensors.torch import save as st_save

    state = model.state_dict() if state is None else state  # FSDP: the full state gathered on rank 0
    tied = model.config.arch == "gpt"  # arch "llama" has its own lm_head.weight, stored as any tensor
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k != TIED_KEY or not tied}
    bad = _nonfinite(tensors)
    if bad:
        raise CheckpointWriteError(f"not writing {path}: the model holds NaN or Inf ({bad[:3]})")
    metadata = {"format": "pt", "fasttx_format": FORMAT, "model_config": json.dumps(model.config.to_dict()),
                "tied_weights": json.dumps({TIED_KEY: TIED_TO} if tied else {}), "sha256": state_digest(tensors)}
    if step is not None:
        metadata["step"] = str(int(step))
    return atomic_write(path, st_save(tensors, metadata=metadata))


def load_safetensors(path, map_location="cpu") -> dict:
    """A dict shaped like load_checkpoint's (model, model_config, step) from a model.safetensors file,
    checked as load_checkpoint checks its model (a file without "sha256" loads with a CheckpointWarning)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"safetensors file {path} is truncated or corrupt ({_first_line(err)})") from None
    if "model_config" not in metadata:
        raise CheckpointError(f"safetensors file {path} has no 'model_config' metadata: not written by fasttx")
    if "sha256" not in metadata:
        warnings.warn(f"safetensors file {path} has no sha256 metadata (written by an older fasttx): a corrupted "
                      f"byte in it cannot be detected", CheckpointWarning, stacklevel=2)
    elif state_digest(state) != metadata["sha256"]:
        raise CheckpointError(f"safetensors file {path} is corrupt: its tensors do not match the sha256 in its "
                              f"metadata (a changed byte, on disk or in transit); use an intact copy")
    try:
        config, step = json.loads(metadata["model_config"]), int(metadata.get("step", -1))
    except ValueError as err:
        raise CheckpointError(f"safetensors file {path}: bad model_config or step metadata ({err})") from None
    config = model_config_from_dict(config, path)
    if TIED_TO in state and config.arch == "gpt":  # tied: stored once (arch "llama" stores its own head)
        state.setdefault(TIED_KEY, state[TIED_TO])
    check_state_fits_config(state, config, path)
    return {"model": state, "model_config": config.to_dict(), "step": step}
