"""The LLaMA decoder against HF transformers' LlamaForCausalLM: parameter count, logits, gradients, causality.

python -m pytest -q tests/test_model.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lrpilot.config import ModelConfig, load_config
from lrpilot.model import LLaMA, RMSNorm, _RMSNorm, apply_rope, hf_config, hf_state_dict, load_hf_state_dict, rope_cache

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")


def smoke_model_config(**kw) -> ModelConfig:
    return dataclasses.replace(load_config("cpu-smoke").model, **kw)


def hf_twin(model: LLaMA) -> torch.nn.Module:
    """HF LlamaForCausalLM with the same config and this model's weights (the slow, obvious reference)."""
    hf = transformers.LlamaForCausalLM(hf_config(model.cfg))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf


def test_llama_60m_has_exactly_hf_parameter_count():
    cfg = load_config("llama_60m").model
    with torch.device("meta"):
        ours = LLaMA(cfg)
        theirs = transformers.LlamaForCausalLM(hf_config(cfg))
    n_hf = sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == n_hf == 58_073_600
    assert theirs.config.tie_word_embeddings is False
    # the same tensors under HF's names: nothing missing, nothing extra
    shapes = {k: tuple(v.shape) for k, v in hf_state_dict(ours).items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("rope_theta", [10000.0, 500.0])
def test_logits_and_loss_match_hf_llama(rope_theta):
    torch.manual_seed(0)
    model = LLaMA(smoke_model_config(rope_theta=rope_theta)).eval()
    hf = hf_twin(model).eval()
    idx = torch.randint(0, 256, (3, 48))
    targets = torch.randint(0, 256, (3, 48))
    logits, loss = model(idx, targets)
    ref = hf(input_ids=idx).logits
    assert logits.shape == (3, 48, 256)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # HF's own shifted-label loss on the same tokens
    ours_shifted = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(ours_shifted, hf(input_ids=idx, labels=idx).loss, atol=1e-5, rtol=1e-5)


def test_gradients_match_hf_llama():
    torch.manual_seed(1)
    model = LLaMA(smoke_model_config())
    hf = hf_twin(model)
    idx, targets = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    model(idx, targets)[1].backward()
    logits = hf(input_ids=idx).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    ours = hf_state_dict_grads(model)
    theirs = {k: p.grad for k, p in hf.named_parameters()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-4, msg=k)


def hf_state_dict_grads(model: LLaMA) -> dict[str, torch.Tensor]:
    """Our gradients under HF names, by mapping a state dict made of .grad tensors."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    out = {k: v.clone() for k, v in hf_state_dict(model).items()}
    model.load_state_dict(saved)
    return out


def test_hf_weights_load_back():
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(hf_config(smoke_model_config()))
    model = LLaMA(smoke_model_config())
    load_hf_state_dict(model, hf.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(idx)[0], hf(input_ids=idx).logits, atol=1e-5, rtol=1e-5)


def test_causal_a_future_token_does_not_change_earlier_logits():
    torch.manual_seed(3)
    model = LLaMA(smoke_model_config()).eval()
    idx = torch.randint(0, 256, (2, 40))
    changed = idx.clone()
    changed[:, 25] = (changed[:, 25] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25], atol=0, rtol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_rope_matches_rotate_half_reference_and_its_gradient():
    head_dim, T = 16, 12
    cos, sin = rope_cache(head_dim, T, 10000.0)
    x = torch.randn(2, T, 3, head_dim, dtype=torch.float64, requires_grad=True)
    c, s = cos[:, None].double(), sin[:, None].double()
    half = head_dim // 2
    ref = x * torch.cat([c, c], -1) + torch.cat([-x[..., half:], x[..., :half]], -1) * torch.cat([s, s], -1)
    torch.testing.assert_close(apply_rope(x, c, s), ref)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, c, s), (x,))


def test_rmsnorm_matches_the_composite_formula_and_its_gradient():
    norm = RMSNorm(8, 1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    ref = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref)
    w = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))  # d/dx and d/dweight
    # bf16 input: statistics in fp32, output promoted by the fp32 weight, gradient back in bf16 (as HF)
    xb = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    y = RMSNorm(8, 1e-6)(xb)
    y.sum().backward()
    assert y.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16


def test_init_is_normal_with_initializer_range_and_unit_norms():
    torch.manual_seed(4)
    cfg = load_config("cpu-small").model
    model = LLaMA(cfg)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert abs(p.std().item() - cfg.initializer_range) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied
    assert all("bias" not in n for n, _ in model.named_parameters())
    assert not any(k.startswith("rope") for k in model.state_dict())  # derived buffers stay out of checkpoints


def test_logits_shape_loss_and_sequence_limit():
    model = LLaMA(smoke_model_config())
    idx = torch.randint(0, 256, (4, 64))
    logits, loss = model(idx)
    assert logits.shape == (4, 64, 256) and loss is None
    _, loss = model(idx, idx)
    assert loss.ndim == 0 and 4.5 < loss.item() < 6.5  # ~ln(256) at init
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bf16_autocast_forward_and_backward_run():
    model = LLaMA(smoke_model_config())
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
