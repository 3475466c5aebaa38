"""fasttx.patch on Hugging Face GPT-2 and BERT (random weights from a config, offline): the same
logits, every parameter's gradient, 30 AdamW steps and state_dicts as unpatched; torch.compile;
what is left alone and why. Skips when transformers is not installed."""
from unittest import mock

import pytest
import torch

import fasttx
from fasttx.patching import is_patched

from patch_checks import adamw_losses, assert_loads_through_a_file, assert_report_tells_what_runs

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402

NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _gpt2(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, **{**NO_DROPOUT_GPT2, **kw}))


def _bert(seed=0, **kw):
    torch.manual_seed(seed)
    config = BertConfig(**{**dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=1000, num_labels=3), **NO_DROPOUT_BERT, **kw})
    return BertForSequenceClassification(config)


def _pair(make, **kw):
    plain, patched = make(**kw), make(**kw)
    patched.load_state_dict(plain.state_dict())
    return plain, patched, fasttx.patch(patched)


def _padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 17:] = 0
    mask[2, 6:] = 0
    return ids, mask


def _logits_and_grads(model, **inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain, patched, rtol=1e-5, atol=1e-6, **inputs):
    want_logits, want = _logits_and_grads(plain, **inputs)
    got_logits, got = _logits_and_grads(patched, **inputs)
    torch.testing.assert_close(got_logits, want_logits, rtol=rtol, atol=atol)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_gpt2_report_names_every_swapped_module():
    _, _, report = _pair(_gpt2)
    replaced = dict(report.replaced)
    for i in range(2):
        assert "AttentionInterface" in replaced[f"transformer.h.{i}.attn"]
        assert replaced[f"transformer.h.{i}.mlp"] == "fasttx.gelu_ffn (gelu_tanh)"  # gelu_new is the tanh form
        assert replaced[f"transformer.h.{i}.ln_1"] == "fasttx.layer_norm"
    assert "transformer.ln_f" in replaced
    assert replaced[""].startswith("loss_function: fasttx.cross_entropy")
    assert report.left_alone == []


def _loss_and_grads(model, **inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_gpt2_loss_with_ignored_labels_same_loss_and_gradients(num_items_in_batch):
    plain, patched, _ = _pair(_gpt2)
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    want_loss, want = _loss_and_grads(plain, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    got_loss, got = _loss_and_grads(patched, input_ids=ids, attention_mask=mask, labels=labels, **extra)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_gpt2_loss_under_bf16_autocast_is_float32_and_close():
    plain, patched, _ = _pair(_gpt2)
    ids = _padded_batch()[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(input_ids=ids, labels=ids).loss
        got = patched(input_ids=ids, labels=ids).loss
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


def test_a_loss_function_set_by_the_user_wins_and_loss_false_leaves_it_alone():
    plain, patched, _ = _pair(_gpt2)
    ids = _padded_batch()[0]
    patched.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean() * 0 + 42.0
    assert patched(input_ids=ids, labels=ids).loss.item() == 42.0
    report = fasttx.patch(_gpt2(), loss=False)
    assert ("", "loss=False") in report.left_alone


def test_gpt2_same_logits_and_gradients():
    plain, patched, _ = _pair(_gpt2)
    ids, mask = _padded_batch()
    _assert_same(plain, patched, input_ids=ids)
    _assert_same(plain, patched, input_ids=ids, attention_mask=mask)


def test_bert_with_padding_same_logits_and_gradients():
    plain, patched, report = _pair(_bert)
    replaced = dict(report.replaced)
    assert "AttentionInterface" in replaced["bert.encoder.layer.0.attention.self"]
    assert replaced["bert.encoder.layer.0"].startswith("feed_forward_chunk: fasttx.gelu_ffn (gelu)")
    assert "add_layer_norm" in replaced["bert.encoder.layer.1.attention.output"]
    ids, mask = _padded_batch()
    _assert_same(plain, patched, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_thirty_adamw_steps_give_the_same_losses(make):
    plain, patched, _ = _pair(make)
    ids, mask = _padded_batch()
    labels = ids if make is _gpt2 else torch.tensor([0, 2, 1])
    losses = [adamw_losses(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
              for model in (plain, patched)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_state_dicts_load_both_ways(make):
    plain, patched, _ = _pair(make)
    assert list(patched.state_dict()) == list(plain.state_dict())

    assert_loads_through_a_file(patched, make(seed=1))
    other = make(seed=2)
    fasttx.patch(other)
    assert_loads_through_a_file(plain, other)


def test_unpatch_restores_classes_and_configs():
    plain, patched, report = _pair(_gpt2)
    attn = patched.transformer.h[0].attn
    assert attn.config is not patched.config and attn.config._attn_implementation == "fasttx"
    assert fasttx.unpatch(patched) == len(report.replaced)
    assert not any(is_patched(m) for m in patched.modules())
    assert attn.config is patched.config
    _assert_same(plain, patched, rtol=0, atol=0, input_ids=_padded_batch()[0])


def test_what_is_left_alone_is_reported():
    model = _gpt2(activation_function="silu")
    report = fasttx.patch(model, attention=False)
    reasons = dict(report.left_alone)
    assert reasons["transformer.h.0.attn"] == "attention=False"
    assert "is not gelu, gelu_tanh or relu" in reasons["transformer.h.0.mlp"]


def test_torch_compile_fullgraph_of_patched_gpt2_runs_forward_and_backward():
    plain, patched, _ = _pair(_gpt2)
    ids = _padded_batch()[0]
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")  # raises on any graph break
    want_logits, want = _logits_and_grads(plain, input_ids=ids)
    patched.zero_grad()
    got_logits = compiled(input_ids=ids).logits
    got_logits.float().square().mean().backward()
    torch.testing.assert_close(got_logits.detach(), want_logits, rtol=1e-5, atol=1e-6)
    for name, p in patched.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # and the loss patch: fasttx.cross_entropy in the same graph
    want_loss, want = _loss_and_grads(plain, input_ids=ids, labels=ids)
    patched.zero_grad()
    got_loss = compiled(input_ids=ids, labels=ids).loss
    got_loss.backward()
    torch.testing.assert_close(got_loss.detach(), want_loss, rtol=1e-5, atol=0)
    for name, p in patched.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_patched_gpt2_under_bf16_autocast_matches_unpatched_dtypes_and_values():
    plain, patched, _ = _pair(_gpt2)
    ids, mask = _padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = patched(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.1)


def test_gpt2_with_eager_attention_masks_matches_unpatched():
    """A model loaded with attn_implementation="eager" builds additive float masks: fasttx takes those too."""
    plain, patched = _gpt2(), _gpt2()
    for model in (plain, patched):
        model.config._attn_implementation = "eager"
    patched.load_state_dict(plain.state_dict())
    report = fasttx.patch(patched)
    assert "transformer.h.0.attn" in dict(report.replaced)
    ids, mask = _padded_batch()
    keep = mask.bool()[..., None]  # eager gives padded query rows values of its own; compare the real rows
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = patched(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got * keep, want * keep, rtol=1e-5, atol=1e-5)


def test_patched_gpt2_generates_the_same_tokens_with_a_kv_cache():
    plain, patched, _ = _pair(_gpt2)
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.generate(ids, **kw)
        got = patched.generate(ids, **kw)
    assert torch.equal(got, want)


# ---- what patching used to break (issue 26, item 4) -------------------------------------------------------------

def _left_padded_batch(vocab=1000):
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_output_attentions_returns_the_eager_weights():
    """transformers 5 no longer passes output_attentions to the attention function: the patched attention sees
    that the caller records attentions and computes that call with eager attention, weights included."""
    plain, patched, _ = _pair(_gpt2, vocab_size=1000)
    ids, mask = _padded_batch()
    plain.set_attn_implementation("eager")
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = patched(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    keep = mask.bool()[:, None, :, None]  # the real query rows (eager gives padded rows weights of its own)
    for g, w in zip(got.attentions, want.attentions):
        assert g.shape == w.shape == (3, 4, 24, 24)
        torch.testing.assert_close(g * keep, w * keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits * mask.bool()[..., None], want.logits * mask.bool()[..., None],
                               rtol=1e-5, atol=1e-5)
    # the next call without it runs fasttx's attention again, and its logits are sdpa's
    with torch.no_grad():
        again = patched(input_ids=ids).logits
        plain.set_attn_implementation("sdpa")
        torch.testing.assert_close(again, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def _attention_calls(model, **inputs):
    """How many times fasttx's attention function ran in one forward of ``model``."""
    from fasttx.patching import hf_transformers
    calls = []
    real = hf_transformers.scaled_dot_product_attention
    hf_transformers.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hf_transformers.scaled_dot_product_attention = real
    return len(calls)


def test_set_attn_implementation_after_patching_is_followed_both_ways():
    plain, patched, _ = _pair(_gpt2, vocab_size=1000)
    ids, mask = _padded_batch()
    assert _attention_calls(patched, input_ids=ids) == 2
    patched.set_attn_implementation("eager")
    assert _attention_calls(patched, input_ids=ids) == 0  # transformers' eager attention now
    plain.set_attn_implementation("eager")
    with torch.no_grad():
        want = plain(input_ids=ids, output_attentions=True)
        got = patched(input_ids=ids, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    assert len(got.attentions) == 2
    patched.set_attn_implementation("sdpa")  # back to what it was patched over: fasttx's again
    assert _attention_calls(patched, input_ids=ids) == 2
    plain.set_attn_implementation("sdpa")
    _assert_same(plain, patched, input_ids=ids, attention_mask=mask)


def test_a_model_built_with_attn_implementation_fasttx_masks_padding():
    from fasttx.patching import register_transformers_attention
    assert register_transformers_attention() == "fasttx"
    plain = _gpt2(vocab_size=1000)
    torch.manual_seed(0)
    own = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, attn_implementation="fasttx",
                                     **NO_DROPOUT_GPT2))
    own.load_state_dict(plain.state_dict())
    assert own.config._attn_implementation == "fasttx"
    assert _attention_calls(own, input_ids=_padded_batch()[0]) == 2
    ids, mask = _left_padded_batch()
    keep = mask.bool()[..., None]
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = own(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got * keep, want * keep, rtol=1e-5, atol=1e-5)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(own.generate(ids, **kw), plain.generate(ids, **kw))


def test_patching_gpt2_prints_no_transformers_warning():
    """transformers' loss_function property warns (once per process) that GPT2LMHeadModel has no loss_type: the
    patch must not read that property to find the loss, or the warning shows on patching (and, being once, is
    gone when the unpatched model would have said it)."""
    import logging
    said = []
    record = lambda self, *args, **kwargs: said.append(str(args[0]) if args else "")  # noqa: E731
    with mock.patch.object(logging.Logger, "warning_once", record):
        fasttx.patch(_gpt2(vocab_size=1000))
        assert not [m for m in said if "loss_type" in m], said
        ids = _padded_batch()[0]
        _gpt2(vocab_size=1000)(input_ids=ids, labels=ids)  # unpatched, the warning is still transformers' to give
    assert [m for m in said if "loss_type" in m]


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_the_report_lists_what_runs(make):
    """BERT's output LayerNorms and BertOutput are computed inside the patched BertSelfOutput / BertLayer code:
    listed as such, not as replaced, and not patched."""
    _, patched, report = _pair(make, vocab_size=1000)
    ids, mask = _padded_batch()
    labels = ids if make is _gpt2 else torch.tensor([0, 2, 1])
    assert_report_tells_what_runs(patched, report, lambda: patched(input_ids=ids, attention_mask=mask, labels=labels))
    fused = dict(report.fused)
    if make is _bert:
        assert fused == {"bert.encoder.layer.0.attention.output.LayerNorm": "bert.encoder.layer.0.attention.output",
                         "bert.encoder.layer.0.output": "bert.encoder.layer.0",
                         "bert.encoder.layer.0.output.LayerNorm": "bert.encoder.layer.0",
                         "bert.encoder.layer.1.attention.output.LayerNorm": "bert.encoder.layer.1.attention.output",
                         "bert.encoder.layer.1.output": "bert.encoder.layer.1",
                         "bert.encoder.layer.1.output.LayerNorm": "bert.encoder.layer.1"}
        assert "fused       bert.encoder.layer.0.output: computed inside bert.encoder.layer.0's fasttx code" \
            in str(report)
    else:
        assert fused == {}
