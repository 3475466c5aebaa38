"""fasttx.models.GPT with arch="llama": RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, untied head.

Fused and eager compute the same function from one set of parameters, that function is transformers'
LlamaForCausalLM's (weights copied), KV-cache decoding gives the tokens of full recomputation, and
``python -m fasttx train|generate`` take ``--arch llama``; GPT-2 style checkpoints written before the
new config keys still load, and bad configs are refused by name.
"""
import json
import random

import pytest
import torch

from fasttx.__main__ import main as cli
from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.generate import load_model
from fasttx.models import GPT, GPTConfig
from fasttx.models.gpt import KVCache, llama_hidden

TINY = dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=24, vocab_size=64, d_hidden=48)


def _pair(dtype=torch.float64, **overrides):
    """A fused model and an eager one holding the same parameters."""
    torch.manual_seed(0)
    config = {**TINY, **overrides}
    fused = GPT(GPTConfig(**config, kernels="fused")).to(dtype)
    eager = GPT(GPTConfig(**config, kernels="eager")).to(dtype)
    eager.load_state_dict(fused.state_dict())
    with torch.no_grad():  # RMSNorm weights start at 1: make them matter
        for model in (fused, eager):
            for name, p in model.named_parameters():
                if "norm" in name or name.startswith("ln_f"):
                    p.copy_(torch.linspace(0.5, 1.5, p.numel(), dtype=dtype))
    return fused, eager


def test_config_defaults_and_layout():
    c = GPTConfig(arch="llama", n_head=6, d_model=384)
    assert (c.pos_encoding, c.n_kv_head, c.d_hidden, c.rope_base) == ("rope", 6, 1024, 10000.0)
    assert llama_hidden(384) == 1024 and llama_hidden(512) == 1408 and llama_hidden(64) == 192
    gpt = GPTConfig()
    assert (gpt.arch, gpt.pos_encoding, gpt.n_kv_head, gpt.d_hidden) == ("gpt", "learned", 6, 4 * 384)
    model = GPT(GPTConfig(**TINY), device="meta")
    keys = set(model.state_dict())
    assert "lm_head.weight" in keys and model.lm_head.weight is not model.tok_emb.weight  # untied
    assert not any(k.endswith("bias") for k in keys) and not any(k.startswith(("pos_", "rotary")) for k in keys)
    assert model.blocks[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    assert model.blocks[0].mlp.gate_proj.weight.shape == (48, 32)


@pytest.mark.parametrize("seq_len", [1, 9])
def test_fused_matches_eager_loss_and_every_gradient_fp64(seq_len):
    fused, eager = _pair()
    idx, targets = torch.randint(0, 64, (2, seq_len)), torch.randint(0, 64, (2, seq_len))
    (logits_f, loss_f), (logits_e, loss_e) = fused(idx, targets), eager(idx, targets)
    torch.testing.assert_close(logits_f, logits_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-10, atol=1e-10)
    loss_f.backward()
    loss_e.backward()
    for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters()):
        # one token attends to itself alone: q and k get no gradient then
        assert seq_len == 1 or p_f.grad.abs().sum() > 0, name
        torch.testing.assert_close(p_f.grad, p_e.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_fused_matches_eager_fp32_and_bf16_autocast():
    fused, eager = _pair(torch.float32)
    idx, targets = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    for enabled, tol in ((False, 1e-5), (True, 3e-2)):
        for m in (fused, eager):
            m.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            loss_f, loss_e = fused(idx, targets)[1], eager(idx, targets)[1]
        loss_f.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_f, loss_e, rtol=tol, atol=tol)
        for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters()):
            scale = p_e.grad.abs().max()
            assert (p_f.grad - p_e.grad).abs().max() <= 10 * tol * scale + 1e-7, (name, enabled)


def test_fused_path_runs_every_residual_add_inside_the_norm_after_it(monkeypatch):
    """Each layer's two adds and the last one before ln_f go through add_rms_norm: 2 x n_layer calls, none left as
    a plain add of the residual stream, and the result is still eager's."""
    from fasttx.nn import normalization
    fused, eager = _pair()
    calls = []
    original = normalization.add_rms_norm
    monkeypatch.setattr(normalization, "add_rms_norm", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    loss_f, loss_e = fused(idx, targets)[1], eager(idx, targets)[1]
    assert calls == [torch.Size([2, 9, 32])] * (2 * TINY["n_layer"])
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-10, atol=1e-10)


def _hf_llama(model: GPT):
    """transformers' LlamaForCausalLM with model's weights."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
        rms_norm_eps=1e-5, rope_theta=c.rope_base, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).to(model.tok_emb.weight.dtype).eval()
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("tok_emb.", "model.embed_tokens.").replace("blocks.", "model.layers.")
        state[key.replace("ln_f.", "model.norm.")] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("kernels", ["fused", "eager"])
def test_equals_transformers_llama_with_copied_weights(kernels):
    # fp32: LlamaRMSNorm computes in fp32 whatever the input, so fp64 would compare fp32 rounding
    fused, eager = _pair(torch.float32, rope_base=500.0)
    model = fused if kernels == "fused" else eager
    hf = _hf_llama(model)
    idx = torch.randint(0, 64, (2, 24))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    with torch.no_grad():
        out = hf(input_ids=idx[:, :-1], labels=idx[:, :-1])
        # a wrong rope base, GQA grouping or rotate-half pairing moves the logits by far more than this
        assert (logits - out.logits).abs().max() <= 2e-6 * out.logits.abs().max() + 1e-7
    # transformers shifts the labels itself: its loss over the first 22 predictions
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), idx[:, 1:-1].flatten())
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                                 idx[:, 1:-1].flatten()), ref)


@pytest.mark.parametrize("kernels", ["fused", "eager"])
def test_generate_with_and_without_cache_gives_the_same_tokens(kernels):
    fused, eager = _pair(torch.float32)
    model = (fused if kernels == "fused" else eager).eval()
    prompt = torch.randint(0, 64, (2, 5))
    # 5 + 22 > block_size 24: the window slides after 19 cached steps
    for temperature in (0.0, 1.0):
        runs = [model.generate(prompt, 22, temperature=temperature, use_cache=use_cache,
                               generator=torch.Generator().manual_seed(1)) for use_cache in (True, False)]
        assert torch.equal(runs[0], runs[1]), temperature
    cache = KVCache(model, 2)
    assert cache.keys[0].shape == (2, 2, 24, 8)  # n_kv_head heads, not n_head
    # cached steps see the positions they are at: prompt then token by token = the whole sequence at once
    seq = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        cache = KVCache(model, 1)
        first = model._decode(seq[:, :7], cache)
        rest = [model._decode(seq[:, i:i + 1], cache) for i in range(7, 9)]
        chunk = model._decode(seq[:, 9:], cache)
        whole = model(seq)[0]
    torch.testing.assert_close(torch.cat([first, *rest, chunk], dim=1), whole, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class self if else".split()
    (folder / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    return ["--data", str(folder / "text.txt"), "--cache-dir", str(folder / "cache")]


FLAGS = ["--n-layer", "2", "--d-model", "32", "--n-head", "4", "--block-size", "32", "--threads", "1", "--device",
         "cpu", "--eval-batches", "1", "--eval-every", "0", "--warmup", "1", "--batch-size", "2"]


def test_cli_train_llama_then_generate(corpus, tmp_path, capsys):
    out = tmp_path / "llama"
    assert cli(["train", "--arch", "llama", "--n-kv-head", "2", "--steps", "3", "--out", str(out),
                "--save-safetensors", *FLAGS, *corpus]) == 0
    saved = ckpt_io.load_checkpoint(out / "ckpt.pt")
    assert saved["model_config"]["arch"] == "llama" and saved["model_config"]["n_kv_head"] == 2
    assert saved["model_config"]["d_hidden"] == 128  # llama_hidden(32)
    capsys.readouterr()
    for ckpt in ("ckpt.pt", "model.safetensors"):
        for cache in ([], ["--no-cache"]):
            assert cli(["generate", "--ckpt", str(out / ckpt), "--prompt", "the ", "--max-new-tokens", "40",
                        "--temperature", "0", *cache]) == 0
    texts = capsys.readouterr().out.splitlines()
    assert len(texts) == 4 and len(set(texts)) == 1 and texts[0].startswith("the "), texts
    # the untied head is stored in the safetensors file, and loads as it was
    a, b = load_model(out / "ckpt.pt"), load_model(out / "model.safetensors")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, a.tok_emb.weight)
    # resume without model flags takes the checkpoint's llama config
    assert cli(["train", "--resume", "--steps", "4", "--out", str(out), "--threads", "1", "--device", "cpu",
                "--eval-batches", "1", "--eval-every", "0", "--warmup", "1", "--batch-size", "2", *corpus]) == 0
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["step"] == 4


def test_checkpoints_without_the_new_config_keys_still_load(corpus, tmp_path, capsys):
    out = tmp_path / "gpt"
    assert cli(["train", "--steps", "1", "--out", str(out), *FLAGS, *corpus]) == 0
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["model_config"]["arch"] == "gpt"
    old_config = {k: v for k, v in state["model_config"].items() if k not in ("arch", "n_kv_head", "d_hidden",
                                                                             "rope_base")}
    old = {**state, "model_config": old_config}
    old["sha256"] = ckpt_io.state_digest(old)
    torch.save(old, tmp_path / "old.pt")
    assert ckpt_io.load_checkpoint(tmp_path / "old.pt")["model_config"] == state["model_config"]
    model = load_model(tmp_path / "old.pt")
    assert model.lm_head.weight is model.tok_emb.weight
    assert cli(["generate", "--ckpt", str(tmp_path / "old.pt"), "--max-new-tokens", "3"]) == 0
    # and a run resumes from one, with or without the model flags
    torch.save(old, out / "ckpt.pt")
    assert cli(["train", "--resume", "--steps", "2", "--out", str(out), *FLAGS, *corpus]) == 0
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_checkpoint_config_must_match_the_llama_tensors(tmp_path):
    model = GPT(GPTConfig(**TINY))
    for change, match in (({"d_hidden": 64}, r"d_hidden 64 but the tensors give 48"),
                          ({"n_kv_head": 4}, r"k_proj\.weight"),
                          ({"arch": "gpt", "n_kv_head": None, "pos_encoding": None}, r"missing|unexpected"),
                          ({"block_size": 70000}, r"over the 65536 allowed for rope")):
        config = GPTConfig.from_dict({**model.config.to_dict(), **change})
        with pytest.raises(ckpt_io.CheckpointError, match=match):
            ckpt_io.check_state_fits_config(model.state_dict(), config, tmp_path / "x.pt")


@pytest.mark.parametrize("change, match", [
    ({"n_kv_head": 3}, r"n_head \(4\) must be a multiple of n_kv_head \(3\)"),
    ({"d_model": 36, "n_head": 4}, r"even head dim .* d_model 36 / n_head 4 = 9"),
    ({"pos_encoding": "learned"}, r"arch 'llama' takes pos_encoding 'rope'"),
    ({"arch": "gpt", "pos_encoding": "rope"}, r"pos_encoding 'rope' needs arch 'llama'"),
    ({"arch": "gpt"}, r"arch 'gpt' has as many key/value heads .* n_kv_head 2"),
    ({"arch": "mamba"}, r"arch must be one of"),
    ({"rope_base": float("nan")}, r"rope_base must be a finite number > 1"),
    ({"d_hidden": 0}, r"d_hidden must be a positive int"),
    ({"dropout": 0.1}, r"arch 'llama' has no dropout"),
])
def test_bad_config_values_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **change})


def test_cli_refuses_a_bad_llama_config_in_one_line(corpus, tmp_path, capsys):
    assert cli(["train", "--arch", "llama", "--n-kv-head", "3", "--steps", "1", "--out", str(tmp_path / "bad"),
                *FLAGS, *corpus]) == 2
    err = capsys.readouterr().err
    assert "n_head (4) must be a multiple of n_kv_head (3)" in err and err.count("\n") == 1, err


def test_compare_command_takes_the_llama_arch_and_a_compiled_provider(corpus, tmp_path, capsys, monkeypatch):
    # a tiny run of `python -m fasttx compare --arch llama --compile`
    data = corpus[corpus.index("--data") + 1]
    monkeypatch.setenv("FASTTX_CACHE", corpus[corpus.index("--cache-dir") + 1])
    assert cli(["compare", "--arch", "llama", "--n-kv-head", "2", "--steps", "3", "--warmup-steps", "1",
                "--n-layer", "1", "--d-model", "32", "--n-head", "4", "--block-size", "16", "--batch-size", "2",
                "--device", "cpu", "--data", data, "--out", str(tmp_path), "--compile"]) == 0
    printed = capsys.readouterr().out
    assert "model: arch llama" in printed and "4 heads (2 key/value)" in printed, printed
    assert "| torch.compile |" in printed and "torch.compile: fused" in printed, printed
    saved = json.loads((tmp_path / "compare_llama_fp32.json").read_text())
    assert saved["config"]["arch"] == "llama" and saved["config"]["n_kv_head"] == 2
    assert saved["criteria"]["loss"]["pass"], saved["criteria"]
    compiled, eager = saved["providers"]["torch.compile"], saved["providers"]["eager"]
    assert len(compiled["step_times_s"]) == 3 and compiled["step_peak_bytes"] > 0
    # the same model and batches: the compiled eager model trains as the eager one does
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert saved["criteria"]["compile"]["value"] == pytest.approx(saved["speedup_vs_compile"]["median"])
