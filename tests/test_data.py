"""Alpaca data: every bad file fails fast with the line or record named, and leaves no archive."""

import subprocess
import sys

import pytest

from alpaca_cog.data import IGNORE_INDEX, Example, load_examples, pack, tokenize
from alpaca_cog.model import load_tokenizer
from conftest import DATA, ROOT


@pytest.fixture(scope="module")
def tokenizer(weights_dir):
    return load_tokenizer(weights_dir)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_alpaca_json_jsonl_and_seed_tasks_load():
    gsm8k = load_examples(DATA / "gsm8k_train_alpaca.json")
    assert len(gsm8k) == 7473 and gsm8k[0].instruction.startswith("Natalia sold clips")
    seeds = load_examples(DATA / "alpaca_seed_tasks.jsonl")
    assert len(seeds) >= 175 and all(e.output.strip() for e in seeds)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]', r"bad.json: line 2, column \d+: invalid JSON"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"bad.jsonl: line 2: missing field 'output'"),
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{oops\n', r"bad.jsonl: line 3: not JSON"),
        ("empty.json", "  \n", r"empty.json: the file is empty"),
        ("data.csv", "instruction,input,output\nAdd,1 2,3\n", r"data.csv: line 1: not JSON"),
        ("types.json", '[{"instruction": "a", "output": 3}]', r"record 0: field 'output' must be a string, not int"),
        ("blank.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "}]', r"record 1: field 'output' is empty"),
        ("list.json", "[[1, 2]]", r"record 0: expected an object"),
        ("none.json", "[]", r"none.json: no examples"),
    ],
)
def test_bad_data_is_named(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_examples(write(tmp_path, name, text))


def test_bad_data_fails_the_script_fast_with_no_archive(tmp_path):
    data = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    out = tmp_path / "out.tar"
    result = subprocess.run(
        [sys.executable, "train.py", "--train_data", str(data), "--output_path", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "line 2: missing field 'output'" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tar*"))


def test_prompt_tokens_are_masked_and_eos_is_learned(tokenizer):
    example = Example("Add 2 and 3.", "", "5")
    masked, truncated = tokenize(example, tokenizer, "alpaca", 256, train_on_inputs=False)
    full, _ = tokenize(example, tokenizer, "alpaca", 256, train_on_inputs=True)
    assert not truncated and masked["input_ids"] == full["input_ids"] == full["labels"]
    answer = tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert masked["input_ids"][-len(answer):] == answer
    assert masked["labels"] == [IGNORE_INDEX] * (len(masked["labels"]) - len(answer)) + answer
    other = tokenize(Example("Say the alphabet.", "", "a b c d e f g"), tokenizer, "alpaca", 256, False)[0]
    batch = pack([masked, other])
    n = len(masked["input_ids"])
    assert batch["input_ids"][0].tolist() == masked["input_ids"] + other["input_ids"]  # no padding
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(len(other["input_ids"])))
    labels = batch["labels"][0].tolist()
    assert labels[n - 1] == tokenizer.eos_token_id  # EOS is a target...
    assert labels[n] == IGNORE_INDEX  # ...but the next example's first token is not


def test_truncation_is_reported(tokenizer):
    long = Example("Repeat.", "", "word " * 400)
    item, truncated = tokenize(long, tokenizer, "alpaca", 64, train_on_inputs=False)
    assert truncated and len(item["input_ids"]) == len(item["labels"]) == 64
