"""Loading the base model, its tokenizer and a trained LoRA adapter: one path for predict, train and export."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .archive import carries_tokenizer

Quantization = Literal["none", "8bit", "4bit"]


class _NoKernelsPackageNotice(logging.Filter):
    """Drops the one warning bitsandbytes logs at import on CPUs with AVX512-BF16 when the optional `kernels`
    package is absent: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'".
    `kernels` would download that kernel from the Hugging Face hub at run time, which offline containers cannot;
    bitsandbytes then uses its own (bundled) CPU kernel, so nothing is missing. Every other message passes,
    this one too when `kernels` is installed and fails for another reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (
            str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
            and isinstance(exc, ModuleNotFoundError)
            and exc.name == "kernels"
        )


# Before anything imports peft (which imports bitsandbytes): every entry point imports this module first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsPackageNotice())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 halves memory and doubles matmul speed on GPUs. CPUs get fp32: only some have fast bf16 (AVX512-BF16, AMX),
    # and fp32 keeps a CPU's results close to any other's, AVX2 or AVX512.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then multiplies bf16 matrices natively (about 3x fp32's speed on an AVX512-BF16
    EPYC); without them bf16 is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def training_dtype(device: str, precision: Precision, whole_modules: bool = False) -> torch.dtype:
    """The dtype of the frozen base weights in training (LoRA parameters and optimizer state stay fp32: PEFT keeps
    adapter weights in fp32 over a bf16 base). auto: bf16 on GPUs and on CPUs with native bf16, else fp32.

    whole_modules (modules_to_save): PEFT copies those in the base's dtype, and on a CPU (no autocast) they would
    train in bf16, whose 8-bit mantissa loses small updates: auto stays fp32 there, and bf16 is refused."""
    cpu = device == "cpu"
    if precision == "auto":
        native = device.startswith("cuda") or (cpu and cpu_has_native_bf16() and not whole_modules)
        return torch.bfloat16 if native else torch.float32
    if precision == "bf16" and cpu and whole_modules:
        raise ValueError("precision: bf16 would train modules_to_save's whole copies in bf16 on a CPU; use auto or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no Hugging Face model here (config.json missing). "
            "Run `make weights` for the default model, or convert_weights.py for your own."
        )
    return path


def tokenizer_source(path: str | Path, adapters: Sequence[Path] = ()) -> Path:
    """Where the tokenizer comes from: the last of `adapters` that carries one (training with an extended vocabulary
    puts it in the archive), else `path`."""
    return next((Path(a) for a in reversed(adapters) if carries_tokenizer(a)), Path(path))


def load_tokenizer(path: str | Path, adapters: Sequence[Path] = ()):
    """The tokenizer of a model or tokenizer folder, or of the last of `adapters` that carries one."""
    path = tokenizer_source(path, adapters)
    tokenizer = AutoTokenizer.from_pretrained(path if carries_tokenizer(path) else check_model_dir(path))
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cpu_packable(layer) -> bool:
    """Whether bitsandbytes can repack this Linear4bit for its AVX512-BF16 CPU inference kernel.

    bitsandbytes 0.50 (nn/modules.py, Linear4bit.forward) repacks a 4-bit weight the first time the layer
    runs on a CPU with AVX512-BF16, in eval mode, on an input that does not require grad; the repacking
    (functional.py, _convert_weight_packed_for_cpu) takes out_features in blocks of 32 and reshapes the
    quantization scales to (out_features, in_features // blocksize): whole blocks per row only.
    """
    return layer.in_features % layer.weight.blocksize == 0 and layer.out_features % 32 == 0


def keep_4bit_unpacked(model, only_unpackable: bool = False) -> int:
    """Keep bitsandbytes from repacking 4-bit layers for its CPU inference kernel: all of them, or those it cannot
    repack (which would fail with a reshape error). They then run the kernel CPUs without AVX512-BF16 always run
    (dequantize, then matmul), which autograd differentiates through. Returns how many layers were changed."""
    changed = 0
    for layer in model.modules():
        if getattr(layer, "support_avx512bf16_for_cpu", False) and not (only_unpackable and cpu_packable(layer)):
            layer.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_model(
    path: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantization: Quantization = "none",
    training: bool = False,
):
    """A causal LM in eval mode on `device` (default: CUDA if present, else CPU).

    4-bit on a CPU with AVX512-BF16: for inference, the layers bitsandbytes can repack use its packed bf16
    kernel and the others fall back to the plain one; for `training`, none is ever repacked, because the packed
    kernel has no backward (after a validation pass in eval mode, training would lose its gradients silently).
    """
    path = check_model_dir(path)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    kwargs: dict = dict(dtype=dtype)
    if quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit",
            load_in_4bit=quantization == "4bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "none":
        model.to(device)
    if quantization == "4bit":
        keep_4bit_unpacked(model, only_unpackable=not training)
    return model.eval()


def fit_vocabulary(model, rows: int, mean_resizing: bool) -> bool:
    """Grow the embeddings and output layer (one matrix when tied) to `rows` tokens, the old rows unchanged; whether
    they grew. mean_resizing: new rows drawn around the old ones' mean (transformers' default), else left random."""
    if rows <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(rows, mean_resizing=mean_resizing)
    return True


def adapter_vocab_size(adapter_dir: str | Path) -> int | None:
    """The vocabulary of the whole embedding or output layer an adapter carries (modules_to_save), read from the
    safetensors header; None when it carries neither."""
    from safetensors import safe_open

    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    return max(rows, default=None)


def apply_adapter(model, adapter_dir: str | Path, merge: bool = True):
    """Base model plus a PEFT LoRA adapter: merged into the weights (faster decoding) or kept apart. An adapter with
    whole embeddings for a larger vocabulary first grows the base's to fit (its copies then replace every row)."""
    from peft import PeftModel

    fit_vocabulary(model, adapter_vocab_size(adapter_dir) or 0, mean_resizing=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return (model.merge_and_unload() if merge else model).eval()


def apply_adapters(model, adapter_dirs: Sequence[str | Path], merge: bool = True):
    """Adapters applied in order, each merged before the next, as Chinese-LLaMA-Alpaca's merge_llama_with_chinese_lora.py
    does: LoRA deltas add up (their order does not matter), whole module copies (modules_to_save) replace the module,
    so a later copy wins over an earlier one. merge=False keeps the last one apart."""
    for i, folder in enumerate(adapter_dirs):
        model = apply_adapter(model, folder, merge=merge or i < len(adapter_dirs) - 1)
    return model
