"""Every fasttx.nn module under torch.compile(fullgraph=True): no graph breaks, and the output and
every gradient match eager. aot_eager traces the same graph as inductor without generating code
(inductor itself runs in the ops' and TransformerBlock's own compile tests)."""
import pytest
import torch

import fasttx

D = 32

MODULES = {
    "LayerNorm": lambda: fasttx.nn.LayerNorm(D),
    "RMSNorm": lambda: fasttx.nn.RMSNorm(D),
    "GELUFFN": lambda: fasttx.nn.GELUFFN(D, 4 * D),
    "MultiheadSelfAttention": lambda: fasttx.nn.MultiheadSelfAttention(D, 4, is_causal=True),
    "TransformerBlock": lambda: fasttx.nn.TransformerBlock(D, 4, is_causal=True),
}


# Modules whose forward is not x -> y, compiled in their own op's tests.
COMPILED_ELSEWHERE = {"LinearCrossEntropy": "tests/test_linear_cross_entropy.py::test_module_compiles_fullgraph"}


def test_every_fasttx_nn_module_is_covered():
    assert set(MODULES) | set(COMPILED_ELSEWHERE) == set(fasttx.nn.__all__)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_compiles_fullgraph_and_matches_eager(name):
    torch.manual_seed(0)
    module = MODULES[name]()
    x = torch.randn(2, 13, D)
    grad = torch.randn(2, 13, D)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (module, compiled):
        module.zero_grad()
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad)
        results.append([out.detach(), leaf.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
