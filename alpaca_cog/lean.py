"""Training layers that keep less for backward: the values of transformers' and PEFT's, fewer saved tensors.

Over a bf16 base on a CPU, LLaMA's RMSNorm keeps two fp32 copies of its input, PEFT's LoRA keeps an fp32 copy
of its input after dropout, and the MLP keeps SiLU(gate) beside gate and up: half of what a training step holds
for backward (SmolLM2, micro-batch 4). These keep the bf16 inputs (and a per-token fp32 scale, a dropout mask)
and recompute the rest in backward, which costs a few elementwise passes and no matmul. Attention computes in
fp32 (faster on CPUs) and keeps bf16.
"""

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraConfig
from peft.tuners.lora import layer as lora_layer
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm's forward (normalised in fp32, rounded to the input's dtype, times the weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_f = x.float()
        rstd = torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x_f * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class _SiLUMul(torch.autograd.Function):
    """SiLU(gate) * up, keeping gate and up only: SiLU(gate) is recomputed, and the gradients are autograd's own
    (its fused silu_backward kernel: 1.2 ms against 5.1 for the same values in eight passes, 965x1536 bf16)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class _LoRA(torch.autograd.Function):
    """(x * keep / (1 - p)) @ A.T @ B.T * scaling in A's dtype (fp32), keeping x as it came (bf16) and the keep mask.
    The scalars multiply the rank-r products, the narrowest tensors."""

    @staticmethod
    def forward(ctx, x, a, b, scaling: float, keep: torch.Tensor | None, p: float) -> torch.Tensor:
        down = F.linear(_masked(x.to(a.dtype), keep), a) / (1 - p)  # as PEFT's lora_A(dropout(x))
        ctx.save_for_backward(x, a, b, down, keep)
        ctx.scaling, ctx.p = scaling, p
        return F.linear(down * scaling, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, down, keep = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_masked = (grad @ b) * (ctx.scaling / (1 - ctx.p))  # the gradient of x * keep: both scalars at once
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _masked(grad_masked @ a, keep).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = grad_masked.reshape(-1, a.shape[0]).T @ _masked(x.to(a.dtype), keep).reshape(-1, a.shape[1])
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, b.shape[0]).T @ (down * ctx.scaling).reshape(-1, b.shape[1])
        return grad_x, grad_a, grad_b, None, None, None


class _CausalAttention(torch.autograd.Function):
    """Causal attention computed by the CPU flash kernels in fp32 (whose backward is 1.3-1.9x faster than bf16's on
    an AVX512-BF16 EPYC, for 180-300 tokens), keeping q, k, v and the output in their own dtype. GQA: k and v may
    have fewer heads than q."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(), 0.0, True, scale=scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, True, scale=ctx.scale)  # fmt: skip
        return *(g.to(x.dtype) for g, x in zip(grads, (q, k, v))), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for (batch, heads, positions, head size) CPU tensors, as _CausalAttention."""
    return _CausalAttention.apply(q, k, v, scale)


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A dropout mask keeping each element with probability 1 - p' (p' = p to 1/65536, returned with it): 16-bit
    lanes of random 64-bit words, a quarter of bernoulli_'s draws (0.8 ms against 2.8 for 965x576, 2-core EPYC)."""
    dropped, size = round(p * 65536), shape.numel()
    words = torch.empty((size + 3) // 4, dtype=torch.int64, device=device).random_(torch.iinfo(torch.int64).min, None)
    return words.view(torch.int16)[:size].view(shape) >= dropped - 32768, dropped / 65536


class RMSNorm(torch.nn.Module):
    """LlamaRMSNorm's weight and eps, computed by _RMSNorm."""

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


class SwiGLU(torch.nn.Module):
    """LlamaMLP's three projections (same names, so LoRA targets and checkpoints see no difference), with _SiLUMul."""

    def __init__(self, mlp: LlamaMLP):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


class LoraLinear(lora_layer.Linear):
    """PEFT's LoRA Linear, its plain training case (one adapter, not merged, no variant) computed by _LoRA."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if (not torch.is_grad_enabled() or args or kwargs or self.disable_adapters or self.merged
                or adapter not in self.lora_A or adapter in self.lora_variant or self.lora_B[adapter].bias is not None):  # fmt: skip
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        keep, p = _keep_mask(x.shape, p, x.device) if p else (None, 0.0)
        result = self.base_layer(x)
        return (result + _LoRA.apply(x, a, b, self.scaling[adapter], keep, p)).to(result.dtype)


def use_lean_layers(model, lora: LoraConfig) -> int:
    """Swap `model`'s LlamaRMSNorm and LlamaMLP (SiLU) modules for the ones above, in place, and have PEFT build
    `lora`'s layers on plain Linear modules as LoraLinear above; the number of modules swapped. Parameters and
    their names do not change. Before get_peft_model, on an unquantized model."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is LlamaRMSNorm:
            model.set_submodule(name, RMSNorm(module))
        elif type(module) is LlamaMLP and module.config.hidden_act == "silu":
            model.set_submodule(name, SwiGLU(module))
        else:
            continue
        swapped += 1
    lora._register_custom_module({torch.nn.Linear: LoraLinear})
    return swapped
