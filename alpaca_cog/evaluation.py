"""Evaluating a model on held-out Alpaca-format examples, for evaluate.py and train.py's eval_at_end.

Three measures, on the same examples and prompts for every model compared:
- perplexity of the reference response (its tokens and EOS, as the training loss sees them);
- ROUGE-L of the greedy answer against the reference (over characters when the text is CJK);
- exact match of the final answer, where the reference has one (GSM8K's `#### N`), compared as numbers.
"""

import math
import re
import shutil
import textwrap
import time
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from .data import IGNORE_INDEX, Example, tokenize
from .engine import Engine, Request
from .generate import GenerationParams
from .prompts import STOP_STRINGS, encode_prompt

# Hiragana, katakana, CJK ideographs (with extension A and the compatibility block), Hangul syllables.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


class _CharacterTokenizer:
    """One token per non-space character: rouge_score's own tokenizer keeps only [a-z0-9] words,
    so Chinese or Japanese text would score as empty; character ROUGE-L is the usual choice there."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


_WORD_ROUGE = rouge_scorer.RougeScorer(["rougeL"])
_CHARACTER_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharacterTokenizer())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) of words, or of characters when either text has CJK."""
    scorer = _CHARACTER_ROUGE if CJK.search(answer) or CJK.search(reference) else _WORD_ROUGE
    return scorer.score(reference, answer)["rougeL"].fmeasure


# A number as people write it: 1234, 1,234, -3.5; a minus after a digit or letter is subtraction, not a sign.
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
FINAL_ANSWER = re.compile(r"####([^\n]*)")


def parse_number(text: str) -> float:
    value = float(text.replace(",", ""))
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def final_answer(text: str, last_number: bool = True) -> tuple[float | None, str | None]:
    """(value, where it came from): the first number after GSM8K's `####`, else (when last_number)
    the text's last number, else (None, None). Models trained on data without `####` end with the answer."""
    marked = FINAL_ANSWER.search(text)
    if marked and (numbers := NUMBER.findall(marked.group(1))):
        return parse_number(numbers[0]), "####"
    if last_number and (numbers := NUMBER.findall(text)):
        return parse_number(numbers[-1]), "last number"
    return None, None


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, desc: str = "scoring") -> list[float]:
    """log P(continuation | context), summed over the continuation's tokens, for each (context, continuation) of token ids.

    One plain forward pass per micro-batch. Rows are padded on the right and need no attention mask:
    a causal model's real tokens never attend to the padding after them.
    """
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # like lengths together: little padding
    results = [0.0] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            context, continuation = pairs[i]
            if not context:
                raise ValueError("continuation_logprobs: a context needs at least one token to predict from")
            ids[r, : len(context) + len(continuation)] = torch.tensor(context + continuation)
        logits = model(input_ids=ids.to(model.device)).logits
        for r, i in enumerate(rows):
            context, continuation = pairs[i]
            # Position p predicts token p + 1, so the continuation is predicted from len(context) - 1 on.
            logprobs = logits[r, len(context) - 1 : len(context) + len(continuation) - 1].float().log_softmax(-1)
            results[i] = logprobs.gather(1, torch.tensor(continuation, dtype=torch.long, device=logits.device)[:, None]).sum().item()
    return results


def response_pairs(tokenizer, examples: list[Example], template: str, context_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per example, exactly as the training loss sees them (data.tokenize),
    cut to the model's context."""
    pairs = []
    for example in examples:
        item, _ = tokenize(example, tokenizer, template, context_len, train_on_inputs=False)
        prompt_len = item["labels"].count(IGNORE_INDEX)
        pairs.append((item["input_ids"][:prompt_len], item["input_ids"][prompt_len:]))
    return pairs


def response_logprobs(model, tokenizer, examples: list[Example], template: str, batch_size: int = 8) -> tuple[list[float], list[int]]:
    """(log P(response + EOS | prompt), the response's tokens) per example."""
    pairs = response_pairs(tokenizer, examples, template, model.config.max_position_embeddings)
    return continuation_logprobs(model, pairs, batch_size), [len(response) for _, response in pairs]


def perplexity(logprobs: list[float], tokens: list[int]) -> float:
    """exp(mean negative log-likelihood per token), the tokens summed over all examples first."""
    return math.exp(-sum(logprobs) / max(1, sum(tokens)))


def response_perplexity(model, tokenizer, examples: list[Example], template: str, batch_size: int = 8) -> float:
    return perplexity(*response_logprobs(model, tokenizer, examples, template, batch_size))


def greedy_answers(model, tokenizer, prompts_ids: list[list[int]], max_tokens: int, stop: list[str], batch_size: int = 8) -> list[str]:
    """The greedy answer to each prompt, decoded in batches by the engine that serves predictions."""
    engine = Engine(model, tokenizer, max_batch=batch_size)
    try:
        handles = [engine.submit(Request(ids, GenerationParams(temperature=0, max_tokens=max_tokens), stop)) for ids in prompts_ids]
        for handle in tqdm(handles, desc="answers", unit="answer", leave=False):
            for _ in handle:  # in order; the engine decodes the others meanwhile
                pass
        return [h.result.text for h in handles]
    finally:
        engine.close()


def evaluate_model(model, tokenizer, examples: list[Example], template: str, max_tokens: int, batch_size: int = 8,
                   reference_last_number: bool = False) -> dict:  # fmt: skip
    """Aggregates (perplexity, rouge_l, exact_match) and one record per example.

    Exact match counts only the examples whose reference has a final answer: `#### N`, or its last
    number when reference_last_number. The model's answer falls back to its last number always.
    """
    started = time.monotonic()
    logprobs, response_tokens = response_logprobs(model, tokenizer, examples, template, batch_size)
    prompts = [encode_prompt(tokenizer, template, e.instruction, e.input) for e in examples]
    answers = greedy_answers(model, tokenizer, prompts, max_tokens, STOP_STRINGS[template], batch_size)
    records = []
    for example, tokens, logprob, answer in zip(examples, response_tokens, logprobs, answers, strict=True):
        expected, _ = final_answer(example.output, last_number=reference_last_number)
        predicted, source = final_answer(answer)
        records.append(dict(answer=answer, rouge_l=rouge_l(answer, example.output), response_logprob=logprob,
                            response_tokens=tokens, reference_answer=expected, predicted_answer=predicted,
                            answer_source=source, exact_match=None if expected is None else predicted == expected))  # fmt: skip
    matched = [r["exact_match"] for r in records if r["exact_match"] is not None]
    return dict(
        examples=len(records), template=template, max_tokens=max_tokens,
        perplexity=perplexity(logprobs, response_tokens), response_tokens=sum(response_tokens),
        rouge_l=sum(r["rouge_l"] for r in records) / max(1, len(records)),
        exact_match=sum(matched) / len(matched) if matched else None, exact_match_examples=len(matched),
        time_s=time.monotonic() - started, records=records,
    )  # fmt: skip


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_table(results: dict[str, dict]) -> str:
    """One line per model: the aggregates of evaluate_model."""
    lines = [f"{'model':<32} {'template':<8} {'perplexity':>10} {'ROUGE-L':>8} {'exact match':>14} {'time':>8}"]
    for name, r in results.items():
        exact = f"{_percent(r['exact_match'])} of {r['exact_match_examples']}" if r["exact_match_examples"] else "-"
        lines.append(f"{name[-32:]:<32} {r['template']:<8} {r['perplexity']:>10.3f} {r['rouge_l']:>8.3f} {exact:>14} {r['time_s']:>7.0f}s")
    return "\n".join(lines)


def _cell(text: str, width: int, max_lines: int) -> list[str]:
    lines = [wrapped for paragraph in text.splitlines() or [""] for wrapped in textwrap.wrap(paragraph, width) or [""]]
    return lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines


def answers_table(examples: list[Example], answers: dict[str, list[str]], count: int, width: int | None = None,
                  max_lines: int = 12) -> str:  # fmt: skip
    """The first `count` examples side by side: each model's answer, then the reference."""
    width = width or shutil.get_terminal_size((160, 24)).columns
    headers = [*answers, "reference"]
    column = max(16, (width - 3 * (len(headers) - 1)) // len(headers))
    blocks = []
    for i, example in enumerate(examples[:count]):
        prompt = example.instruction + (f" [{example.input}]" if example.input else "")
        texts = [a[i] for a in answers.values()] + [example.output]
        cells = [[name if len(name) <= column else "..." + name[3 - column :], "-" * column, *_cell(text, column, max_lines)]
                 for name, text in zip(headers, texts)]  # fmt: skip
        rows = [" | ".join(f"{(c[j] if j < len(c) else ''):<{column}}" for c in cells).rstrip() for j in range(max(map(len, cells)))]
        blocks.append("\n".join([f"#{i + 1} {textwrap.shorten(prompt, width - 4)}", *rows]))
    return "\n\n".join(blocks)


def plot_evaluation(results: dict[str, dict], path: Path) -> None:
    """Bars per model: perplexity on its own axis, ROUGE-L and exact match on a 0-1 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    left.bar(names, [r["perplexity"] for r in results.values()], color="tab:gray")
    left.set_title("response perplexity (lower is better)")
    bars = [("rouge_l", "ROUGE-L")] + [("exact_match", "exact match")] * any(r["exact_match"] is not None for r in results.values())
    width = 0.8 / len(bars)
    for k, (key, label) in enumerate(bars):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        right.bar(xs, [r[key] or 0.0 for r in results.values()], width, label=label)
    right.set_xticks(range(len(names)), names)
    right.set_ylim(0, 1)
    right.set_title("greedy answers (higher is better)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
