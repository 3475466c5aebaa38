"""A patched model behaves as an unpatched one beyond its outputs: it pickles, torch.saves, deepcopies and
loads state_dicts (in this process and in a fresh one) and computes the same afterwards; every hook of
every kind on every submodule fires as unpatched, with the same arguments, whether registered before or
after patching; torch.jit.script refuses it with an error naming fasttx.unpatch. Covers torch's
LayerNorm and TransformerEncoder(Layer) and, when transformers is installed, GPT-2 and BERT."""
import copy
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import fasttx
from fasttx.patching import is_patched, torch_modules

D_MODEL, N_HEADS, D_HIDDEN = 32, 4, 48
ROOT = Path(__file__).resolve().parent.parent


def _encoder(norm_first=True, activation="gelu", layers=2, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HIDDEN, dropout=0.0, activation=activation,
                                             batch_first=True, norm_first=norm_first)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _norms(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, D_MODEL), torch.nn.LayerNorm(D_MODEL),
                               torch.nn.GELU(), torch.nn.LayerNorm(D_MODEL, bias=False))


def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=100,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _run(model, seed=1):
    """A forward and backward of ``model`` on fixed inputs: the output and every gradient, by name."""
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    if isinstance(model, torch.nn.Sequential):
        x = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
        out = model(x)
    elif isinstance(model, torch.nn.TransformerEncoder):
        x = torch.randn(2, 7, D_MODEL, generator=gen, requires_grad=True)
        out = model(x)
    else:
        ids = torch.randint(0, 100, (2, 9), generator=gen)
        out = model(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long)).logits
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_run(got, want, rtol=0.0, atol=0.0):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


MODELS = {"encoder": _encoder, "layer_norms": _norms, "gpt2": _gpt2, "bert": _bert}


def _patched(name, seed=0):
    model = MODELS[name](seed=seed)
    fasttx.patch(model)
    return model


def _through_torch_save(model, name):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _through_state_dict(model, name):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = _patched(name, seed=5)  # other weights, until the state_dict loads
    other.load_state_dict(torch.load(buf))
    return other


ROUND_TRIPS = {"pickle": lambda model, name: pickle.loads(pickle.dumps(model)), "torch_save": _through_torch_save,
               "deepcopy": lambda model, name: copy.deepcopy(model), "state_dict": _through_state_dict}


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("name", MODELS)
def test_round_trip_keeps_the_patch_and_the_results(name, round_trip):
    model = _patched(name)
    want = _run(model)
    copied = ROUND_TRIPS[round_trip](model, name)
    assert copied is not model
    patched_paths = [path for path, m in model.named_modules() if is_patched(m)]
    assert patched_paths and [path for path, m in copied.named_modules() if is_patched(m)] == patched_paths
    for (path, a), b in zip(model.named_modules(), copied.modules()):
        assert type(a) is type(b), path  # the same patched class, not a look-alike
    _assert_same_run(_run(copied), want)
    # the copy unpatches like the original: the original classes and (Hugging Face) the shared config back
    assert fasttx.unpatch(copied) == len(patched_paths)
    plain = MODELS[name]()
    plain.load_state_dict(copied.state_dict())
    for a, b in zip(plain.modules(), copied.modules()):
        assert type(a) is type(b)
    if name == "gpt2":
        assert copied.transformer.h[0].attn.config is copied.config
    _assert_same_run(_run(copied), _run(plain))


def test_a_patched_model_saved_here_loads_patched_in_a_fresh_process(tmp_path):
    """In a fresh process no patched class exists yet: unpickling rebuilds it from the original class."""
    names = ["encoder", "layer_norms"] + (["gpt2", "bert"] if importlib.util.find_spec("transformers") else [])
    models = {name: _patched(name) for name in names}
    torch.save({name: (m, _run(m)[0]) for name, m in models.items()}, tmp_path / "models.pt")
    script = f"""
import torch, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_patch_reliability import _run
from fasttx.patching import is_patched
saved = torch.load({str(tmp_path / 'models.pt')!r}, weights_only=False)
for name, (model, want) in saved.items():
    assert any(is_patched(m) for m in model.modules()), name
    torch.testing.assert_close(_run(model)[0], want, rtol=0, atol=0)
print("ok", ",".join(sorted(saved)))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == ",".join(sorted(names))


# ---- hooks ---------------------------------------------------------------------------------

def _snapshot(value):
    """What a hook was given, kept for comparison: tensors copied, other objects by type."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return tuple(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def _assert_same_snapshot(got, want, where):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_snapshot(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_same_snapshot(got[k], want[k], f"{where}[{k!r}]")
    else:
        assert got == want, where


HOOK_KINDS = ("forward_pre", "forward_pre_with_kwargs", "forward", "forward_with_kwargs", "full_backward",
              "backward_pre")


def _register(module, path, kind, calls):
    def record(*payload):
        calls.append((path, kind, _snapshot(payload[1:])))  # payload[0] is the module itself

    if kind == "forward_pre":
        return module.register_forward_pre_hook(record)
    if kind == "forward_pre_with_kwargs":
        return module.register_forward_pre_hook(record, with_kwargs=True)
    if kind == "forward":
        return module.register_forward_hook(record)
    if kind == "forward_with_kwargs":
        return module.register_forward_hook(record, with_kwargs=True)
    if kind == "full_backward":
        return module.register_full_backward_hook(record)
    return module.register_full_backward_pre_hook(record)


def _hook_calls(model, paths, kinds=HOOK_KINDS, grad=True):
    """Every hook call of ``kinds`` on the modules at ``paths`` during one forward (and backward) of model."""
    calls = []
    handles = [_register(model.get_submodule(path), path, kind, calls) for path in paths for kind in kinds]
    if grad:
        model.train()
        out = _run(model)
    else:
        model.eval()
        with torch.no_grad():
            out = _run_forward(model)  # an encoder's: torch may take its fused inference path
    for h in handles:
        h.remove()
    return calls, out


def _run_forward(model):
    return model(torch.randn(2, 7, D_MODEL, generator=torch.Generator().manual_seed(1)))


def _assert_same_calls(got, want):
    assert [c[:2] for c in got] == [c[:2] for c in want]  # the same hooks, as often, in the same order
    for (path, kind, g), (_, _, w) in zip(got, want):
        _assert_same_snapshot(g, w, f"{path} {kind}")


def _plain_and_patched(name, **kw):
    plain, patched = MODELS[name](**kw), MODELS[name](**kw)
    patched.load_state_dict(plain.state_dict())
    fasttx.patch(patched)
    return plain, patched


def _layer_paths(model, prefix):
    return [path for path, _ in model.named_modules() if path == prefix or path.startswith(prefix + ".")]


ENCODER_CASES = [dict(norm_first=True), dict(norm_first=False), dict(norm_first=True, activation=torch.nn.GELU())]


@pytest.mark.parametrize("case", ENCODER_CASES, ids=["pre_ln", "post_ln", "gelu_module"])
def test_hooks_on_each_encoder_layer_submodule_fire_as_unpatched(case):
    plain, patched = _plain_and_patched("encoder", **case)
    paths = _layer_paths(plain, "layers.0")
    assert "layers.0.norm1" in paths and "layers.0.self_attn" in paths and "layers.0.linear1" in paths
    if isinstance(case.get("activation"), torch.nn.Module):
        assert "layers.0.activation" in paths
    for path in paths:
        want, want_out = _hook_calls(plain, [path])
        got, got_out = _hook_calls(patched, [path])
        _assert_same_calls(got, want)
        _assert_same_run(got_out, want_out, rtol=1e-5, atol=2e-5)
    # and every submodule at once, and in eval mode without grad (where torch may take its own fast path)
    _assert_same_calls(_hook_calls(patched, paths)[0], _hook_calls(plain, paths)[0])
    kinds = ("forward_pre", "forward_pre_with_kwargs", "forward", "forward_with_kwargs")
    for path in paths:
        _assert_same_calls(_hook_calls(patched, [path], kinds, grad=False)[0],
                           _hook_calls(plain, [path], kinds, grad=False)[0])


def test_hooks_registered_before_patching_fire_too():
    plain, patched = _encoder(), _encoder()
    want, calls = [], []
    for model, into in ((plain, want), (patched, calls)):
        for kind in HOOK_KINDS:
            _register(model.layers[1].linear2, "linear2", kind, into)
    fasttx.patch(patched)
    _run(plain)
    _run(patched)
    assert {kind for _, kind, _ in want} == set(HOOK_KINDS)
    _assert_same_calls(calls, want)


def test_hooks_that_change_values_change_them_as_unpatched():
    """A pre-hook that rewrites an input, a hook that rewrites an output, weight_norm's weight hook."""
    plain, patched = _plain_and_patched("encoder", layers=1)
    for model in (plain, patched):
        layer = model.layers[0]
        layer.norm1.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        layer.linear2.register_forward_hook(lambda m, args, out: out.tanh())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weight_norm is deprecated for parametrizations
            torch.nn.utils.weight_norm(layer.linear1)
    _assert_same_run(_run(patched), _run(plain), rtol=1e-5, atol=2e-5)


def test_parametrizations_and_functional_call_reach_the_fused_code():
    """What swaps a submodule's weights without a hook (parametrize, torch.func.functional_call) is read by
    the fused code, which takes the weights from the submodules at each call."""
    class Double(torch.nn.Module):
        def forward(self, w):
            return w * 2

    plain, patched = _plain_and_patched("encoder", layers=1)
    params = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in plain.named_parameters()}
    x = torch.randn(2, 7, D_MODEL)
    torch.testing.assert_close(torch.func.functional_call(patched, params, (x,)),
                               torch.func.functional_call(plain, params, (x,)), rtol=1e-5, atol=2e-5)
    for model in (plain, patched):
        torch.nn.utils.parametrize.register_parametrization(model.layers[0].linear1, "weight", Double())
        torch.nn.utils.parametrize.register_parametrization(model.layers[0].norm2, "weight", Double())
    _assert_same_run(_run(patched), _run(plain), rtol=1e-5, atol=2e-5)


def test_global_module_hooks_fire_as_unpatched():
    plain, patched = _plain_and_patched("encoder")
    names = {}
    for model in (plain, patched):
        names.update({id(m): path for path, m in model.named_modules()})
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook,
                     torch.nn.modules.module.register_module_full_backward_hook):
        calls = []
        handle = register(lambda m, *payload: calls.append((names.get(id(m)), _snapshot(payload))))
        try:
            _run(plain)
            want, calls[:] = list(calls), []
            _run(patched)
        finally:
            handle.remove()
        _assert_same_calls([(p, "", s) for p, s in calls], [(p, "", s) for p, s in want])


def test_without_hooks_on_what_it_skips_the_layer_stays_fused():
    """The check costs a few dict lookups; it must not send every call to torch's code."""
    _, patched = _plain_and_patched("encoder", layers=1)
    layer = patched.layers[0]
    with mock.patch.object(torch_modules, "gelu_ffn", wraps=torch_modules.gelu_ffn) as fused:
        handle = layer.register_forward_hook(lambda *a: None)  # the layer's own hook: its patched forward runs
        _run(patched)
        assert fused.call_count == 1
        handle.remove()
        handle = layer.linear1.register_forward_hook(lambda *a: None)
        _run(patched)
        assert fused.call_count == 1  # torch's code ran: linear1 was called
        handle.remove()
        _run(patched)
        assert fused.call_count == 2  # fused again once the hook is gone


@pytest.mark.parametrize("name,layer", [("gpt2", "transformer.h.0"), ("bert", "bert.encoder.layer.0")])
def test_hooks_on_each_hugging_face_submodule_fire_as_unpatched(name, layer):
    plain, patched = _plain_and_patched(name)
    paths = _layer_paths(plain, layer)
    for path in paths:
        want, want_out = _hook_calls(plain, [path])
        got, got_out = _hook_calls(patched, [path])
        _assert_same_calls(got, want)
        _assert_same_run(got_out, want_out, rtol=1e-5, atol=1e-5)
    _assert_same_calls(_hook_calls(patched, paths)[0], _hook_calls(plain, paths)[0])


# ---- torch.jit.script ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["encoder", "layer_norms", "gpt2", "bert"])
def test_jit_script_of_a_patched_model_names_fasttx_and_unpatch(name):
    model = _patched(name)
    want = _run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in torch 2.10+
        with pytest.raises(RuntimeError, match=r"fasttx: torch\.jit\.script cannot compile fasttx-patched .*"
                                               r"fasttx\.unpatch\(model\)"):
            torch.jit.script(model)
    _assert_same_run(_run(model), want)  # the refusal left the model as it was


@pytest.mark.parametrize("name", ["encoder", "layer_norms"])
def test_jit_script_after_unpatch_scripts_torchs_code(name):
    model = _patched(name)
    fasttx.unpatch(model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(2, 7, D_MODEL) if name == "encoder" else torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
