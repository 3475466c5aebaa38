"""apply_rotary: rotary position embeddings on q (B, Hq, T, D) and k (B, Hk, T, D).

Memory-bound, reported in GB/s against the minimal traffic an ideal kernel must move:
q and k read and written once, the (T, D) cos and sin tables read once:

    fwd      (q + k) read and written, cos and sin read     = 2*(Hq + Hk)*B*T*D*elem + 2*T*D*elem
    fwd+bwd  the same again: the gradients of the outputs read, those of q and k written (2x fwd)

Providers beside fasttx: "eager" is the reference in plain PyTorch (fasttx.ops.apply_rotary_ref:
the rotate-half formula in float32, rounded once), "hf_rotate_half" is transformers'
apply_rotary_pos_emb, q * cos + rotate_half(q) * sin in q's dtype (written here, not imported),
which every row is compared to. The tables are (1, T, D) in q's dtype, as transformers'
LlamaRotaryEmbedding returns them for one sequence of positions.
"""
from __future__ import annotations

import torch

import fasttx
from bench.spec import OpSpec, dtype_of
from fasttx.ops.apply_rotary import apply_rotary_ref

# (B, Hq, Hk, T, D): LLaMA-2-7B's attention (32 heads of 128) at 4 x 1024 tokens, and its GQA
# variant with 8 key heads (LLaMA-3-8B).
KEY_SHAPES = ((4, 32, 32, 1024, 128), (4, 32, 8, 1024, 128))
SMOKE_SHAPE = (1, 4, 2, 16, 64)


def case(shape, dtype="float32") -> dict:
    return {"shape": tuple(shape), "dtype": dtype}


def sweep(level: str) -> list:
    if level == "smoke":
        return [case(SMOKE_SHAPE)]
    return [case(s, d) for d in ("float32", "bfloat16") for s in KEY_SHAPES]


def make_inputs(c: dict, device: torch.device) -> tuple:
    b, hq, hk, t, d = c["shape"]
    dtype = dtype_of(c["dtype"])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    angles = torch.arange(t, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat((angles, angles), -1)[None]
    return (torch.randn(b, hq, t, d, dtype=dtype, device=device), torch.randn(b, hk, t, d, dtype=dtype, device=device),
            angles.cos().to(dtype), angles.sin().to(dtype))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rotate_half(c: dict):
    def hf_apply_rotary_pos_emb(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    return hf_apply_rotary_pos_emb


def eager(c: dict):
    def apply_rotary_eager(q, k, cos, sin):
        return apply_rotary_ref(q, k, cos, sin)
    return apply_rotary_eager


def fasttx_fn(c: dict):
    return lambda q, k, cos, sin: fasttx.apply_rotary(q, k, cos, sin)


def bytes_moved(c: dict, mode: str) -> int:
    b, hq, hk, t, d = c["shape"]
    elem = torch.empty((), dtype=dtype_of(c["dtype"])).element_size()
    fwd = 2 * (hq + hk) * b * t * d * elem + 2 * t * d * elem
    return fwd if mode == "fwd" else 2 * fwd


SPEC = OpSpec(
    name="apply_rotary",
    params=("shape", "dtype"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    bytes_moved=bytes_moved,
    formula="minimal bytes: fwd = 2*(Hq+Hk)*B*T*D*elem (q, k read and written) + 2*T*D*elem (cos, sin read); "
            "fwd+bwd = 2 x fwd. shape = (B, Hq, Hk, T, D). eager = the float32 reference in torch ops; "
            "hf_rotate_half = transformers' q*cos + rotate_half(q)*sin in q's dtype",
    grad_inputs=(0, 1),
    table_by=("dtype",),
    is_key_case=lambda c: tuple(c["shape"]) in KEY_SHAPES,
    torch_providers=(("hf_rotate_half", hf_rotate_half),),
    compare_to="hf_rotate_half",
)
