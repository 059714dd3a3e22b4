"""convert_weights.py: Meta checkpoints to Hugging Face (checked against Meta's own forward pass on the
shards), HF to Meta and back bit for bit, and clear errors with no output left behind."""

import json
import re
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_cog import convert
from conftest import ROOT
from meta_llama import make_checkpoint, meta_forward, train_tokenizer

TEXT = "Give three tips for staying healthy. Ünïcode 東京 123"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("spm") / "tokenizer.model")


def checkpoint(tmp_path, tokenizer_file, **kwargs):
    root = make_checkpoint(tmp_path / "meta", tokenizer=False, **kwargs)
    (root / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "convert_weights.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "shards, n_kv_heads, ffn_dim_multiplier",
    [(1, None, None), (2, None, None), (1, 2, 1.3), (2, 2, None)],
    ids=["1-shard-MHA", "2-shards-MHA", "1-shard-GQA", "2-shards-GQA"],
)
def test_converted_logits_equal_metas_forward_on_the_shards(tmp_path, tokenizer_file, shards, n_kv_heads, ffn_dim_multiplier):
    size = {1: "7B", 2: "13B"}[shards]  # Meta's shard counts for those sizes
    root = checkpoint(tmp_path, tokenizer_file, size=size, shards=shards, n_kv_heads=n_kv_heads, ffn_dim_multiplier=ffn_dim_multiplier)
    result = run_cli("--input_dir", root, "--model_size", size, "--output_dir", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # no extra arguments needed
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(ids).logits
    reference = meta_forward(root / size, ids)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    assert ids[0].tolist() == [sp.bos_id()] + sp.encode(TEXT)
    assert model.config.num_key_value_heads == (n_kv_heads or 4)


def test_meta_hf_meta_hf_round_trip_is_bit_identical(tmp_path, tokenizer_file):
    root = checkpoint(tmp_path, tokenizer_file, n_kv_heads=2, dtype=torch.bfloat16)
    first = convert.meta_to_hf(root, "7B", tmp_path / "hf1")
    convert.export_meta(first, tmp_path / "meta2")
    original = torch.load(root / "7B" / "consolidated.00.pth", weights_only=True)
    exported = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((tmp_path / "meta2" / "params.json").read_text())["n_kv_heads"] == 2
    second = convert.meta_to_hf(tmp_path / "meta2", "", tmp_path / "hf2")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_large_models_are_written_in_indexed_shards(tmp_path, tokenizer_file):
    root = checkpoint(tmp_path, tokenizer_file, n_layers=3)
    out = convert.meta_to_hf(root, "7B", tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    AutoModelForCausalLM.from_pretrained(out)


def _break(root, what):
    size = root / "7B"
    if what == "params_missing":
        (size / "params.json").unlink()
    elif what == "params_malformed":
        (size / "params.json").write_text('{"dim": 64,\n "n_layers": }')
    elif what == "params_bad_value":
        (size / "params.json").write_text(json.dumps({"dim": 64, "n_layers": "two", "n_heads": 4}))
    elif what == "shard_count":
        (size / "consolidated.00.pth").rename(size / "consolidated.01.pth")
        (root / "7B").rename(root / "13B")
    elif what == "truncated":
        data = (size / "consolidated.00.pth").read_bytes()
        (size / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    elif what == "not_a_checkpoint":
        (size / "consolidated.00.pth").write_text("instruction,input,output\n")
    elif what == "tokenizer_vocab":
        train_tokenizer(root / "tokenizer.model", vocab_size=400)


@pytest.mark.parametrize(
    "what, message",
    [
        ("params_missing", "params.json: missing"),
        ("params_malformed", r"params.json: line 2: invalid JSON"),
        ("params_bad_value", "'n_layers' must be a positive integer"),
        ("shard_count", "1 shard.*LLaMA 13B comes in 2"),
        ("truncated", "consolidated.00.pth: not a readable PyTorch checkpoint"),
        ("not_a_checkpoint", "consolidated.00.pth: not a readable PyTorch checkpoint"),
        ("tokenizer_vocab", "tokenizer.model: 400 tokens, but the weights have a vocabulary of 512"),
    ],
)
def test_bad_input_is_named_and_leaves_no_output(tmp_path, tokenizer_file, what, message):
    root = checkpoint(tmp_path, tokenizer_file)
    _break(root, what)
    size = "13B" if what == "shard_count" else "7B"
    result = run_cli("--input_dir", root, "--model_size", size, "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shards_of_different_shapes_are_refused(tmp_path, tokenizer_file):
    root = checkpoint(tmp_path, tokenizer_file, shards=2)
    (root / "7B").rename(root / "tiny")
    part = torch.load(root / "tiny" / "consolidated.01.pth", weights_only=True)
    part["layers.0.attention.wq.weight"] = part["layers.0.attention.wq.weight"][:-2]
    torch.save(part, root / "tiny" / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shards of different shapes for layers.0.attention.wq.weight"):
        convert.meta_to_hf(root, "tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_force(tmp_path, tokenizer_file):
    root = checkpoint(tmp_path, tokenizer_file)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli("--input_dir", root, "--model_size", "7B", "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and "pass --force" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run_cli("--input_dir", root, "--model_size", "7B", "--output_dir", tmp_path / "out", "--force").returncode == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
