"""Every CPU kernel set in float64 against PyTorch: this machine's own, and those it does not pick
(AVX2 on an AVX-512 machine, and the portable ones).

csrc/cpu picks its kernels by the capability ATen reports (cpu/cpu_features.h).
ATEN_CPU_CAPABILITY lowers it, so a child process runs the lower sets on this
machine. float64 makes the bounds tight enough to catch a constant rounded to
float (a float 1/sqrt(2) in GELU is off by 1e-8).
"""
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import fasttx
    from fasttx.ops.gelu_ffn import gelu_ffn_ref
    from fasttx.ops.glu import glu_ref
    from fasttx.ops.glu_ffn import glu_ffn_ref
    import sys
    assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
    torch.manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with fasttx.use_backend("cpu"):
        for n in (1, 7, 1000, 1537):
            x, r, w, b = leaf(5, n), leaf(5, n), leaf(n), leaf(n)
            w1, b1, w2, b2 = leaf(13, n), leaf(13), leaf(n, 13), leaf(n)
            w1u = leaf(13, n)
            norm_args = (x, r, w, b)
            cases = [
                (lambda: fasttx.bias_gelu(x, b), lambda: F.gelu(x + b), norm_args),
                (lambda: fasttx.bias_gelu(x, b, "tanh"), lambda: F.gelu(x + b, approximate="tanh"), norm_args),
                (lambda: fasttx.layer_norm(x, (n,), w, b), lambda: F.layer_norm(x, (n,), w, b), norm_args),
                (lambda: fasttx.add_layer_norm(x, r, (n,), w, b)[0], lambda: F.layer_norm(x + r, (n,), w, b),
                 norm_args),
                (lambda: fasttx.rms_norm(x, (n,), w, 1e-6), lambda: F.rms_norm(x, (n,), w, 1e-6), norm_args),
                (lambda: sum(fasttx.add_rms_norm(x, r, (n,), w, 1e-6)),
                 lambda: F.rms_norm(x + r, (n,), w, 1e-6) + (x + r), norm_args),
            ] + [
                (lambda a=a: fasttx.gelu_ffn(x, w1, b1, w2, b2, a), lambda a=a: gelu_ffn_ref(x, w1, b1, w2, b2, a),
                 (x, w1, b1, w2, b2))
                for a in ("gelu", "gelu_tanh", "relu")
            ] + [
                (lambda a=a: fasttx.glu(x, r, a), lambda a=a: glu_ref(x, r, a), (x, r))
                for a in ("silu", "gelu", "gelu_tanh")
            ] + [
                (lambda: fasttx.glu_ffn(x, w1, w1u, w2, "silu", b1, b1, b2),
                 lambda: glu_ffn_ref(x, w1, w1u, w2, "silu", b1, b1, b2), (x, w1, w1u, w2, b1, b2)),
            ]
            for ours, ref, args in cases:
                g = torch.randn(5, n, dtype=torch.float64)
                got = torch.autograd.grad(ours(), args, g, allow_unused=True)
                want = torch.autograd.grad(ref(), args, g, allow_unused=True)
                torch.testing.assert_close(ours(), ref(), rtol=1e-10, atol=1e-10)
                for a, e in zip(got, want):
                    assert (a is None) == (e is None)
                    if a is not None:
                        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        # float32 GELU runs its own inline exp and reciprocal per ISA (cpu/vec/math.h): a dense
        # sweep over both tails, within 2x (3x for gradients) PyTorch's own float32 error + 1e-6.
        z = torch.linspace(-12, 12, 24003, dtype=torch.float64).view(3, 8001)
        zb = torch.zeros(8001, dtype=torch.float64)
        glu_cases = [(lambda a, c, act=act: fasttx.glu(a, (c + 1).expand_as(a), act),
                      lambda a, c, act=act: glu_ref(a, c + 1, act))
                     for act in ("silu", "gelu", "gelu_tanh")]
        gelu_cases = [(lambda a, c, ap=ap: fasttx.bias_gelu(a, c, ap), lambda a, c, ap=ap: F.gelu(a + c, approximate=ap))
                      for ap in ("none", "tanh")]
        for approx, (ours_fn, ref_fn) in enumerate(gelu_cases + glu_cases):
            def run(fn, dtype):
                xx = z.to(dtype).requires_grad_()
                y = fn(xx, zb.to(dtype))
                (gx,) = torch.autograd.grad(y, xx, torch.ones_like(y))
                return y.double(), gx.double()
            ours = run(ours_fn, torch.float32)
            truth = run(ref_fn, torch.float64)
            torch_f32 = run(ref_fn, torch.float32)
            for o, t, p, factor in zip(ours, truth, torch_f32, (2, 3)):
                err, torch_err = (o - t).abs().max().item(), (p - t).abs().max().item()
                assert err <= factor * torch_err + 1e-6, (approx, err, torch_err)
        # linear_cross_entropy's row kernel runs in float32 only (fp64 takes the portable loop): fp32 and
        # bf16 against a float64 truth, softcap, label smoothing and an ignored row included, 1009 classes
        # (a ragged last vector).
        h, w, t = torch.randn(9, 24, dtype=torch.float64), torch.randn(1009, 24, dtype=torch.float64), \
            torch.randint(0, 1009, (9,))
        t[4] = -100
        for dtype in (torch.float32, torch.bfloat16):
            for kw in ({}, {"softcap": 3.0, "label_smoothing": 0.1}):
                def lce_run(fn, dt, kw=kw):
                    hh, ww = h.to(dt).requires_grad_(), w.to(dt).requires_grad_()
                    loss = fn(hh, ww, kw)
                    return (loss.double(),) + tuple(g.double() for g in torch.autograd.grad(loss, (hh, ww)))
                def lce_ref(hh, ww, kw):
                    z = hh @ ww.T
                    if "softcap" in kw:
                        z = torch.tanh(z / kw["softcap"]) * kw["softcap"]
                    return F.cross_entropy(z, t, label_smoothing=kw.get("label_smoothing", 0.0))
                ours = lce_run(lambda hh, ww, kw: fasttx.linear_cross_entropy(hh, ww, t, **kw), dtype)
                truth = lce_run(lce_ref, torch.float64)
                torch_own = lce_run(lce_ref, dtype)
                for o, tr, p, factor in zip(ours, truth, torch_own, (2, 3, 3)):
                    err, torch_err = (o - tr).abs().max().item(), (p - tr).abs().max().item()
                    assert err <= factor * torch_err + 1e-5, (dtype, kw, err, torch_err)
    print("fallbacks ok")
""")


# ATEN_CPU_CAPABILITY value -> what torch then reports, from the highest down.
LOWER_CAPABILITIES = {"avx2": "AVX2", "default": "DEFAULT"}


def test_this_machines_cpu_kernel_set_matches_torch_in_float64():
    import torch
    done = subprocess.run([sys.executable, "-c", CHILD, torch.backends.cpu.get_cpu_capability()],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fallbacks ok" in done.stdout


@pytest.mark.parametrize("capability", LOWER_CAPABILITIES)
def test_lower_cpu_kernel_sets_match_torch(capability):
    import torch
    machine = torch.backends.cpu.get_cpu_capability()
    if machine not in ("AVX512", "AVX2"):
        pytest.skip(f"ATen reports {machine}: only the portable kernels exist here, and the main tests run them")
    if capability == "avx2" and machine != "AVX512":
        pytest.skip(f"AVX2 is this machine's own set ({machine}): the main tests run it")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", CHILD, LOWER_CAPABILITIES[capability]], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fallbacks ok" in done.stdout


# Streaming stores (cpu/vec/io.h) serve outputs the last-level cache cannot hold, so on a machine
# with a big cache the tests' small shapes never reach them: force them, and ask for the same bits.
STREAM_CHILD = textwrap.dedent("""
    import sys, torch, fasttx
    torch.manual_seed(0)
    out = []
    with fasttx.use_backend("cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m, n in ((3, 1537), (77, 1000), (5, 7)):
                leaf = lambda *shape: torch.randn(*shape, dtype=dtype).requires_grad_()
                x, r, w, b = leaf(m, n), leaf(m, n), leaf(n), leaf(n)
                w1, b1, w2, b2 = leaf(13, n), leaf(13), leaf(n, 13), leaf(n)
                for y in (fasttx.bias_gelu(x, b), fasttx.bias_gelu(x, b, "tanh"), fasttx.layer_norm(x, n, w, b),
                          fasttx.add_layer_norm(x, r, n, w, b)[0], fasttx.rms_norm(x, n, w),
                          fasttx.add_rms_norm(x, r, n, w)[0], fasttx.add_rms_norm(x, r, n, w)[1],
                          fasttx.gelu_ffn(x, w1, b1, w2, b2)):
                    grads = torch.autograd.grad(y, (x, w, b, w1, b1), torch.ones_like(y), allow_unused=True)
                    out += [y.detach()] + [g for g in grads if g is not None]
    torch.save(out, sys.argv[1])
""")


def test_streaming_stores_write_the_same_bits(tmp_path):
    results = []
    for threshold in ("0", str(1 << 62)):  # every output streamed; none
        path = tmp_path / f"stream_{threshold}.pt"
        env = dict(os.environ, FASTTX_STREAM_BYTES=threshold)
        done = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        import torch
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 100
    for streamed, plain in zip(*results):
        assert torch.equal(streamed, plain)
