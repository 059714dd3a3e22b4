"""Alpaca-format training data: loading with line-precise errors, tokenizing, packing."""

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
