"""Cross-entropy Triton kernels over the rows of (N, V) logits: an LM's loss at any vocabulary size.

The contract is fasttx/ops/cross_entropy.py's _torch_forward / _torch_backward (and csrc/ops.h's
cross_entropy_fwd_cpu / cross_entropy_bwd_cpu): logits (N, V) contiguous in fp32, fp16 or bf16,
target (N,) int64 in [0, V) or ignore_index.
  * forward: m = max(x_n), log_sum = log(sum exp(x_n - m)) and loss = (m - x_n[target_n]) + log_sum
    per row, each fp32 (N,); an ignored row gives loss 0 (its m and log_sum are still written).
    Never lse - x_n[target_n]: lse = m + log_sum rounds log_sum away when the row shares a large
    offset (an fp32 ulp is 8 at 1e8), where m - x_n[target_n] cancels it exactly;
  * backward: grad_x = grad_rows[n] * (softmax(x_n) - onehot(target_n)) in the logits' dtype,
    softmax(x_n) = exp((x_n - m) - log_sum) from the forward's m and log_sum; an ignored row gives zeros.

One program per row, which is walked in BLOCK-column chunks: V can be an LM's vocabulary (GPT-2's
50257), far past a register tile. The forward keeps a running max and a sum rescaled to it per
lane (the online logsumexp), merged across lanes once at the end; it reads the row once. The
backward reads the row once and writes the gradient once. All math is fp32. Offsets are int64
(row * V passes 2^31 at 2048 tokens of a 2^20 vocabulary).

Targets are checked by the Python layer (fasttx.ops.cross_entropy._check), not here, but the
kernels never read outside the row: a target that is neither ignore_index nor in [0, V) (which
only torch.compile, where that check is skipped, can pass) reads nothing and poisons its row
instead, loss = NaN in the forward and a NaN gradient row in the backward.

tl.exp / tl.log only (no libdevice: the interpreter has none); on a GPU they are the ex2/lg2
approximations, a few ulp, applied to x - max (<= 0), so the error does not grow with |x|.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(X, TARGET, LOSS, MAX, LOG_SUM, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * V
    # Per-lane running max and sum of exp(x - max); a lane that has seen only -inf (or nothing)
    # holds (-inf, 0). m_safe stands in for a -inf max: exp(-inf - 0) = 0 where exp(-inf - -inf) is NaN.
    m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s_vec = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf: log_sum = -inf and its loss NaN, as torch's
    log_sum = tl.log(tl.sum(s_vec * tl.exp(m_vec - m_safe), 0))

    t = tl.load(TARGET + row)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < V)
    x_t = tl.load(x_row + t, mask=valid & (t != ignore_index), other=0.0).to(tl.float32)
    loss = tl.where(valid, (m - x_t) + log_sum, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + row, loss)
    tl.store(MAX + row, m)
    tl.store(LOG_SUM + row, log_sum)


@triton.jit
def _ce_bwd_kernel(GRAD, X, TARGET, MAX, LOG_SUM, DX, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * V
    dx_row = DX + row * V
    t = tl.load(TARGET + row)
    live = t != ignore_index
    valid = (t >= 0) & (t < V)
    g = tl.load(GRAD + row)
    g = tl.where(valid, g, float("nan"))  # a bad target poisons its row (the forward's loss is NaN too)
    m = tl.load(MAX + row)
    log_sum = tl.load(LOG_SUM + row)
    # An ignored row is 0, or NaN where it holds NaN or +inf, as torch's log_softmax backward gives 0 * NaN.
    lse = m + log_sum
    ignored_fill = tl.where((lse != lse) | (lse == float("inf")), float("nan"), 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < V
        # An ignored row reads nothing; a lane past V reads -inf, so its (unstored) exp cannot overflow.
        x = tl.load(x_row + cols, mask=ok & live, other=float("-inf")).to(tl.float32)
        p = tl.exp((x - m) - log_sum)
        d = (p - tl.where(cols == t, 1.0, 0.0)) * g
        d = tl.where(live, d, ignored_fill)
        tl.store(dx_row + cols, d.to(DX.dtype.element_ty), mask=ok)


# ---- dispatcher: a deterministic heuristic (the autotuner needs a GPU to time configs) ----

# Every config _config can return; tests/test_triton_aot_cross_entropy.py compiles each of them.
# Chunks of 1024 fp32 (4 KB) at 4 warps are 8 per thread, two 16-byte loads when aligned; the
# larger chunks keep 8-16 per thread with 8 warps, so a vocabulary row is a few dozen iterations.
CONFIGS = (
    dict(BLOCK=1024, num_warps=4),
    dict(BLOCK=2048, num_warps=8),
    dict(BLOCK=4096, num_warps=8),
)


def _config(V):
    if V <= 1024:
        return CONFIGS[0]
    if V <= 2048:
        return CONFIGS[1]
    return CONFIGS[2]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_logits_target(logits, target):
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits: dtype {logits.dtype} is not float32, float16 or bfloat16")
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be a contiguous (N, V) tensor, got shape {tuple(logits.shape)}, "
                         f"strides {logits.stride()}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"logits rows must have fewer than 2^31 columns, got {logits.shape[1]}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1] or not target.is_contiguous():
        raise ValueError(f"target must be a contiguous int64 ({logits.shape[0]},) tensor, got {target.dtype} "
                         f"{tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _check_rows(name, t, logits):
    if t.dtype != torch.float32 or t.shape != logits.shape[:1] or not t.is_contiguous() or t.device != logits.device:
        raise ValueError(f"{name} must be a contiguous float32 ({logits.shape[0]},) tensor on {logits.device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def cross_entropy_forward(logits, target, ignore_index):
    """(loss_rows, row_max, log_sum), each float32 (N,): m = max(x_n), log_sum = log(sum exp(x_n - m)),
    loss = (m - x_n[target_n]) + log_sum (0 if ignored)."""
    _check_logits_target(logits, target)
    N, V = logits.shape
    loss, row_max, log_sum = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    if N == 0:
        return loss, row_max, log_sum
    _ce_fwd_kernel[(N,)](logits, target, loss, row_max, log_sum, V, int(ignore_index), **_config(V))
    return loss, row_max, log_sum


def cross_entropy_backward(grad_rows, logits, target, row_max, log_sum, ignore_index):
    """grad_logits = grad_rows[n] * (softmax(x_n) - onehot(target_n)) in logits' dtype, 0 for ignored rows."""
    _check_logits_target(logits, target)
    for name, t in (("grad_rows", grad_rows), ("row_max", row_max), ("log_sum", log_sum)):
        _check_rows(name, t, logits)
    N, V = logits.shape
    grad = torch.empty_like(logits)
    if N == 0:
        return grad
    _ce_bwd_kernel[(N,)](grad_rows, logits, target, row_max, log_sum, grad, V, int(ignore_index), **_config(V))
    return grad
