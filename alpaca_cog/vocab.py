"""Vocabulary extension, as Chinese-LLaMA-Alpaca's merge_tokenizers.py: a new language's pieces (a SentencePiece
model's, or a list of tokens) added to the base's tokenizer, every old id kept, the new ones after them.

- A base with Meta's SentencePiece model (tokenizer.model): the pieces are appended to it (sentencepiece's model
  proto), so they segment text as its own pieces do, in sentencepiece and in transformers (tokenizer.json) alike.
- A byte-level BPE base (SmolLM2: tokenizer.json only): they become added tokens (transformers' add_tokens), which
  are matched before the BPE runs.

Training with the result (train.py --tokenizer) grows the embeddings to it.
"""

import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer

from .archive import carries_tokenizer
from .outputs import atomic_dir

SPACE = "\u2581"  # SentencePiece's space


def new_tokens(source: Path) -> list[str]:
    """The texts of a SentencePiece model's pieces (.model; its control, byte and unknown pieces left out) or of a
    UTF-8 file's lines (one token a line), in order."""
    if source.suffix == ".model":
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        try:
            proto.ParseFromString(source.read_bytes())
        except Exception as e:  # protobuf's DecodeError, or a file that parses into nothing
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        kinds = (sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
        tokens = [p.piece.replace(SPACE, " ") for p in proto.pieces if p.type in kinds]
    else:
        try:
            tokens = source.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); give a SentencePiece .model "
                             "or a text file of tokens, one a line") from None  # fmt: skip
    return list(dict.fromkeys(t for t in tokens if t.strip()))


def extend_tokenizer(model_dir: str | Path, source: str | Path, output_dir: str | Path, force: bool = False) -> tuple[Path, int]:
    """Write to output_dir the base's tokenizer (in model_dir) with source's tokens added; (output_dir, tokens added)."""
    model_dir, source = Path(model_dir), Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (a SentencePiece .model or a text file of tokens)")
    if not carries_tokenizer(model_dir):
        raise FileNotFoundError(f"{model_dir}: no tokenizer here (tokenizer_config.json missing)")
    tokens = new_tokens(source)
    if not tokens:
        raise ValueError(f"{source}: no tokens in it")
    with atomic_dir(output_dir, force=force) as tmp:
        extend = _extend_sentencepiece if (model_dir / "tokenizer.model").is_file() else _extend_added_tokens
        added = extend(model_dir, tokens, tmp)
        if not added:
            raise ValueError(f"{source}: the base's vocabulary has every one of its {len(tokens)} tokens already")
    return Path(output_dir), added


def _extend_sentencepiece(model_dir: Path, tokens: list[str], out: Path) -> int:
    """Append the pieces the base lacks to its SentencePiece model (score 0, as merge_tokenizers.py does)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    have = {p.piece for p in proto.pieces}
    pieces = [p for p in (t.replace(" ", SPACE) for t in tokens) if p not in have]
    for piece in pieces:
        proto.pieces.append(sp_pb2.ModelProto.SentencePiece(piece=piece, score=0.0))
    extended = proto.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts the extended model to tokenizers' form
        (Path(tmp) / "tokenizer.model").write_bytes(extended)
        model = json.loads(LlamaTokenizer.from_pretrained(tmp).backend_tokenizer.to_str())["model"]
    # The rest of the base's tokenizer.json (normalizer, BOS/EOS post-processing, decoder, special tokens) and its
    # settings stay as they are.
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    pipeline = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(pipeline | {"model": model}, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer.model").write_bytes(extended)  # for llama.cpp and Meta's layout
    return len(pieces)


def _extend_added_tokens(model_dir: Path, tokens: list[str], out: Path) -> int:
    """Add, as tokens of their own, those the base does not encode as one token already."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(tokens, add_special_tokens=False)["input_ids"]
    added = tokenizer.add_tokens([t for t, ids in zip(tokens, encoded) if len(ids) != 1])
    tokenizer.save_pretrained(out)
    return added
