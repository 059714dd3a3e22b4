"""evaluate.py and train.py's eval_at_end: each metric on hand-made cases, the report, and agreement with lm-evaluation-harness."""

import glob
import json
import math
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from alpaca_cog.data import Example
from alpaca_cog.evaluation import (_WORD_ROUGE, continuation_logprobs, evaluate_model, final_answer, response_pairs,
                                   response_perplexity, rouge_l)  # fmt: skip
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
from alpaca_cog.prompts import build_prompt
from conftest import FIXTURES, ROOT, metrics_of, run_finetune, tiny_llama


@pytest.mark.parametrize("answer, reference, expected", [
    ("the cat sat on the mat", "the cat was on the mat", 5 / 6),  # LCS "the cat on the mat": 5 of 6 words each way
    ("a b c d", "d c b a", 1 / 4),  # order matters: the longest common subsequence is one word
    ("The Cat.", "the cat", 1.0),  # case and punctuation are not words
    ("a b", "c d", 0.0),
    ("我喜欢猫", "我喜欢狗", 3 / 4),  # CJK: characters, 3 of 4 in common
    ("答案是72", "答案是 72", 1.0),
])  # fmt: skip
def test_rouge_l_on_hand_made_cases(answer, reference, expected):
    assert rouge_l(answer, reference) == pytest.approx(expected)


def test_rouge_l_scores_cjk_by_characters_where_words_would_see_nothing():
    assert _WORD_ROUGE.score("我喜欢狗", "我喜欢猫")["rougeL"].fmeasure == 0.0  # rouge_score's words are [a-z0-9] only
    assert rouge_l("我喜欢猫", "我喜欢狗") > 0


@pytest.mark.parametrize("text, expected", [
    ("She pays 5 x 2 = 10 dollars.\n#### 1,234", (1234, "####")),
    ("#### $1,000,000.00", (1000000, "####")),
    ("#### -3.50", (-3.5, "####")),
    ("So 5-3 = 2 apples are left.", (2, "last number")),  # a minus after a digit is subtraction
    ("It is -7 degrees.", (-7, "last number")),
    ("The answer is 0.5, or 1,23 in their notation.", (23, "last number")),  # 1,23 is not a thousands group
    ("No number here.", (None, None)),
])  # fmt: skip
def test_final_answer_is_a_number_after_hashes_or_the_last_one(text, expected):
    assert final_answer(text) == expected


def test_final_answers_compare_as_numbers_not_strings():
    assert final_answer("#### 1,234")[0] == final_answer("1234")[0]
    assert final_answer("#### 0.50")[0] == final_answer("the answer is .. 0.5")[0]
    assert final_answer("#### 12")[0] != final_answer("#### 1.2")[0]
    assert final_answer("48/2 = 24 clips", last_number=False) == (None, None)  # references: only `####` unless asked


def test_perplexity_of_a_model_with_uniform_logits_is_the_vocabulary_size(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: each token has probability 1 / vocabulary
    examples = [Example("Add 2 and 3.", "", "5"), Example("Name a colour.", "", "Blue, like the sky.")]
    assert response_perplexity(model, tokenizer, examples, "alpaca") == pytest.approx(len(tokenizer), rel=1e-5)


def test_batched_scores_equal_transformers_own_loss_one_example_at_a_time():
    model = tiny_llama()
    pairs = [([1, 5, 9], [7, 8]), ([1, 4], [3, 3, 3, 6, 2]), ([1, 9, 9, 9, 9, 9], [11])]  # ragged: padding in every batch
    for batch_size in (1, 2, 3):
        got = continuation_logprobs(model, pairs, batch_size)
        for (context, continuation), logprob in zip(pairs, got):
            labels = torch.tensor([[-100] * len(context) + continuation])
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([context + continuation]), labels=labels).loss
            assert logprob == pytest.approx(-loss.item() * len(continuation), rel=1e-5)


def test_a_bad_eval_file_fails_naming_the_line(tmp_path):
    bad = tmp_path / "held_out.jsonl"
    bad.write_text('{"instruction": "Add 2 and 3.", "output": "5"}\n{"instruction": "Say hi." "output": "hi"}\n')
    result = subprocess.run([sys.executable, "evaluate.py", "--eval_data", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {bad}: line 2: not JSON"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Two steps on the tiny model, evaluated at the end; train_on_inputs=False and no truncation,
    so the validation loss is the log of the response perplexity."""
    tmp = tmp_path_factory.mktemp("eval-train")
    return run_finetune(tiny_model_dir, tmp, max_steps=2, val_set_size=4, train_on_inputs=False, cutoff_len=512, eval_at_end=True)


def test_eval_at_end_writes_the_evaluation_into_metrics_and_a_chart(trained):
    metrics = metrics_of(trained)
    evaluation = metrics["evaluation"]
    assert evaluation["examples"] == 4 and len(evaluation["records"]) == 4
    assert evaluation["exact_match"] is None and evaluation["exact_match_examples"] == 0  # the fixture has no `#### N`
    assert 0 <= evaluation["rouge_l"] <= 1
    assert evaluation["perplexity"] == pytest.approx(math.exp(metrics["final_val_loss"]), rel=1e-4)  # two codes, one number
    with tarfile.open(trained) as tar:
        assert tar.extractfile("eval.png").read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_compares_base_and_adapter_on_the_same_examples(trained, tiny_model_dir, tmp_path, capsys):
    import evaluate
    from alpaca_cog.cli import parse_inputs, parser_for

    argv = ["--eval_data", str(FIXTURES / "gsm8k_64.json"), "--weights", str(trained), "--max_examples", "3", "--max_tokens", "8",
            "--reference_last_number", "--output", str(tmp_path / "report.json"), "--base_weights", str(tiny_model_dir)]  # fmt: skip
    evaluate.evaluate(**parse_inputs(evaluate.evaluate, parser_for(evaluate.evaluate), argv))
    out, err = capsys.readouterr()
    report = json.loads(out[out.rindex("\n{\n") :])  # the JSON report comes last
    assert list(report["models"]) == ["base", str(trained)] and report["examples"] == 3
    for name, summary in report["models"].items():
        assert summary["template"] == "alpaca" and summary["examples"] == 3 and summary["max_tokens"] == 8
        assert summary["perplexity"] > 1 and 0 <= summary["rouge_l"] <= 1
        assert summary["exact_match_examples"] == 3 and 0 <= summary["exact_match"] <= 1  # the references' last numbers
        assert "records" not in summary
    assert report["models"]["base"]["perplexity"] != report["models"][str(trained)]["perplexity"]
    assert "the same prompt for both" in err and "its prompt_template.json" in err
    assert "reference" in out and "Natalia sold clips" in out  # the side-by-side table
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["models"] == report["models"] and len(written["records"]) == 3
    assert set(written["records"][0]["models"]) == {"base", str(trained)}
    assert written["records"][0]["models"]["base"]["reference_answer"] == 72


LM_EVAL_TASK = """task: alpaca_cog_held_out
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def test_agrees_with_lm_eval_harness(tiny_model_dir, tmp_path):
    """lm_eval scores the same prompts and responses (with EOS) with the same model and adapter.

    It moves the prompt's trailing newline into the continuation (its rule for trailing whitespace),
    so what overlaps is log P(newline + response + EOS | prompt without its newline), per example;
    its `perplexity` is exp(-mean of those), per document rather than per token.
    """
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(tiny_model_dir)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # not a no-op
    get_peft_model(load_model(tiny_model_dir, device="cpu"), lora).save_pretrained(adapter)
    # Short responses: lm_eval's per-document perplexity of a random model overflows floats on long ones.
    examples = [Example(r["instruction"], r["input"], " ".join(r["output"].split()[:4])) for r in json.loads((FIXTURES / "gsm8k_64.json").read_text())[:5]]
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([dict(prompt=build_prompt("alpaca", e.instruction, e.input), response=e.output + tokenizer.eos_token) for e in examples]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "held_out.yaml").write_text(LM_EVAL_TASK.format(data=data))
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                    f"pretrained={tiny_model_dir},peft={adapter},dtype=float32", "--tasks", "alpaca_cog_held_out",
                    "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4",
                    "--output_path", str(tmp_path / "out"), "--log_samples"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)  # not the repository: its evaluate.py would shadow HF's  # fmt: skip
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "out" / "*" / "samples_*.jsonl"))[0])]
    theirs = [float(s["filtered_resps"][0][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    results = json.loads(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read())

    model = apply_adapter(load_model(tiny_model_dir, device="cpu"), adapter)
    pairs = response_pairs(tokenizer, examples, "alpaca", 1024)
    harness_split = [(prompt[:-1], prompt[-1:] + response) for prompt, response in pairs]
    assert tokenizer.decode(pairs[0][0][-1:]) == "\n"
    ours = continuation_logprobs(model, harness_split)
    assert ours == pytest.approx(theirs, rel=1e-4)
    perplexity = math.exp(-sum(ours) / len(ours))
    assert results["results"]["alpaca_cog_held_out"]["perplexity,none"] == pytest.approx(perplexity, rel=1e-4)
    # ...and evaluate_model's own records are those numbers less the newline's log-probability.
    newline = continuation_logprobs(model, [(prompt[:-1], prompt[-1:]) for prompt, _ in pairs])
    records = evaluate_model(model, tokenizer, examples, "alpaca", max_tokens=1)["records"]
    assert [r["response_logprob"] + n for r, n in zip(records, newline)] == pytest.approx(theirs, rel=1e-4)
