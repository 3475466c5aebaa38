"""FSDP2 for the reference GPT: `python -m fasttx train --fsdp` under torchrun (or --nproc-per-node N).

``shard(model)`` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block, then to the
root (the embeddings, the LM head, tied to them in the GPT-2 architecture and not in the LLaMA one, and
the final norm). Each parameter becomes a DTensor sharded on dim 0 across the ranks; a block's forward
all-gathers its parameters into plain tensors, runs, and frees them again, and its backward
reduce-scatters the gradients (averaged over ranks, as DDP does).

The LLaMA blocks run through their ``forward``, which FSDP2 hooks. The GPT-2 ones are called through
methods other than ``forward`` (``forward_deferred`` in the fused path, the plain-PyTorch ``_eager_block``
in the eager one), which FSDP2 does not see: ``shard`` registers both with ``register_fsdp_forward_method``
so they gather the parameters too. Inside them fasttx's ops see plain tensors (FSDP2's unsharded
parameters are nn.Parameters of plain tensors), so the fused kernels' eager fast path runs, as does the
saved-tensor recompute of ``recomputed_activations``.

Checkpoints stay the ordinary ``fasttx.lm.checkpoint`` file: ``full_state`` gathers the full (unsharded)
model and optimizer state with ``torch.distributed.checkpoint.state_dict.get_state_dict`` onto rank 0's
CPU, in the layout a one-process run saves (optimizer state keyed by parameter index), and
``load_full_state`` puts such a state back into the sharded model with ``set_state_dict``. So an FSDP
checkpoint resumes under FSDP, DDP or one process, with any number of ranks, and ``generate`` reads it.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from fasttx.models import gpt as gpt_module

TIED_KEY, TIED_TO = "lm_head.weight", "tok_emb.weight"


class FSDPUnsupported(ValueError):
    """A model or use that this FSDP2 integration refuses, with the reason."""


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard(model: gpt_module.GPT, mesh=None) -> gpt_module.GPT:
    """fully_shard every block, then the root, in place; returns the model (now also an FSDPModule)."""
    if not isinstance(model, gpt_module.GPT):
        raise FSDPUnsupported(f"fasttx --fsdp: shards fasttx.models.GPT only, got {type(model).__name__}")
    arch = getattr(model.config, "arch", "gpt")
    block_type = gpt_module.LlamaBlock if arch == "llama" else gpt_module.TransformerBlock
    if not all(isinstance(b, block_type) for b in model.blocks):
        raise FSDPUnsupported(f"fasttx --fsdp: the {arch!r} architecture's blocks are not wired for FSDP2 (their "
                              f"forward methods must be registered with register_fsdp_forward_method); use DDP")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
        if arch == "llama":  # the GPT calls block(...): FSDP2's forward hooks gather it
            continue
        # The GPT's forward calls these, not block.forward: FSDP2 must gather the block around them too.
        block.forward_eager = functools.partial(gpt_module._eager_block, block)
        register_fsdp_forward_method(block, "forward_deferred")
        register_fsdp_forward_method(block, "forward_eager")
    fully_shard(model, mesh=mesh)
    model.generate = functools.partial(_no_generate, model)
    # FSDP2 warns when a module returns a view (forward_deferred's branch, a LlamaBlock's residual sum, the
    # logits), because an in-place op on it would skip its pre-backward hook. The GPT adds to them out of
    # place only (and the test of 2 ranks against 1 process checks the gradients), so the warning says
    # nothing here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPTransformerBlock|FSDPLlamaBlock|FSDPGPT)\) "
                            r"returned a view tensor", category=UserWarning)
    return model


def _no_generate(model, *args, **kwargs):
    raise FSDPUnsupported("fasttx --fsdp: a model sharded with FSDP2 cannot generate: the KV-cache decoding runs "
                          "its blocks outside any FSDP-registered method, on sharded weights. Load the checkpoint "
                          "(fasttx.lm.generate.load_model, python -m fasttx generate) into an unsharded GPT")


def _tied(model) -> bool:
    """Whether the LM head is the token embedding (GPT-2 architecture), listed once by named_parameters."""
    return getattr(model.config, "arch", "gpt") != "llama"


def _param_ids(model, optimizer) -> tuple[list[list[str]], dict[str, int]]:
    """The parameter names of each optimizer group, and the index optimizer.state_dict() gives each name."""
    names = {id(p): n for n, p in model.named_parameters()}  # the tied weight once, as tok_emb.weight
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    ids = {n: i for i, n in enumerate(n for g in groups for n in g)}
    return groups, ids


def full_state(model, optimizer) -> tuple[dict | None, dict | None]:
    """(model state_dict, optimizer state_dict), full and on the CPU, on rank 0; (None, None) elsewhere.

    A collective: every rank calls it. The optimizer state is keyed by parameter index, as a one-process
    optimizer.state_dict() is, so the checkpoint file has one layout whoever wrote it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if torch.distributed.get_rank() != 0:
        return None, None
    model_state = dict(model_state)
    tied = _tied(model)
    if tied and TIED_TO in model_state:
        model_state[TIED_KEY] = model_state[TIED_TO]  # model.state_dict() lists the tied weight under both names
    groups, ids = _param_ids(model, optimizer)
    state = {ids[_untied(n) if tied else n]: s for n, s in optim_state["state"].items()}
    param_groups = [{**{k: v for k, v in theirs.items() if k != "params"}, "params": [ids[n] for n in mine]}
                    for theirs, mine in zip(optim_state["param_groups"], groups)]
    return model_state, {"state": state, "param_groups": param_groups}


def _untied(name: str) -> str:
    return TIED_TO if name == TIED_KEY else name


def load_full_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load a full state (as full_state returns, or any fasttx checkpoint's) into the sharded model and
    optimizer with set_state_dict. Every rank passes the same full state."""
    groups, ids = _param_ids(model, optimizer)
    names = {i: n for n, i in ids.items()}
    state = {names[i]: s for i, s in optim_state["state"].items()}
    param_groups = [{**{k: v for k, v in theirs.items() if k != "params"}, "params": mine}
                    for theirs, mine in zip(optim_state["param_groups"], groups)]
    if _tied(model):
        model_state = {k: v for k, v in model_state.items() if k != TIED_KEY}
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": state, "param_groups": param_groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))
