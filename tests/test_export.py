"""Exports that must load elsewhere: GGUF in llama.cpp, merged models in transformers."""

import itertools
import tarfile

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alpaca_cog import convert
from alpaca_cog.generate import GenerationParams, stream
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
from alpaca_cog.prompts import encode_prompt
from conftest import train_defaults


@pytest.fixture(scope="module")
def smollm2_f16_gguf(weights_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    return convert.export_gguf(weights_dir, path, outtype="f16", pre_tokenizer="smollm")


def test_gguf_f16_in_llama_cpp_continues_like_transformers(smollm2_f16_gguf, weights_dir):
    import llama_cpp

    tokenizer = load_tokenizer(weights_dir)
    prompt_ids = encode_prompt(tokenizer, "alpaca", "Tell me about alpacas.")
    stats: dict = {}
    expected = "".join(stream(load_model(weights_dir, device="cpu"), tokenizer, prompt_ids, GenerationParams(temperature=0, max_tokens=20), stats))
    assert stats["output_tokens"] == 20
    llm = llama_cpp.Llama(model_path=str(smollm2_f16_gguf), n_ctx=256, verbose=False)
    # llama.cpp's own tokenizer reads the exported vocabulary exactly as transformers does
    assert llm.tokenize(tokenizer.decode(prompt_ids).encode(), add_bos=False, special=True) == prompt_ids
    tokens = list(itertools.islice(llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0), 20))
    assert tokenizer.decode(tokens) == expected


def test_gguf_reads_back_into_transformers(smollm2_f16_gguf, weights_dir):
    original = load_model(weights_dir, device="cpu")
    back, _ = convert.load_gguf(smollm2_f16_gguf)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, original(ids).logits, rtol=0, atol=0.1)  # f16 rounding


def test_gguf_q8_0_loads_in_llama_cpp(weights_dir, tmp_path):
    import llama_cpp

    path = convert.export_gguf(weights_dir, tmp_path / "q8.gguf", outtype="q8_0", pre_tokenizer="smollm")
    assert path.stat().st_size < 0.6 * 2 * 134_515_008  # about 8.5 bits a weight, not 16
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    text = llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert "Paris" in text


def _adapter_archive(base_dir, tmp_path):
    """A LoRA adapter with non-zero weights, packed as train.py packs it."""
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "adapter")
    with tarfile.open(tmp_path / "weights.tar", "w") as tar:
        for f in (tmp_path / "adapter").iterdir():
            tar.add(f, arcname=f.name)
    return tmp_path / "weights.tar"


def test_merged_export_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    archive = _adapter_archive(tiny_model_dir, tmp_path)
    out = convert.export_hf(tiny_model_dir, tmp_path / "merged", adapter=str(archive))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    unmerged = apply_adapter(load_model(tiny_model_dir, device="cpu"), tmp_path / "adapter", merge=False)
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_adapter_trained_on_4bit_base_merges_into_full_precision(tiny_model_dir, tmp_path):
    from alpaca_cog.finetune import finetune
    from conftest import FIXTURES

    archive = finetune(**train_defaults(train_data=FIXTURES / "gsm8k_64.json", max_steps=1, batch_size=4, val_set_size=0,
                                        quantization="4bit", checkpoint_steps=0),
                       base_weights=tiny_model_dir, output_path=tmp_path / "q.tar", checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    out = convert.export_hf(tiny_model_dir, tmp_path / "merged", adapter=str(archive))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
