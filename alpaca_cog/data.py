"""Training data: Alpaca-format records (loaded with line-precise errors) or plain text; tokenizing, packing."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import encode_prompt

IGNORE_INDEX = -100  # label of tokens the loss skips (prompt, padding)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs from a JSON list or a JSONL file; `where` names the line or index."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected Alpaca JSON (a list of records) or JSONL")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        return [(f"record {i}", r) for i, r in enumerate(data)]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {n}: not JSON ({e.msg}); expected Alpaca JSON or JSONL "
                'records like {"instruction": ..., "input": ..., "output": ...}'
            ) from None
    return records


def _field(path: Path, where: str, record: dict, key: str, required: bool) -> str:
    value = record.get(key, None if required else "")
    if value is None:
        raise ValueError(f"{path}: {where}: missing field '{key}'")
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: field '{key}' must be a string, not {type(value).__name__}")
    return value


def load_examples(path: str | Path) -> list[Example]:
    """Records with instruction, optional input, and output (Stanford Alpaca's format).

    Self-instruct seed tasks ({"instruction", "instances": [{"input", "output"}]}) are expanded
    into one example per instance.
    """
    path = Path(path)
    examples = []
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: {where}: expected an object with instruction/input/output, got {type(record).__name__}")
        instruction = _field(path, where, record, "instruction", required=True)
        if not instruction.strip():
            raise ValueError(f"{path}: {where}: field 'instruction' is empty")
        instances = record["instances"] if "instances" in record and "output" not in record else [record]
        for instance in instances:
            output = _field(path, where, instance, "output", required=True)
            if not output.strip():
                raise ValueError(f"{path}: {where}: field 'output' is empty")
            examples.append(Example(instruction, _field(path, where, instance, "input", required=False), output))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def is_plain_text(path: str | Path) -> bool:
    """Whether train_data is plain text for continued pre-training (a .txt file or a folder) rather than Alpaca JSON."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".txt"


def load_texts(path: str | Path) -> list[str]:
    """Plain text: a .txt file, or every .txt file in a folder (sorted, recursively); one text per non-empty line,
    as Hugging Face datasets' text loader (and so Chinese-LLaMA-Alpaca's run_clm_pt_with_peft.py) reads them."""
    path = Path(path)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: a folder without .txt files; plain-text training reads .txt files")
    texts = []
    for file in files:
        try:
            texts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise ValueError(f"{path}: no text (every line is empty)")
    return texts


def text_blocks(texts: list[str], tokenizer, block_len: int) -> list[dict]:
    """Continued pre-training examples: the texts tokenized, each followed by EOS, end to end, cut into blocks of
    block_len tokens (the last one shorter), every token labelled."""
    ids: list[int] = []
    for start in range(0, len(texts), 1000):  # batches: the fast tokenizer encodes each batch in parallel
        for row in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
    blocks = [ids[i : i + block_len] for i in range(0, len(ids), block_len)]
    return [{"input_ids": b, "labels": b} for b in blocks if len(b) > 1]  # a lone token predicts nothing


def tokenize(example: Example, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool) -> tuple[dict, bool]:
    """input_ids and labels for one example, and whether it was truncated to cutoff_len.

    EOS is appended and learned, so the finetuned model stops.
    """
    prompt_ids = encode_prompt(tokenizer, template, example.instruction, example.input)
    output_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + output_ids)[:cutoff_len]
    labels = list(ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt_ids) + output_ids)[:cutoff_len]
    return {"input_ids": ids, "labels": labels}, len(prompt_ids) + len(output_ids) > cutoff_len


def pack(batch: list[dict]) -> dict[str, torch.Tensor]:
    """A micro-batch as one row without padding: the examples end to end, positions restarting at each.

    Each example's first label is masked so that no token learns to predict the next example's
    start; with attention kept inside each example (finetune's packed attention), the loss is the
    sum of the examples' losses run one by one.
    """
    return {
        "input_ids": torch.tensor([[t for b in batch for t in b["input_ids"]]]),
        "labels": torch.tensor([[t for b in batch for t in [IGNORE_INDEX, *b["labels"][1:]]]]),
        "position_ids": torch.tensor([[p for b in batch for p in range(len(b["input_ids"]))]]),
    }
