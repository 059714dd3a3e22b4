"""Meta's LLaMA layout for tests and benchmarks: synthetic model-parallel checkpoints, a tiny
SentencePiece tokenizer, and a reference forward pass written from Meta's llama/model.py that
runs straight on the shards (column-parallel outputs concatenated, row-parallel outputs summed)."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# How Meta's model-parallel layers split each weight (fairscale): Column: dim 0, Row: dim 1.
COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
ROW = ("wo", "w2")


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def train_tokenizer(path: Path, vocab_size: int = 512) -> Path:
    """A tiny LLaMA-style SentencePiece model (BPE, byte fallback, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece as spm

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"
    lines = [json.loads(line)["instruction"] for line in corpus.read_text().splitlines()]
    path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.995, minloglevel=2,
    )  # fmt: skip
    return path


def make_checkpoint(
    root: Path, size: str = "7B", dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
    vocab_size: int = 512, shards: int = 1, multiple_of: int = 32, ffn_dim_multiplier: float | None = None,
    dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: bool = True,
) -> Path:  # fmt: skip
    """root/tokenizer.model and root/size/{params.json, consolidated.NN.pth}, with random weights."""
    g = torch.Generator().manual_seed(seed)
    kv = n_kv_heads or n_heads
    head = dim // n_heads
    hidden = ffn_dim(dim, multiple_of, ffn_dim_multiplier)
    full = {"tok_embeddings.weight": (vocab_size, dim), "norm.weight": (dim,), "output.weight": (vocab_size, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        full |= {p + "attention.wq.weight": (n_heads * head, dim), p + "attention.wk.weight": (kv * head, dim),
                 p + "attention.wv.weight": (kv * head, dim), p + "attention.wo.weight": (dim, n_heads * head),
                 p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden),
                 p + "feed_forward.w3.weight": (hidden, dim), p + "attention_norm.weight": (dim,),
                 p + "ffn_norm.weight": (dim,)}  # fmt: skip
    out = root / size
    out.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = [{} for _ in range(shards)]
    for name, shape in full.items():
        t = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        t = t.to(dtype)
        kind = name.split(".")[-2]
        if "norm" in name:
            chunks = [t.clone() for _ in range(shards)]
        elif kind == "tok_embeddings":
            chunks = t.chunk(shards, dim=1)  # ParallelEmbedding splits the embedding dim
        else:
            chunks = t.chunk(shards, dim=0 if kind in COLUMN else 1)
        for part, chunk in zip(parts, chunks):
            part[name] = chunk.clone()
    for i, part in enumerate(parts):
        torch.save(part, out / f"consolidated.{i:02d}.pth")
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": multiple_of,
              "norm_eps": 1e-5, "vocab_size": -1, "rope_theta": 10000.0}  # fmt: skip
    if n_kv_heads:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    (out / "params.json").write_text(json.dumps(params))
    if tokenizer:
        train_tokenizer(root / "tokenizer.model", vocab_size)
    return root


# ----- Meta's forward pass (llama/model.py), on the model-parallel shards -----


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary(x, freqs_cis):  # x: (B, T, H, D), rotating interleaved pairs as complex numbers
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def meta_forward(size_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) computed shard by shard, as Meta's model-parallel ranks would."""
    params = json.loads((size_dir / "params.json").read_text())
    shards = [torch.load(f, weights_only=True) for f in sorted(size_dir.glob("consolidated.*.pth"))]
    shards = [{k: v.float() for k, v in s.items()} for s in shards]
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    head = dim // n_heads
    eps, theta = params["norm_eps"], params.get("rope_theta", 10000.0)
    n = len(shards)
    local_heads, local_kv = n_heads // n, n_kv // n
    T = tokens.shape[1]
    freqs = 1.0 / theta ** (torch.arange(0, head, 2).float() / head)
    freqs_cis = torch.polar(torch.ones(T, head // 2), torch.outer(torch.arange(T).float(), freqs))
    mask = torch.full((T, T), float("-inf")).triu(1)

    h = torch.cat([F.embedding(tokens, s["tok_embeddings.weight"]) for s in shards], dim=-1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        attn_out = 0
        for s in shards:
            x = _rms_norm(h, s[p + "attention_norm.weight"], eps)
            q = (x @ s[p + "attention.wq.weight"].T).view(*x.shape[:2], local_heads, head)
            k = (x @ s[p + "attention.wk.weight"].T).view(*x.shape[:2], local_kv, head)
            v = (x @ s[p + "attention.wv.weight"].T).view(*x.shape[:2], local_kv, head)
            q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
            k = k.repeat_interleave(local_heads // local_kv, dim=2)
            v = v.repeat_interleave(local_heads // local_kv, dim=2)
            scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / math.sqrt(head) + mask
            o = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).flatten(2)
            attn_out = attn_out + o @ s[p + "attention.wo.weight"].T  # row-parallel: partial sums
        h = h + attn_out
        ffn_out = 0
        for s in shards:
            x = _rms_norm(h, s[p + "ffn_norm.weight"], eps)
            gated = F.silu(x @ s[p + "feed_forward.w1.weight"].T) * (x @ s[p + "feed_forward.w3.weight"].T)
            ffn_out = ffn_out + gated @ s[p + "feed_forward.w2.weight"].T
        h = h + ffn_out
    h = _rms_norm(h, shards[0]["norm.weight"], eps)
    return torch.cat([h @ s["output.weight"].T for s in shards], dim=-1)
