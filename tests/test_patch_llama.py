"""fasttx.patch on Hugging Face's LLaMA family: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and Phi-3, each as
far as the installed transformers has it, from a tiny random config (2 layers, hidden 64, vocab 128, 4 query and
2 key/value heads, no dropout, offline). Patched and unpatched give the same logits, loss and every parameter
gradient (fp32, rtol 1e-4), with and without left padding; generate() with the KV cache gives the same tokens;
gradient checkpointing, save_pretrained / from_pretrained and torch.compile(fullgraph=True) work; the report
lists every RMSNorm and attention replaced, what is left alone and why, and only modules that run.
Skips when transformers is not installed."""
import copy
from unittest import mock

import pytest
import torch

import fasttx
from fasttx.patching import hf_llama, is_patched

from patch_checks import assert_report_tells_what_runs

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
# Per family: what its tiny config needs, and a sliding window shorter than the batch where the family has one,
# so that the window is in the masks fasttx's attention takes.
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5),  # attention logits soft-capped
    "phi3": dict(resid_pdrop=0.0, embd_pdrop=0.0),
}
RTOL, ATOL = 1e-4, 1e-6


def _make(family, seed=0):
    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    return AutoModelForCausalLM.from_config(config)


_PLAIN = {}


def _pair(family, **options):
    """The unpatched model (built once per family: the tests leave it as it was) and a patched deep copy, both
    in training mode (no dropout in these configs), where the patched LM head + loss is one fused op."""
    if family not in _PLAIN:
        _PLAIN[family] = _make(family)
    plain = _PLAIN[family].train()
    patched = copy.deepcopy(plain)
    return plain, patched, fasttx.patch(patched, **options)


def _batch(padding: bool):
    """Token ids (3, 11), the attention mask (left padding in rows 1 and 2, or None) and labels (-100 on pads)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 11), generator=gen)
    if not padding:
        return ids, None, ids
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    return ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)


def _run(model, ids, mask, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the parameters by their own names
    logits = None if out.logits is None else out.logits.detach()
    return logits, out.loss.detach(), {n: p.grad for n, p in module.named_parameters()}


def _assert_same_logits(got, want, mask):
    keep = torch.ones(got.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    # logits of the real tokens: a padded query row sees no key, and what it gives is each kernel's own
    torch.testing.assert_close(got[keep], want[keep], rtol=RTOL, atol=1e-5)


def _assert_same_run(got, want, mask):
    """Same loss and gradients; the patched model in training with labels returns no logits (the fused LM
    head + loss), and where it returns them they are the same."""
    if got[0] is not None:
        _assert_same_logits(got[0], want[0], mask)
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=0)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert got[2][name] is not None, name
        torch.testing.assert_close(got[2][name], want[2][name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_report_lists_every_norm_and_attention_and_only_what_runs(family):
    _, patched, report = _pair(family)
    replaced, left_alone = dict(report.replaced), dict(report.left_alone)
    modules = dict(patched.named_modules())
    norms = [path for path, m in modules.items() if type(m).__name__ in hf_llama.RMS_NORMS]
    attentions = [path for path, m in modules.items() if type(m).__name__ in hf_llama.ATTENTIONS]
    assert len(norms) >= 5 and len(attentions) == 2
    # the norm after each layer's middle residual add is computed inside the patched decoder layer
    fused_norm = "pre_feedforward_layernorm" if family == "gemma2" else "post_attention_layernorm"
    one_plus = " with (1 + weight)" if family.startswith("gemma") else ""
    for path in norms:
        if path.endswith(fused_norm):
            assert path not in replaced and path not in left_alone, path
            continue
        assert replaced[path].startswith("fasttx.rms_norm"), path
        assert ("(1 + weight)" in replaced[path]) == family.startswith("gemma")
    layers = [path for path, m in modules.items() if type(m).__name__ in hf_llama.DECODER_LAYERS]
    assert len(layers) == 2
    for path in layers:
        assert replaced[path] == f"residual add + {fused_norm}: fasttx.add_rms_norm{one_plus}"
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_norm" in replaced and "model.layers.1.self_attn.k_norm" in replaced
    for path in attentions:
        if family == "gemma2":  # fasttx's attention computes no logit softcapping: the rotary alone is fasttx's
            assert replaced[path].startswith("rotary: fasttx.apply_rotary; attention left as transformers'")
            assert "soft-capped" in replaced[path]
        else:
            assert replaced[path] == ("fasttx.scaled_dot_product_attention (through AttentionInterface); "
                                      "rotary: fasttx.apply_rotary")
    mlps = [path for path, m in modules.items() if type(m).__name__ in hf_llama.MLPS]
    assert len(mlps) == 2
    for path in mlps:
        assert replaced[path] == f"fasttx.glu_ffn ({'gelu_tanh' if family.startswith('gemma') else 'silu'})"
    assert replaced[""].startswith("lm_head + loss: fasttx.linear_cross_entropy in training with labels")
    assert "apply_rotary" in left_alone["model.rotary_emb"] and set(left_alone) == {"model.rotary_emb"}
    assert report.fused == [(f"{path}.{fused_norm}", path) for path in layers]
    ids, mask, labels = _batch(padding=True)
    assert_report_tells_what_runs(patched, report, lambda: patched(input_ids=ids, attention_mask=mask, labels=labels))


@pytest.mark.parametrize("padding", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_loss_and_gradients(family, padding):
    plain, patched, _ = _pair(family)
    ids, mask, labels = _batch(padding)
    got = _run(patched, ids, mask, labels)
    assert got[0] is None  # training with labels: one linear_cross_entropy, no logits (Gemma 2's soft-capped)
    _assert_same_run(got, _run(plain, ids, mask, labels), mask)
    with torch.no_grad():  # without labels: the logits, as unpatched
        _assert_same_logits(patched(input_ids=ids, attention_mask=mask).logits,
                            plain(input_ids=ids, attention_mask=mask).logits, mask)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_keep_logits_and_eval_mode_return_the_logits_with_the_same_loss(family):
    plain, patched, report = _pair(family, keep_logits=True)
    assert dict(report.replaced)[""].startswith("loss_function: fasttx.cross_entropy") \
        and "keep_logits=True" in dict(report.replaced)[""]
    ids, mask, labels = _batch(padding=True)
    got = _run(patched, ids, mask, labels)
    assert got[0] is not None
    _assert_same_run(got, _run(plain, ids, mask, labels), mask)
    _, patched, _ = _pair(family)  # the default: logits in eval mode (as in an evaluation loop with labels)
    patched.eval()
    got = _run(patched, ids, mask, labels)
    assert got[0] is not None
    _assert_same_run(got, _run(plain.eval(), ids, mask, labels), mask)


def test_num_items_in_batch_and_shift_labels_follow_for_causal_lm_loss():
    """transformers' Trainer passes num_items_in_batch (gradient accumulation): the loss is the sum over that
    count; shift_labels replaces the shift of labels."""
    plain, patched, _ = _pair("llama")
    ids, mask, labels = _batch(padding=True)
    for extra in (dict(num_items_in_batch=torch.tensor(37)), dict(num_items_in_batch=37),
                  dict(shift_labels=torch.roll(labels, 2, dims=1))):
        got = _run(patched, ids, mask, labels, **extra)
        assert got[0] is None
        _assert_same_run(got, _run(plain, ids, mask, labels, **extra), mask)


def test_phi3_fused_gate_up_proj_runs_as_views_and_partial_rotary_is_fasttx():
    """Phi-3's gate_up_proj (2h, d), chunked (gate, up): glu_ffn gets W[:h] and W[h:], views of the one
    parameter, whose gradient is the same; a partial rotary (partial_rotary_factor 0.5: the first half of each
    head rotates) goes through fasttx.apply_rotary too, and the state_dict is unchanged."""
    if "phi3" not in CONFIG_MAPPING:
        pytest.skip("no phi3")
    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3", **COMMON, **FAMILIES["phi3"], partial_rotary_factor=0.5)
    plain = AutoModelForCausalLM.from_config(config)
    patched = copy.deepcopy(plain)
    report = dict(fasttx.patch(patched).replaced)
    assert "rotary: fasttx.apply_rotary" in report["model.layers.0.self_attn"]
    assert report["model.layers.0.mlp"] == "fasttx.glu_ffn (silu)"
    assert list(patched.state_dict()) == list(plain.state_dict())
    calls = []
    real = hf_llama.glu_ffn

    def recording(x, w_gate, w_up, *args, **kwargs):
        calls.append((w_gate, w_up))
        return real(x, w_gate, w_up, *args, **kwargs)
    with mock.patch.object(hf_llama, "glu_ffn", recording), \
            mock.patch.object(hf_llama, "apply_rotary", wraps=hf_llama.apply_rotary) as rotary:
        ids, mask, labels = _batch(padding=True)
        _assert_same_run(_run(patched, ids, mask, labels), _run(plain, ids, mask, labels), mask)
    w = patched.model.layers[0].mlp.gate_up_proj.weight
    wg, wu = calls[0]
    assert wg.data_ptr() == w.data_ptr() and wu.data_ptr() == w[w.shape[0] // 2:].data_ptr()  # views, no copy
    assert rotary.call_count == 2 and rotary.call_args[0][2].shape[-1] == 8  # head_dim 16, half of it rotated


def test_hooks_on_the_fused_submodules_fire_as_unpatched():
    """A hook on a Linear the patched code computes without calling it (gate_proj inside glu_ffn, lm_head inside
    linear_cross_entropy) sends that call down transformers' code, so the hook fires and the logits come back."""
    plain, patched, _ = _pair("llama")
    seen = []
    patched.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append("gate_proj"))
    patched.lm_head.register_forward_hook(lambda m, i, o: seen.append("lm_head"))
    ids, mask, labels = _batch(padding=True)
    got = _run(patched, ids, mask, labels)
    assert seen == ["gate_proj", "lm_head"] and got[0] is not None
    _assert_same_run(got, _run(plain, ids, mask, labels), mask)


def test_a_hook_on_the_norm_fused_into_the_decoder_layer_fires_as_unpatched():
    """The decoder layer computes post_attention_layernorm inside add_rms_norm, without calling it; a hook on it
    sends that layer down transformers' code, so the hook fires (and sees the sum) and the results stay."""
    plain, patched, _ = _pair("llama")
    seen = []
    patched.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    ids, mask, labels = _batch(padding=True)
    _assert_same_run(_run(patched, ids, mask, labels), _run(plain, ids, mask, labels), mask)
    assert seen == [torch.Size([3, 11, 64])]


def test_a_decoder_layer_with_another_forward_or_an_old_keyword_runs_transformers_code():
    from transformers.models.llama import modeling_llama
    plain, _, _ = _pair("llama")
    layer = plain.model.layers[0]
    known = modeling_llama.LlamaDecoderLayer.forward

    def without_the_mlp_residual(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                                 use_cache=False, position_embeddings=None, **kwargs):
        # the known submodules, read in the known order, but another computation: the probe sees it
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        return self.mlp(hidden_states)

    with mock.patch.object(modeling_llama.LlamaDecoderLayer, "forward", without_the_mlp_residual):
        report = fasttx.patch(copy.deepcopy(layer))
    assert dict(report.left_alone)[""] == "its forward does not compute what the fused residual add + norm computes"
    assert "post_attention_layernorm" in dict(report.replaced)  # the norm alone, then
    assert known is modeling_llama.LlamaDecoderLayer.forward

    # transformers' deprecated name for the cache: the call goes through transformers' own decorator
    patched = copy.deepcopy(layer)
    assert "past_key_values" in hf_llama._renamed_keywords(modeling_llama.LlamaDecoderLayer.forward)
    assert dict(fasttx.patch(patched).replaced)[""].startswith("residual add + post_attention_layernorm")
    x = torch.randn(2, 5, 64)
    angles = torch.randn(1, 5, 8).repeat(1, 1, 2)
    tables = (angles.cos(), angles.sin())
    with torch.no_grad():
        want = layer(x, position_embeddings=tables)
        torch.testing.assert_close(patched(x, position_embeddings=tables), want, rtol=RTOL, atol=1e-5)
        with mock.patch.object(hf_llama, "add_rms_norm", side_effect=AssertionError("fused path taken")):
            torch.testing.assert_close(patched(x, past_key_values=None, position_embeddings=tables), want,
                                       rtol=RTOL, atol=1e-5)


def test_an_mlp_with_an_activation_glu_ffn_lacks_is_left_alone_and_runs_as_before():
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON, hidden_act="relu"))
    patched = copy.deepcopy(plain)
    report = fasttx.patch(patched)
    assert "is not silu, gelu or gelu_tanh" in dict(report.left_alone)["model.layers.0.mlp"]
    assert "model.layers.0.mlp" not in dict(report.replaced)
    ids, mask, labels = _batch(padding=True)
    _assert_same_run(_run(patched, ids, mask, labels), _run(plain, ids, mask, labels), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_kv_cache_gives_the_same_tokens(family):
    plain, patched, _ = _pair(family)
    ids, mask, _ = _batch(padding=True)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.generate(ids, **kw)
        got = patched.generate(ids, **kw)
    assert got.shape == (3, 17) and torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing(family):
    plain, patched, _ = _pair(family)
    ids, mask, labels = _batch(padding=True)
    want = _run(plain, ids, mask, labels)
    enable = getattr(patched, "activation_checkpointing_enable", None) or patched.gradient_checkpointing_enable
    enable()
    patched.train()
    assert patched.model.gradient_checkpointing
    _assert_same_run(_run(patched, ids, mask, labels), want, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_and_from_pretrained(family, tmp_path):
    plain, patched, report = _pair(family)
    patched.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(is_patched(m) for m in loaded.modules())
    assert loaded.config._attn_implementation == plain.config._attn_implementation  # "fasttx" is not saved
    assert list(loaded.state_dict()) == list(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert [path for path, _ in fasttx.patch(loaded).replaced] == [path for path, _ in report.replaced]
    ids, mask, labels = _batch(padding=True)
    _assert_same_run(_run(loaded, ids, mask, labels), _run(plain, ids, mask, labels), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph(family):
    plain, patched, _ = _pair(family)
    # raises on any graph break; AOT autograd (fasttx's fake kernels, the compiled backward) for Llama, whose
    # norms and attention are the ops every family uses: dynamo's capture alone for the others, to keep CI fast
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager" if family == "llama" else "eager")
    ids, mask, labels = _batch(padding=True)
    _assert_same_run(_run(compiled, ids, mask, labels), _run(plain, ids, mask, labels), mask)


def test_an_rms_norm_whose_forward_is_not_the_known_one_is_left_alone():
    from transformers.models.llama import modeling_llama
    norm = modeling_llama.LlamaRMSNorm(16)
    with mock.patch.object(modeling_llama.LlamaRMSNorm, "forward", lambda self, x: x * self.weight):
        report = fasttx.patch(torch.nn.ModuleList([norm]))
    assert report.replaced == []
    assert "does not compute RMSNorm with weight" in dict(report.left_alone)["0"]
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    report = fasttx.patch(torch.nn.ModuleList([gemma3.Gemma3RMSNorm(16)]))  # another model's: not checked, not taken
    assert report.replaced == [] and "fasttx.patch knows the RMSNorms of Llama" in dict(report.left_alone)["0"]


def test_qwen3_under_bf16_autocast_gives_the_unpatched_dtypes_and_close_values():
    """The norms return what transformers' do under autocast: Qwen3's q/k norms get bf16 projections and fp32
    weights, and return fp32 (weight * normalized.to(bf16)); Gemma's norms return their input's dtype."""
    for family in ("qwen3", "gemma"):
        plain, patched, _ = _pair(family, keep_logits=True)
        fused = copy.deepcopy(plain)
        fasttx.patch(fused)  # the LM head + loss as one linear_cross_entropy: the loss alone
        ids, mask, labels = _batch(padding=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = plain(input_ids=ids, attention_mask=mask, labels=labels)
            got = patched(input_ids=ids, attention_mask=mask, labels=labels)
            loss = fused(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert loss.dtype == want.loss.dtype == torch.float32
        torch.testing.assert_close(loss, want.loss, rtol=0.02, atol=0)
        assert got.logits.dtype == want.logits.dtype
        keep = mask.bool()
        torch.testing.assert_close(got.logits[keep].float(), want.logits[keep].float(), rtol=0.05, atol=0.05)
        torch.testing.assert_close(got.loss, want.loss, rtol=0.02, atol=0)


def test_rotary_under_autocast_rounds_once_to_what_the_attention_sees():
    """Under bf16 autocast transformers' rotary returns fp32 (its tables' dtype), which the attention casts back
    to bf16; the patched one is fasttx.apply_rotary returning bf16 directly: the values the attention sees, and
    gradients at least as close to a float64 truth (transformers' round each of the two products' gradients
    to bf16 and add them in bf16; fasttx rounds once). Outside autocast the promotion stays."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    wrapped = hf_llama._rotary_function(original, partial=False)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 33, 16, generator=gen).bfloat16().requires_grad_()
    angles = torch.randn(2, 33, 8, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            mock.patch.object(hf_llama, "apply_rotary", wraps=hf_llama.apply_rotary) as rotary:
        got, want = wrapped(q, k, cos, sin), original(q, k, cos, sin)
    assert rotary.call_count == 1
    assert [t.dtype for t in got] == [torch.bfloat16] * 2 and [t.dtype for t in want] == [torch.float32] * 2
    assert all(torch.equal(a, b.bfloat16()) for a, b in zip(got, want))  # one fp32 formula, rounded once
    grads = [torch.randn(t.shape, generator=gen).bfloat16() for t in got]
    got_grads = torch.autograd.grad(got, (q, k), grads)
    want_grads = torch.autograd.grad([w.bfloat16() for w in want], (q, k), grads)  # through the attention's cast
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    truth = torch.autograd.grad(original(q64, k64, cos.double(), sin.double()), (q64, k64),
                                [g.double() for g in grads])
    for ours, theirs, exact in zip(got_grads, want_grads, truth):
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
    with mock.patch.object(hf_llama, "apply_rotary", wraps=hf_llama.apply_rotary) as rotary:
        assert all(t.dtype == torch.float32 for t in wrapped(q, k, cos, sin)) and rotary.call_count == 0


def test_rms_norm_compiles_without_a_graph_break_when_eps_changes_between_calls():
    """torch.compile traces a float argument that changed since the last compile as a SymFloat (two models'
    norm eps, 1e-6 then 1e-5): fasttx.rms_norm's argument check must take it without a graph break."""
    compiled = torch.compile(lambda x, eps: fasttx.rms_norm(x, (8,), None, eps), fullgraph=True, backend="eager")
    x = torch.randn(3, 8)
    for eps in (1e-6, 1e-5, 1e-3):
        torch.testing.assert_close(compiled(x, eps), torch.nn.functional.rms_norm(x, (8,), None, eps))
