"""Self-instruct data generation as Stanford Alpaca did it, and a clean pass in AlpacaDataCleaned's spirit.

Stanford's generate_instruction.py (tatsu-lab/stanford_alpaca): each request shows 3 seed tasks and asks for
20 (the prompt is theirs: selfinstruct_prompt.txt); the reply is split into numbered Instruction/Input/Output
items, filtered, and an instruction whose ROUGE-L F against any seed or kept instruction exceeds 0.7 is dropped.
Here any OpenAI-compatible server answers through an async `complete(prompt) -> Reply` function, K at once.
"""

import asyncio
import json
import random
import re
import string
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import openai
from rouge_score import scoring, tokenizers
from tqdm import tqdm

from .data import Example, _records, load_examples
from .outputs import atomic_file

PROMPT = Path(__file__).with_name("selfinstruct_prompt.txt").read_text(encoding="utf-8")
LANGUAGES = {"en": "English", "zh": "Chinese"}
SIMILARITY_THRESHOLD = 0.7
STOP = ["\n20", "20."]  # Stanford's stop list (["\n20", "20.", "20."]) without its duplicate
LABEL = re.compile(r"\d+\s*\.\s*(Instruction|Input|Output)\s*:")
BLACKLIST_EN = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]  # fmt: skip
BLACKLIST_ZH = ["图片", "图像", "照片", "图表", "图形", "文件", "地图", "绘制", "画出", "视频", "音频", "音乐", "流程图", "示意图"]
BLACKLIST = {
    "en": re.compile(r"\b(%s)\b" % "|".join(BLACKLIST_EN), re.IGNORECASE),
    # Han characters are all \w, so Chinese words match anywhere, not at word boundaries
    "zh": re.compile(r"\b(%s)\b|%s" % ("|".join(BLACKLIST_EN), "|".join(BLACKLIST_ZH)), re.IGNORECASE),
}
_EN_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)  # Stanford's: RougeScorer(["rougeL"]) without stemming
_ZH_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+")  # one Han character, or a run of ASCII letters/digits


def words(text: str, language: str) -> list[str]:
    """ROUGE tokens: rouge_score's for English (lowercased ASCII words; Chinese would vanish), characters for Chinese."""
    return _EN_TOKENIZER.tokenize(text) if language == "en" else _ZH_TOKEN.findall(text.lower())


def load_seed_tasks(path: str | Path) -> list[Example]:
    """The first instance of each seed task, as Stanford samples them; an Alpaca file works too."""
    first: dict[str, Example] = {}
    for example in load_examples(path):
        first.setdefault(example.instruction, example)
    return list(first.values())


def encode_prompt(tasks: list[Example], language: str = "en") -> str:
    """Stanford's prompt: the requirements, the tasks numbered 1..n, then "n+1. Instruction:" to continue."""
    prompt = PROMPT.replace("should be in English", f"should be in {LANGUAGES[language]}") + "\n"
    for i, task in enumerate(tasks, start=1):
        instruction = re.sub(r"\s+", " ", task.instruction).strip().rstrip(":")
        prompt += f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{task.input or '<noinput>'}\n{i}. Output:\n{task.output}\n"
    return prompt + f"###\n{len(tasks) + 1}. Instruction:"


def parse_reply(text: str, finish_reason: str | None, num_prompt_tasks: int) -> tuple[list[Example], Counter]:
    """Items of a reply, and how many were dropped: "truncated" (the last one, cut by length), "malformed".

    A completion continues the prompt's "n+1. Instruction:", so its first item lacks that label (Stanford
    prepends it); a chat reply usually restates it. Chunks without labels (a chat model's preamble) are skipped.
    """
    first = text.split("###", 1)[0]
    if LABEL.search(first) and not any(m.group(1) == "Instruction" for m in LABEL.finditer(first)):
        text = f"{num_prompt_tasks + 1}. Instruction:" + text
    chunks = text.split("###")
    items, dropped = [], Counter()
    for n, chunk in enumerate(chunks):
        parts = LABEL.split(chunk)  # [before, label, text, label, text, ...]
        if len(parts) == 1:
            continue
        if n == len(chunks) - 1 and finish_reason == "length":
            dropped["truncated"] += 1
        elif parts[1::2] != ["Instruction", "Input", "Output"]:
            dropped["malformed"] += 1
        else:
            instruction, input, output = (p.strip() for p in parts[2::2])
            items.append(Example(instruction, "" if input.lower() == "<noinput>" else input, output))
    return items, dropped


def rejection(task: Example, language: str = "en") -> str | None:
    """The name of the first filter that rejects the task, in Stanford's order; None keeps it."""
    instruction = task.instruction
    count = len(instruction.split()) if language == "en" else len(words(instruction, language))
    if count <= 3:
        return "too_short"
    if count > 150:
        return "too_long"
    if BLACKLIST[language].search(instruction):
        return "blacklist"
    if instruction.startswith("Write a program"):  # Stanford: models tacked it onto many tasks, and code or answer is unclear
        return "write_a_program"
    if instruction[0] in string.punctuation or unicodedata.category(instruction[0]).startswith("P"):
        return "punctuation_start"
    if language == "en" and not instruction[0].isascii():
        return "non_ascii_start"
    if not task.output.strip():  # not Stanford's: train.py refuses a record without an output
        return "empty_output"
    return None


class SimilarityIndex:
    """ROUGE-L F of an instruction against every one added so far, equal to rouge_score's.

    The LCS is bit-parallel (Hyyrö 2004: one big-integer step per token), about 20x faster than
    rouge_score's table; the cost is still O(n) per instruction, O(n^2) per data set.
    """

    def __init__(self, language: str = "en"):
        self.language = language
        self.instructions: list[str] = []
        self._masks: list[tuple[dict[str, int], int]] = []  # per instruction: token -> bit positions, length

    def add(self, instruction: str) -> None:
        masks: dict[str, int] = {}
        tokens = words(instruction, self.language)
        for i, token in enumerate(tokens):
            masks[token] = masks.get(token, 0) | 1 << i
        self.instructions.append(instruction)
        self._masks.append((masks, len(tokens)))

    def scores(self, instruction: str) -> list[float]:
        tokens = words(instruction, self.language)
        scores = []
        for masks, length in self._masks:
            full = v = (1 << length) - 1
            for token in tokens:
                u = v & masks.get(token, 0)
                v = ((v + u) | (v - u)) & full
            lcs = length - v.bit_count()
            scores.append(scoring.fmeasure(lcs / length, lcs / len(tokens)) if lcs else 0.0)
        return scores

    def similarity(self, instruction: str) -> dict:
        """Stanford's per-record figures: the 10 most similar instructions, and the mean score."""
        scores = self.scores(instruction)
        top = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
        return {
            "instruction": instruction,
            "most_similar_instructions": {self.instructions[i]: scores[i] for i in top},
            "avg_similarity_score": sum(scores) / len(scores) if scores else 0.0,
        }


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


Complete = Callable[[str], Awaitable[Reply]]


def openai_complete(client: openai.AsyncOpenAI, model: str, api: str = "chat", max_tokens: int = 3072,
                    temperature: float = 1.0, top_p: float = 1.0) -> Complete:  # fmt: skip
    """A `complete` on an OpenAI-compatible server: chat (one prompt per request) or completions."""
    sampling = dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=STOP)

    async def complete(prompt: str) -> Reply:
        if api == "chat":
            response = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **sampling)
            text = response.choices[0].message.content or ""
        else:
            response = await client.completions.create(prompt=prompt, **sampling)
            text = response.choices[0].text
        usage = response.usage
        return Reply(text, response.choices[0].finish_reason, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    return complete


async def first_model(client: openai.AsyncOpenAI) -> str:
    """The server's first model: serve.py lists the one it serves."""
    models = (await client.models.list()).data
    if not models:
        raise ValueError(f"{client.base_url} lists no models; pass --model")
    return models[0].id


def retry_reason(error: Exception) -> str | None:
    """Why a failed request is worth retrying (429, 5xx, timeout, no connection), or None."""
    if isinstance(error, openai.APITimeoutError):
        return "a timeout"
    if isinstance(error, openai.APIConnectionError):
        return "a connection error"
    if isinstance(error, openai.APIStatusError) and (error.status_code == 429 or error.status_code >= 500):
        return str(error.status_code)
    return None


@dataclass
class Report:
    """What a run did; filled in as it goes, so an interrupted run can still say."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    candidates: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    already_kept: int = 0
    total_kept: int = 0

    def summary(self) -> dict:
        return asdict(self) | {"removed": dict(self.removed.most_common())}


def similarity_path(output: Path) -> Path:
    return output.with_name(output.stem + ".similarity.json")


def write_json(path: Path, value: object) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _resume(output: Path, index: SimilarityIndex) -> tuple[list[Example], list[dict]]:
    """What an earlier run kept, and its similarity figures; figures missing or stale are recomputed."""
    if not output.exists():
        return [], []
    kept = load_examples(output)
    try:
        saved = json.loads(similarity_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = []
    similarity = []
    for i, task in enumerate(kept):
        ok = i < len(saved) and isinstance(saved[i], dict) and saved[i].get("instruction") == task.instruction
        similarity.append(saved[i] if ok else index.similarity(task.instruction))
        index.add(task.instruction)
    if similarity != saved:
        write_json(similarity_path(output), similarity)
    return kept, similarity


async def _with_retries(complete: Complete, prompt: str, max_retries: int, backoff: float, report: Report, log: Callable[[str], None]) -> Reply:
    attempt = 0
    while True:
        try:
            return await complete(prompt)
        except openai.APIError as e:
            reason, attempt = retry_reason(e), attempt + 1
            if reason is None or attempt > max_retries:
                raise
            wait = min(backoff * 2 ** (attempt - 1), 60.0)
            report.retries += 1
            log(f"retry {attempt}/{max_retries} after {reason}, waiting {wait:.1f}s")
            await asyncio.sleep(wait)


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


async def generate(
    seeds: list[Example], output: Path, num_instructions: int, complete: Complete, report: Report, *,
    concurrency: int = 5, num_prompt_tasks: int = 3, language: str = "en", max_retries: int = 5,
    backoff: float = 1.0, rng: random.Random | None = None, log: Callable[[str], None] = _log, progress: bool = True,
) -> None:  # fmt: skip
    """Request until `num_instructions` are kept in `output` (Alpaca JSON), continuing what it already holds.

    After each reply that kept something, `output` and its similarity side file are rewritten atomically,
    so a kill loses at most the replies in flight.
    """
    if len(seeds) < num_prompt_tasks:
        raise ValueError(f"{len(seeds)} seed tasks; each request shows {num_prompt_tasks}")
    rng = rng or random.Random()
    output = Path(output)
    index = SimilarityIndex(language)
    for seed in seeds:
        index.add(seed.instruction)
    kept, similarity = _resume(output, index)
    report.already_kept = report.total_kept = len(kept)
    if kept:
        log(f"{output}: continuing from {len(kept)} kept instructions")
    bar = tqdm(total=num_instructions, initial=min(len(kept), num_instructions), unit="instruction", disable=not progress, file=sys.stderr)
    pending: list[asyncio.Task] = []
    done: list[asyncio.Task] = []
    try:
        while len(kept) < num_instructions:
            while len(pending) < concurrency:
                prompt = encode_prompt(rng.sample(seeds, num_prompt_tasks), language)  # seed tasks only, as Stanford
                pending.append(asyncio.create_task(_with_retries(complete, prompt, max_retries, backoff, report, log)))
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done, pending = [t for t in pending if t.done()], [t for t in pending if not t.done()]
            before = len(kept)
            for task in done:  # in the order requested, so a run is reproducible given its replies
                reply = task.result()
                report.requests += 1
                report.prompt_tokens += reply.prompt_tokens
                report.completion_tokens += reply.completion_tokens
                items, dropped = parse_reply(reply.text, reply.finish_reason, num_prompt_tasks)
                report.removed.update(dropped)
                report.candidates += sum(dropped.values())
                for item in items:
                    if len(kept) == num_instructions:
                        break
                    report.candidates += 1
                    reason = rejection(item, language)
                    figures = None if reason else index.similarity(item.instruction)
                    if figures and max(figures["most_similar_instructions"].values(), default=0.0) > SIMILARITY_THRESHOLD:
                        reason = "similar"
                    if reason:
                        report.removed[reason] += 1
                        continue
                    kept.append(item)
                    similarity.append(figures)
                    index.add(item.instruction)
            if len(kept) > before:
                write_json(similarity_path(output), similarity)
                write_json(output, [asdict(t) for t in kept])
                report.kept += len(kept) - before
                report.total_kept = len(kept)
                bar.update(len(kept) - before)
            bar.set_postfix(requests=report.requests, retries=report.retries, refresh=False)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *done, return_exceptions=True)  # also retrieves the errors not raised
        bar.close()


# The clean pass: AlpacaDataCleaned's rules (gururise/AlpacaDataCleaned), applied mechanically.
NOINPUT = {"<noinput>", "noinput", "no input", "<no input>", "<none>", "none", "n/a", "na", "null", "nan", "-",
           "no input required", "not applicable", "<empty>", "empty", "input: none"}  # fmt: skip
NA_OUTPUT = {"n/a", "na", "not applicable", "<nooutput>", "nooutput", "no output", "<no output>"}
URL = re.compile(r"https?://|www\.\w", re.IGNORECASE)
IMAGE = re.compile(r"!\[|<img\b|\.(png|jpe?g|gif|bmp|svg|webp|tiff?)\b", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # control characters but newline and tab


def _clean_rule(instruction: str, input: str, output: str) -> str | None:
    if not instruction:
        return "empty_instruction"
    if not output:
        return "empty_output"
    if output.strip(" .").lower() in NA_OUTPUT:
        return "na_output"
    if any(LABEL.search(f) for f in (instruction, input, output)):
        return "label_fragment"  # a merged or split-up generation: "2. Instruction: ..." left in a field
    if URL.search(input):
        return "url_in_input"
    if IMAGE.search(input):
        return "image_in_input"
    return None


def clean(records: list[tuple[str, object]], language: str = "en") -> tuple[list[Example], dict]:
    """Records that pass, and a report: how many each rule removed or fixed, with up to 3 examples each."""
    kept: list[Example] = []
    removed, fixed, examples = Counter(), Counter(), {}
    seen: set[tuple[str, str]] = set()
    index = SimilarityIndex(language)
    for where, record in records:
        fields = [record.get(k, "") if isinstance(record, dict) else None for k in ("instruction", "input", "output")]
        if not all(isinstance(f, str) for f in fields):
            rule, instruction = "malformed", str(record)[:80]
        else:
            if any(CONTROL.search(f) for f in fields):
                fixed["control_characters"] += 1
                fields = [CONTROL.sub("", f) for f in fields]
            instruction, input, output = (f.strip() for f in fields)
            if input and input.strip(" .").lower() in NOINPUT:
                fixed["noinput_spelling"] += 1
                input = ""
            rule = _clean_rule(instruction, input, output)
            text = f"{instruction} {input}"
            key = (" ".join(instruction.split()).lower(), " ".join(input.split()).lower())
            if rule is None and key in seen:
                rule = "exact_duplicate"
            elif rule is None and max(index.scores(text), default=0.0) > SIMILARITY_THRESHOLD:
                rule = "near_duplicate"  # ROUGE-L on instruction + input, as generation does on instructions
        if rule:
            removed[rule] += 1
            if removed[rule] <= 3:
                examples.setdefault(rule, []).append(f"{where}: {instruction[:80]}")
            continue
        seen.add(key)
        index.add(text)
        kept.append(Example(instruction, input, output))
    report = {"records": len(records), "kept": len(kept), "removed": dict(removed.most_common()), "fixed": dict(fixed), "examples": examples}
    return kept, report


def clean_file(source: Path, output: Path, language: str = "en") -> dict:
    """Clean an Alpaca JSON or JSONL file into `output` (Alpaca JSON); returns the report."""
    kept, report = clean(_records(Path(source)), language)
    write_json(Path(output), [asdict(t) for t in kept])
    return {"input": str(source), "output": str(output)} | report
