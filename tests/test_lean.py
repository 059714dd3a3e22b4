"""lean's training layers compute what transformers' and PEFT's compute, values and gradients, and keep less for backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from alpaca_cog.data import pack
from alpaca_cog.finetune import loss_sum
from alpaca_cog.lean import _LoRA, causal_attention, use_lean_layers
from conftest import tiny_llama


def lora_model(lean: bool, dtype: torch.dtype, dropout: float = 0.0):
    """tiny_llama in `dtype` with LoRA on q, v and the MLP's gate (B != 0), its norms trained too."""
    model = tiny_llama().to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    if lean:
        assert use_lean_layers(model, config) == 2 * 3 + 1  # each layer's two norms and MLP, the final norm
    torch.manual_seed(0)  # the same LoRA weights for both
    model = get_peft_model(model, config).train()
    for name, p in model.named_parameters():
        p.requires_grad_(p.requires_grad or "norm" in name)
    return model


def packed_batch() -> dict:
    ids = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 13)]
    return pack([dict(input_ids=i, labels=i) for i in ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layers_give_stock_loss_and_gradients(dtype):
    """RMSNorm (its weight's gradient too), SwiGLU and LoRA over a bf16 or fp32 base: PEFT's and transformers' values."""
    batch = packed_batch()
    results = []
    for lean in (False, True):
        model = lora_model(lean, dtype)
        loss = loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (stock_loss, stock_grads), (lean_loss, lean_grads) = results
    assert stock_grads.keys() == lean_grads.keys() and len(stock_grads) == 2 * 3 * 2 + 2 * 2 + 1  # LoRA A, B; norms
    # Equal here (AVX512-BF16 EPYC); other CPUs' kernels may round the LoRA products differently.
    torch.testing.assert_close(lean_loss, stock_loss, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=0)
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(lean_grads[name], grad, **tolerance, msg=lambda m: f"{name}: {m}")


def test_lora_with_dropout_equals_autograd_of_the_same_mask():
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    keep = torch.rand(2, 7, 16) > 0.3
    lean = _LoRA.apply(x, a, b, 2.0, keep, 0.3)
    reference = (x.float() * keep / 0.7) @ a.T @ b.T * 2.0
    torch.testing.assert_close(lean, reference)
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (x, a, b), grad)
    for got, want in zip(torch.autograd.grad(lean, (x, a, b), grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_lora_dropout_drops_a_fraction_p_and_scales_the_rest():
    """A LoRA that is the identity (A = B = I, scaling 1) over a zero base layer returns dropout(x) itself."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    torch.nn.init.zeros_(model[0].weight)
    config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.25, target_modules=["0"])
    use_lean_layers(model, config)
    model = get_peft_model(model, config).train()
    with torch.no_grad():
        model.base_model.model[0].lora_A["default"].weight.copy_(torch.eye(8))
        model.base_model.model[0].lora_B["default"].weight.copy_(torch.eye(8))
    x = torch.rand(4000, 8) + 1
    ratio = model(x) / x
    kept = ratio > 0
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / 0.75))
    assert all(abs((~kept).flatten()[lane::4].float().mean().item() - 0.25) < 0.02 for lane in range(4))  # each 16 bits of a draw
    torch.testing.assert_close(model.eval()(x), x)  # no dropout in eval mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_equals_sdpa_with_grouped_heads(dtype):
    q = torch.randn(1, 6, 11, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 11, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    out = causal_attention(q, k, v, 0.3)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True, scale=0.3)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference, **tolerance)
    grad = torch.randn_like(reference)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)), torch.autograd.grad(reference, (q, k, v), grad), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), **tolerance)


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward."""
    parameters = {p.data_ptr() for p in model.parameters()}
    kept = {}

    def keep(t):
        if t.data_ptr() not in parameters:
            kept[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_sum(model, batch)
    return sum(kept.values())


def test_lean_layers_keep_less_for_backward():
    batch = packed_batch()
    stock, lean = (saved_activation_bytes(lora_model(lean, torch.bfloat16, dropout=0.05), batch) for lean in (False, True))
    assert lean < 0.6 * stock, (lean, stock)
