"""fasttx.models.GPT: fused and eager compute the same function from the same parameters, and KV-cache
decoding gives the tokens of full recomputation."""
import pytest
import torch

from fasttx.models import GPT, GPTConfig
from fasttx.models.gpt import sinusoidal_positions

TINY = dict(n_layer=2, n_head=4, d_model=64, block_size=32)


def _pair(dtype=torch.float64, **overrides):
    """A fused model and an eager one holding the same parameters."""
    torch.manual_seed(0)
    fused = GPT(GPTConfig(**{**TINY, **overrides}, kernels="fused")).to(dtype)
    eager = GPT(GPTConfig(**{**TINY, **overrides}, kernels="eager")).to(dtype)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_fused_matches_eager_logits_loss_and_every_gradient(pos_encoding, seq_len):
    fused, eager = _pair(pos_encoding=pos_encoding)
    idx = torch.randint(0, 256, (3, seq_len))
    targets = torch.randint(0, 256, (3, seq_len))
    (logits_f, loss_f), (logits_e, loss_e) = fused(idx, targets), eager(idx, targets)
    torch.testing.assert_close(logits_f, logits_e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-10, atol=1e-10)
    loss_f.backward()
    loss_e.backward()
    for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_f.grad, p_e.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_fp32_and_bf16_autocast_agree_with_eager():
    fused, eager = _pair(torch.float32)
    idx = torch.randint(0, 256, (2, 32))
    for enabled, tol in ((False, 1e-5), (True, 2e-2)):
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            loss_f, loss_e = fused(idx, idx)[1], eager(idx, idx)[1]
        assert abs(loss_f.item() - loss_e.item()) <= tol * loss_e.item()


def test_one_checkpoint_serves_both_and_the_head_is_tied():
    fused, eager = _pair()
    assert fused.lm_head.weight is fused.tok_emb.weight
    assert list(fused.state_dict()) == list(eager.state_dict())
    # The sinusoidal table is a formula, not state: both encodings keep the same keys but pos_emb.
    sin_keys = set(GPT(GPTConfig(**TINY, pos_encoding="sinusoidal")).state_dict())
    assert set(fused.state_dict()) - sin_keys == {"pos_emb.weight"}
    n_embedding = 256 * 64
    assert fused.num_parameters() == sum(p.numel() for p in fused.state_dict().values()) - n_embedding


def test_sinusoidal_table_is_the_original_formula():
    table = sinusoidal_positions(50, 8)
    pos, i = 13, 2
    assert table[pos, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (2 * i / 8))).item())
    assert table[pos, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * i / 8))).item())


@pytest.mark.parametrize("kernels", ["fused", "eager"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20)])
def test_kv_cache_gives_the_tokens_of_full_recomputation(kernels, sampling):
    fused, eager = _pair()
    model = (fused if kernels == "fused" else eager).eval()
    prompt = torch.randint(0, 256, (2, 5))
    # 40 new tokens pass block_size 32, so the window slides too.
    with_cache = model.generate(prompt, 40, use_cache=True, generator=torch.Generator().manual_seed(3), **sampling)
    without = model.generate(prompt, 40, use_cache=False, generator=torch.Generator().manual_seed(3), **sampling)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)


def test_cached_logits_equal_full_forward_logits():
    fused, _ = _pair()
    fused.eval()
    from fasttx.models.gpt import KVCache
    idx = torch.randint(0, 256, (2, 20))
    full = fused(idx)[0]
    cache = KVCache(fused, 2)
    parts = [fused._decode(idx[:, :8], cache), fused._decode(idx[:, 8:13], cache)]  # a chunk after a prefill
    parts += [fused._decode(idx[:, t:t + 1], cache) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_top_k_one_is_greedy():
    fused, _ = _pair()
    prompt = torch.randint(0, 256, (1, 4))
    greedy = fused.eval().generate(prompt, 10, temperature=0.0)
    top1 = fused.generate(prompt, 10, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("field, value", [("n_layer", 0), ("d_model", 66), ("dropout", 1.0),
                                          ("pos_encoding", "rope"), ("kernels", "triton"), ("vocab_size", 2.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, field: value})


def test_config_round_trips_and_rejects_unknown_fields():
    config = GPTConfig(**TINY, pos_encoding="sinusoidal")
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields.*n_embd"):
        GPTConfig.from_dict({**config.to_dict(), "n_embd": 64})


def test_bad_inputs_name_what_was_expected():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="exceed block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, top_k=0)
    with pytest.raises(ValueError, match="seq_len >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
