"""Training checkpoints of the reference LM: plain data, written atomically, read with weights_only.

A checkpoint (``DIR/ckpt.pt``) is a dict of tensors and plain Python values only,
so ``torch.load(..., weights_only=True)`` reads it and a file holding anything
else (a pickled object that could run code) is refused:

    format        "fasttx.lm.checkpoint"
    version       FORMAT_VERSION (bumped when the layout changes; other versions are refused)
    step          optimizer updates done; a resumed run continues the loop at this step
    model         the GPT's state_dict (tied lm_head.weight and tok_emb.weight both present)
    optimizer     the AdamW state_dict
    model_config  GPTConfig.to_dict()
    train_config  the TrainConfig as a dict of plain types
    rng           {"cpu": [state per rank], "cuda": [state per rank] or None}: dropout's RNG
    world_size    ranks of the run that wrote it

Every failure to read one raises CheckpointError (a RuntimeError) or ValueError
with the file's name and what is wrong, never a bare torch/pickle traceback.

``save_safetensors`` writes the weights alone for other tools: the state_dict
*without* ``lm_head.weight`` (safetensors refuses tensors sharing storage, and
it is tok_emb.weight anyway), with the model config as JSON in the metadata.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fasttx.models.gpt import GPT, GPTConfig

FORMAT = "fasttx.lm.checkpoint"
FORMAT_VERSION = 1
TIED_KEY, TIED_TO = "lm_head.weight", "tok_emb.weight"
_REQUIRED = {"format": str, "version": int, "step": int, "model": dict, "optimizer": dict, "model_config": dict,
             "train_config": dict, "rng": dict, "world_size": int}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, corrupt, refused, or of another format."""


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """write(file) into a temp file next to path, fsync, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_checkpoint(path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    model_config: GPTConfig, train_config: dict, rng: dict, world_size: int = 1) -> Path:
    state = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "model_config": model_config.to_dict(),
             "train_config": dict(train_config), "rng": rng, "world_size": int(world_size)}
    return atomic_write(path, lambda f: torch.save(state, f))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict, its layout checked. Raises CheckpointError naming the file on any problem."""
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
    if ckpt.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')!r}; this fasttx reads "
                              f"version {FORMAT_VERSION}")
    missing = sorted(set(_REQUIRED) - set(ckpt))
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing keys {missing}")
    for key, kind in _REQUIRED.items():
        if not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            raise CheckpointError(f"checkpoint {path}: {key!r} should be a {kind.__name__}, "
                                  f"got {type(ckpt[key]).__name__}")
    if ckpt["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: step is negative ({ckpt['step']})")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: model state holds non-tensor entries {bad[:5]}")
    ckpt["model_config"] = model_config_from_dict(ckpt["model_config"], path).to_dict()
    return ckpt


def model_config_from_dict(data: dict, path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: invalid model config {data!r}: {err}") from None


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
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = ([f"missing {missing[:5]}"] if missing else []) + \
               ([f"unexpected {unexpected[:5]}"] if unexpected else []) + ([f"shape {shapes[:5]}"] if shapes else [])
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


def restore_training_state(saved: dict, path, model, optimizer, rank: int = 0, world_size: int = 1,
                           device=torch.device("cpu")) -> bool:
    """Load the model, optimizer and this rank's RNG states of `saved` (from load_checkpoint, on the CPU).

    Returns False, leaving the RNG alone, when the checkpoint has RNG states of another number of ranks.
    """
    load_model_state(model, saved["model"], path)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"checkpoint {path}: the optimizer state does not fit the model: {err}") from None
    cpu, cuda = saved["rng"].get("cpu") or [], saved["rng"].get("cuda")
    if len(cpu) != world_size:
        return False
    torch.set_rng_state(cpu[rank])
    if torch.device(device).type == "cuda" and cuda:
        torch.cuda.set_rng_state(cuda[rank], device)
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


def save_safetensors(path, model: GPT, step: int | None = None) -> Path:
    """DIR/model.safetensors: the state_dict minus the tied lm_head.weight; metadata "model_config" (JSON)."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}
    metadata = {"format": "pt", "fasttx_format": FORMAT, "model_config": json.dumps(model.config.to_dict()),
                "tied_weights": json.dumps({TIED_KEY: TIED_TO})}
    if step is not None:
        metadata["step"] = str(int(step))
    data = st_save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def load_safetensors(path, map_location="cpu") -> dict:
    """A dict shaped like load_checkpoint's (model, model_config, step) from a model.safetensors file."""
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
    try:
        config = json.loads(metadata["model_config"])
    except ValueError as err:
        raise CheckpointError(f"safetensors file {path}: model_config metadata is not JSON ({err})") from None
    if TIED_TO in state:
        state.setdefault(TIED_KEY, state[TIED_TO])
    return {"model": state, "model_config": model_config_from_dict(config, path).to_dict(),
            "step": int(metadata.get("step", -1))}
