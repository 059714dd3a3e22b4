"""Loading the base model, its tokenizer and a trained LoRA adapter: one path for predict, train and export."""

from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

Quantization = Literal["none", "8bit", "4bit"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 halves memory and doubles matmul speed on GPUs; CPUs here have no fast bf16, so fp32.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no Hugging Face model here (config.json missing). "
            "Run `make weights` for the default model, or convert_weights.py for your own."
        )
    return path


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(path))
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    quantization: Quantization = "none",
):
    """A causal LM in eval mode on `device` (default: CUDA if present, else CPU)."""
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
    return model.eval()


def apply_adapter(model, adapter_dir: str | Path, merge: bool = True):
    """Base model plus a PEFT LoRA adapter: merged into the weights (faster decoding) or kept apart."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return (model.merge_and_unload() if merge else model).eval()
