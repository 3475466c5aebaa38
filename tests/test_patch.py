"""fasttx.patch / unpatch on torch's own modules: same outputs, gradients, training losses and
state_dicts as unpatched; a report of what was replaced and what was left alone, and why."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.patching import is_patched

from patch_checks import adamw_losses, assert_loads_through_a_file, assert_report_tells_what_runs

D_MODEL, N_HEADS, D_HIDDEN = 64, 4, 96


def _encoder(norm_first=True, activation="gelu", batch_first=True, layers=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, dropout=dropout, activation=activation,
                                             batch_first=batch_first, norm_first=norm_first)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _pair(**kw):
    plain, patched = _encoder(**kw), _encoder(**kw)
    patched.load_state_dict(plain.state_dict())
    report = fasttx.patch(patched)
    return plain, patched, report


def _outputs_and_grads(model, x, grad, **kw):
    model.zero_grad()
    x = x.detach().requires_grad_()
    out = model(x, **kw)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def _assert_same(plain, patched, x, rtol=1e-5, atol=2e-5, **kw):
    with torch.no_grad():
        grad = torch.randn(plain(x, **kw).shape)
    want = _outputs_and_grads(plain, x, grad, **kw)
    got = _outputs_and_grads(patched, x, grad, **kw)
    names = ["out", "grad_x"] + [n for n, _ in plain.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_encoder_stack_matches_unpatched(norm_first, activation, batch_first):
    plain, patched, report = _pair(norm_first=norm_first, activation=activation, batch_first=batch_first)
    assert [path for path, _ in report.replaced] == ["layers.0", "layers.1"]
    # the norms are computed inside the layers' fused code (add_layer_norm): not patched, not listed as replaced
    assert report.fused == [("layers.0.norm1", "layers.0"), ("layers.0.norm2", "layers.0"),
                            ("layers.1.norm1", "layers.1"), ("layers.1.norm2", "layers.1")]
    x = torch.randn(3, 29, D_MODEL) if batch_first else torch.randn(29, 3, D_MODEL)
    _assert_same(plain, patched, x)
    assert_report_tells_what_runs(patched, report, lambda: patched(x))


def test_padding_and_causal_masks_match_unpatched():
    plain, patched, _ = _pair(norm_first=False)
    x = torch.randn(3, 21, D_MODEL)
    padded = torch.arange(21)[None, :] >= torch.tensor([21, 13, 5])[:, None]  # True = ignore, as torch has it
    grad = torch.randn(x.shape).masked_fill(padded[..., None], 0.0)  # padded rows' values are not compared
    for kw in (dict(src_key_padding_mask=padded),
               dict(mask=torch.nn.Transformer.generate_square_subsequent_mask(21), is_causal=True),
               dict(mask=torch.rand(21, 21) > 0.8, src_key_padding_mask=padded)):
        want = _outputs_and_grads(plain, x, grad, **kw)
        got = _outputs_and_grads(patched, x, grad, **kw)
        keep = ~padded[..., None] if "src_key_padding_mask" in kw else torch.ones(1, 1, 1, dtype=torch.bool)
        torch.testing.assert_close(got[0] * keep, want[0] * keep, rtol=1e-5, atol=2e-5)
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_thirty_adamw_steps_give_the_same_losses():
    plain, patched, _ = _pair(norm_first=True)
    def loss_of(model):
        x = torch.randn(4, 32, D_MODEL)
        return F.mse_loss(model(x), x.flip(-1))

    losses = [adamw_losses(model, loss_of) for model in (plain, patched)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)


def test_layer_norm_anywhere():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.LayerNorm(33),
                                torch.nn.Sequential(torch.nn.GELU(), torch.nn.LayerNorm(33, bias=False)))
    patched = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.LayerNorm(33),
                                  torch.nn.Sequential(torch.nn.GELU(), torch.nn.LayerNorm(33, bias=False)))
    patched.load_state_dict(plain.state_dict())
    report = fasttx.patch(patched)
    assert report.replaced == [("1", "fasttx.layer_norm"), ("2.1", "fasttx.layer_norm")]
    assert isinstance(patched[1], torch.nn.LayerNorm) and type(patched[1]).__name__ == "LayerNorm"
    _assert_same(plain, patched, torch.randn(5, 8))


def test_state_dicts_load_both_ways():
    plain, patched, _ = _pair()
    assert list(patched.state_dict()) == list(plain.state_dict())

    assert_loads_through_a_file(patched, _encoder(seed=1))  # patched -> unpatched
    other = _encoder(seed=2)
    fasttx.patch(other)
    assert_loads_through_a_file(plain, other)  # unpatched -> patched


def test_unpatch_restores_the_original_classes():
    plain, patched, report = _pair()
    assert fasttx.unpatch(patched) == len(report.replaced)
    assert not any(is_patched(m) for m in patched.modules())
    assert type(patched.layers[0]) is torch.nn.TransformerEncoderLayer
    assert type(patched.layers[0].norm1) is torch.nn.LayerNorm
    _assert_same(plain, patched, torch.randn(2, 9, D_MODEL), rtol=0, atol=0)


def test_patching_twice_leaves_patched_modules_alone():
    _, patched, _ = _pair(layers=1)
    again = fasttx.patch(patched)
    assert again.replaced == []
    assert {why for _, why in again.left_alone} == {"already patched"}


def test_what_is_left_alone_is_reported_with_the_reason():
    class OwnNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "custom_act": torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, activation=F.silu,
                                                       batch_first=True),
        "own_norm": OwnNorm(D_MODEL),
        "fasttx_norm": fasttx.nn.LayerNorm(D_MODEL),
    })
    report = fasttx.patch(model, layer_norm=False)
    reasons = dict(report.left_alone)
    assert "neither relu nor gelu" in reasons["custom_act"]
    assert "own forward" in reasons["own_norm"]
    assert reasons["custom_act.norm1"] == "layer_norm=False"
    assert "fasttx_norm" not in reasons and report.replaced == []
    assert "left alone  custom_act" in str(report)


@pytest.mark.parametrize("options", [dict(attention=False), dict(ffn=False), dict(layer_norm=False)], ids=str)
def test_each_part_can_be_left_to_torch(options):
    plain = _encoder(norm_first=False, layers=1)
    patched = _encoder(norm_first=False, layers=1)
    patched.load_state_dict(plain.state_dict())
    fasttx.patch(patched, **options)
    _assert_same(plain, patched, torch.randn(2, 17, D_MODEL))


def test_ffn_dropout_in_training_runs_torchs_ffn():
    plain, patched, _ = _pair(dropout=0.1, layers=1)
    x = torch.randn(2, 11, D_MODEL)
    for model in (plain, patched):
        model.eval()
    _assert_same(plain, patched, x)
    patched.train()
    torch.manual_seed(3)
    a = patched(x)
    torch.manual_seed(4)
    assert not torch.equal(a, patched(x))


def test_is_causal_without_a_mask_raises_like_torch():
    _, patched, _ = _pair(layers=1)
    with pytest.raises(RuntimeError, match="is_causal=True is a hint"):
        patched.layers[0](torch.randn(1, 4, D_MODEL), is_causal=True)


def test_torch_compile_fullgraph_of_a_patched_stack():
    plain, patched, _ = _pair()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    _assert_same(plain, compiled, torch.randn(2, 19, D_MODEL))


def test_patch_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        fasttx.patch({})


def test_a_layer_norm_subclass_with_its_own_forward_keeps_its_layer_unfused():
    class OwnNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    layer = torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, batch_first=True)
    layer.norm1 = OwnNorm(D_MODEL)
    report = fasttx.patch(layer)
    assert report.replaced == [("norm2", "fasttx.layer_norm")]
    reasons = dict(report.left_alone)
    assert reasons.keys() == {"", "norm1"} and reasons[""] == "norm1 is a OwnNorm with its own forward"
    assert reasons["norm1"].endswith("OwnNorm subclasses torch.nn.LayerNorm with its own forward")


class _OwnLayerNorm(torch.nn.Module):
    """nanoGPT's: its own module calling F.layer_norm, which no recogniser knows."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.bias = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def test_a_model_with_nothing_to_patch_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), _OwnLayerNorm(16), torch.nn.GELU())
    report = fasttx.patch(model)
    assert report.found_nothing and report.replaced == report.left_alone == report.fused == []
    text = str(report)
    assert text.startswith("fasttx.patch: 0 module(s) replaced, 0 left alone\n")
    assert "found nothing to patch in Sequential" in text and "fasttx.accelerate()" in text


def test_a_model_with_only_candidates_left_alone_says_nothing_was_replaced():
    report = fasttx.patch(torch.nn.Sequential(torch.nn.LayerNorm(8)), layer_norm=False)
    assert not report.found_nothing
    assert "nothing was replaced" in str(report) and "left alone  0: layer_norm=False" in str(report)
