"""linear_cross_entropy's row kernel in Triton: one chunk of logits (C, V), in place.

The contract is fasttx/ops/linear_cross_entropy.py's _torch_rows (and csrc/ops.h's
linear_cross_entropy_rows_cpu): logits (C, V) contiguous in fp32, fp16 or bf16 (the chunk loop
hands it the fp32 output of the chunk's GEMM on a GPU), target (C,) int64. With z = softcap(x)
(c tanh(x / c); z = x without softcap), m = max z, log_sum = log sum exp(z - m), eps the label
smoothing: loss = (1 - eps)(m - z_t) + eps / V * sum_j (m - z_j) + log_sum (0 if ignored) and
lse = m + log_sum, each fp32 (C,); with grad_rows, the row is overwritten by
g_n * (softmax(z) - (1 - eps) onehot(t) - eps / V) * (1 - (z / c)^2) (0 for an ignored row).

The GEMMs around it are torch.matmul (cuBLAS), as Liger-Kernel does: a chunk's GEMMs are
(hundreds x d x V), where cuBLAS is at peak and a Triton GEMM would add nothing.

One program per row, walked in BLOCK-column chunks (V is a vocabulary, far past a register tile):
pass 1 keeps a per-lane running max and rescaled sum (the online logsumexp) merged once at the end;
pass 2 (only with a gradient or label smoothing) writes the gradient over the logits and sums
m - z_j, so that a large shared offset cancels exactly, as m - z_t does for the loss. All math fp32.
tanh is built from tl.exp (the interpreter has no libdevice): a Taylor polynomial below |y| = 1/4,
(1 - e) / (1 + e) with e = exp(-2|y|) above, both within a few fp32 ulp.

Targets are checked by the Python layer; a target neither ignore_index nor in [0, V) (only
torch.compile, where that check is skipped, can pass one) reads nothing and gives its row NaN.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(y):
    a = tl.abs(y)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    t = tl.where(a < 0.25, small, large)
    return tl.where(y < 0, -t, t)


@triton.jit
def _lce_rows_kernel(X, TARGET, GRAD_ROWS, LOSS, LSE, V, ignore_index, eps, cap,
                     HAS_GRAD: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * V
    m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s_vec = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = cap * _tanh(x / cap)
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_sum = tl.log(tl.sum(s_vec * tl.exp(m_vec - m_safe), 0))

    t = tl.load(TARGET + row)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < V)
    x_t = tl.load(x_row + t, mask=valid & (t != ignore_index), other=0.0).to(tl.float32)
    if SOFTCAP:
        x_t = cap * _tanh(x_t / cap)
    loss = (1.0 - eps) * (m - x_t) + log_sum

    if HAS_GRAD or SMOOTH:
        if HAS_GRAD:
            g = tl.load(GRAD_ROWS + row)
            g = tl.where(ignored, 0.0, tl.where(valid, g, float("nan")))
        smooth_vec = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            z = x
            if SOFTCAP:
                z = cap * _tanh(x / cap)
            if SMOOTH:
                smooth_vec += tl.where(ok, m - z, 0.0)
            if HAS_GRAD:
                p = tl.exp((z - m) - log_sum)
                d = (p - eps / V - tl.where(cols == t, 1.0 - eps, 0.0)) * g
                if SOFTCAP:
                    u = z / cap
                    d = d * (1.0 - u * u)
                tl.store(x_row + cols, d.to(X.dtype.element_ty), mask=ok)
        if SMOOTH:
            loss += eps / V * tl.sum(smooth_vec, 0)

    loss = tl.where(valid, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, m + log_sum)


# Every config _config can return; tests/test_triton_aot_linear_cross_entropy.py compiles each of them
# (times the HAS_GRAD / SMOOTH / SOFTCAP variants): 8 fp32 per thread and pass. Both passes live in one
# kernel, so 4096 columns at 8 warps (16 a thread) spilled on sm_80 where kernels/cross_entropy.py's
# separate passes do not.
CONFIGS = (
    dict(BLOCK=1024, num_warps=4),
    dict(BLOCK=2048, num_warps=8),
)


def _config(V):
    return CONFIGS[0] if V <= 2048 else CONFIGS[1]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_cross_entropy_rows(logits, target, grad_rows, ignore_index, label_smoothing, softcap):
    """(loss, lse), each float32 (C,); the gradient over ``logits`` in place when grad_rows is given."""
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits: dtype {logits.dtype} is not float32, float16 or bfloat16")
    if logits.dim() != 2 or not logits.is_contiguous() or logits.shape[1] == 0 or logits.shape[1] >= 2**31:
        raise ValueError(f"logits must be a contiguous (C, V) tensor with 0 < V < 2^31, got shape "
                         f"{tuple(logits.shape)}, strides {logits.stride()}")
    C, V = logits.shape
    if target.dtype != torch.int64 or target.shape != (C,) or not target.is_contiguous():
        raise ValueError(f"target must be a contiguous int64 ({C},) tensor, got {target.dtype} {tuple(target.shape)}")
    if grad_rows is not None and (grad_rows.dtype != torch.float32 or grad_rows.shape != (C,)
                                  or not grad_rows.is_contiguous()):
        raise ValueError(f"grad_rows must be a contiguous float32 ({C},) tensor, got {grad_rows.dtype} "
                         f"{tuple(grad_rows.shape)}")
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return loss, lse
    _lce_rows_kernel[(C,)](logits, target, grad_rows if grad_rows is not None else loss, loss, lse, V,
                           int(ignore_index), float(label_smoothing), float(softcap or 1.0),
                           HAS_GRAD=grad_rows is not None, SMOOTH=bool(label_smoothing), SOFTCAP=bool(softcap),
                           **_config(V))
    return loss, lse
