"""generate_data.py: Stanford's parsing and filters on recorded replies, retries, resumption, the clean pass."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx2
import openai
import pytest
from rouge_score import rouge_scorer

import generate_data
from alpaca_cog import selfinstruct
from alpaca_cog.data import Example, load_examples
from alpaca_cog.selfinstruct import Reply, Report, SimilarityIndex, encode_prompt, parse_reply, rejection
from conftest import DATA, FIXTURES, ROOT, free_port, serve_py

SEEDS = DATA / "alpaca_seed_tasks.jsonl"
REPLIES = FIXTURES / "selfinstruct"


def reply(name: str) -> str:
    return (REPLIES / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def seeds() -> list[Example]:
    return selfinstruct.load_seed_tasks(SEEDS)


class FakeServer:
    """An injected `complete`: answers from a list of replies (or raises the exceptions in it), in order."""

    def __init__(self, answers: list, check=None):
        self.answers, self.check, self.prompts = list(answers), check, []

    async def __call__(self, prompt: str) -> Reply:
        self.prompts.append(prompt)
        if self.check:
            self.check()
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, Reply) else Reply(answer, "stop", 1000, 500)


def run(seeds, output: Path, num_instructions: int, server: FakeServer, report: Report | None = None, **kwargs) -> tuple[Report, list[str]]:
    report, log = report or Report(), []
    options = dict(concurrency=1, backoff=0.0, rng=random.Random(0), log=log.append, progress=False) | kwargs
    asyncio.run(selfinstruct.generate(seeds, output, num_instructions, server, report, **options))
    return report, log


def fresh_reply(n: int, items: int = 3) -> str:
    """A completion with `items` instructions no earlier one resembles (ROUGE-L 0.6 at most)."""
    body = "###\n".join(f"{k}. Instruction: Summarize item{n}x{k} versus part{n}y{k} quickly\n{k}. Input:\n<noinput>\n{k}. Output:\nAnswer {n}.{k}\n"
                         for k in range(4, 4 + items))  # fmt: skip
    return body.removeprefix("4. Instruction:") + "###\n"


def test_prompt_is_stanfords_with_the_seed_tasks_numbered(seeds):
    assert selfinstruct.PROMPT.startswith("You are asked to come up with a set of 20 diverse task instructions.")
    assert selfinstruct.PROMPT.endswith("List of 20 tasks:\n") and len(selfinstruct.PROMPT) == 1751
    tasks = [Example("Add  the numbers:", "2 3", "5"), Example("Name a color.", "", "Blue")]
    assert encode_prompt(tasks) == selfinstruct.PROMPT + (
        "\n###\n1. Instruction: Add the numbers\n1. Input:\n2 3\n1. Output:\n5\n"
        "###\n2. Instruction: Name a color.\n2. Input:\n<noinput>\n2. Output:\nBlue\n###\n3. Instruction:"
    )
    assert "3. The instructions should be in Chinese." in encode_prompt(tasks, "zh")
    assert len(seeds) == 175 and seeds[1].instruction == "What is the relation between the given pairs?"


def test_completion_reply_parses_into_exact_records():
    items, dropped = parse_reply(reply("completion_en.txt"), "stop", 3)
    assert dropped == {"malformed": 1}  # 15. has no Input
    assert items[0] == Example(
        "Classify the sentiment of the following customer review as positive, negative or neutral.",
        "The delivery was two days late, but the jacket fits perfectly and keeps me warm on my morning walks.",
        "Positive. The customer is unhappy about the late delivery but satisfied with the product itself.",
    )
    assert items[1] == Example(
        "What are three practical ways to reduce food waste at home?", "",
        "1. Plan meals for the week and buy only what the recipes need.\n2. Store leftovers in clear containers so they are "
        "not forgotten.\n3. Freeze bread, fruit and cooked grains before they spoil.",
    )  # fmt: skip
    assert items[10] == Example("Suggest a catchy title for a blog post about remote work productivity.", "", "")
    assert [len(i.instruction.split()) for i in items[4:6]] == [3, 181]
    assert len(items) == 13


def test_chat_reply_cut_by_length_drops_its_last_item():
    items, dropped = parse_reply(reply("chat_length_en.txt"), "length", 3)
    assert dropped == {"truncated": 1}  # the preamble "Sure! Here are..." is no item at all
    assert items == [
        Example("Explain the difference between weather and climate to a ten-year-old.", "",
                "Weather is what the sky is doing today, like rain or sunshine. Climate is what the weather is usually like in a place over many years."),
        Example("Rewrite the following sentence in the passive voice.", "The committee approved the new budget on Monday.",
                "The new budget was approved by the committee on Monday."),
        Example("Estimate how many minutes it takes to walk 3 kilometers at an average pace.", "",
                "About 36 minutes, at an average walking pace of 5 kilometers per hour."),
    ]  # fmt: skip
    assert parse_reply(reply("chat_length_en.txt"), "stop", 3)[0][3].output == "Failing once does not define you. Most drivers"


@pytest.mark.parametrize(
    "name, language, reasons",
    [
        ("completion_en.txt", "en", [None, None, "blacklist", None, "too_short", "too_long", "punctuation_start", "write_a_program",
                                     None, "non_ascii_start", "empty_output", None, None]),
        ("chat_zh.txt", "zh", [None, "blacklist", "too_short", "punctuation_start", None, None]),
        ("chat_zh.txt", "en", ["too_short"] * 6),  # Stanford's rules: a Chinese sentence is one "word"
    ],
)  # fmt: skip
def test_every_filter_on_recorded_replies(name, language, reasons):
    items, _ = parse_reply(reply(name), "stop", 3)
    assert [rejection(i, language) for i in items] == reasons
    assert rejection(Example("Summarize the product roadmap below in two sentences.", "", "x")) is None  # "map" only as a word
    assert rejection(Example("How do I go to the station from here?", "", "x")) == "blacklist"


@pytest.mark.parametrize(
    "name, language, kept, removed",
    [
        ("completion_en.txt", "en", [0, 1, 3, 12], {"malformed": 1, "blacklist": 1, "too_short": 1, "too_long": 1, "punctuation_start": 1,
                                                     "write_a_program": 1, "similar": 2, "non_ascii_start": 1, "empty_output": 1}),
        ("chat_zh.txt", "zh", [0, 5], {"blacklist": 1, "too_short": 1, "punctuation_start": 1, "similar": 1}),
    ],
)  # fmt: skip
def test_generation_keeps_what_passes_and_counts_each_filter(tmp_path, seeds, name, language, kept, removed):
    out = tmp_path / "data.json"
    report, _ = run(seeds, out, len(kept), FakeServer([reply(name)]), language=language)
    items, _ = parse_reply(reply(name), "stop", 3)
    assert load_examples(out) == [items[i] for i in kept]
    # "similar": 12. is a seed task reworded (ROUGE-L 0.875), 16. (and zh 8.) an item kept earlier in the same reply
    assert report.removed == Counter(removed) and report.kept == len(kept)
    assert report.candidates == len(kept) + sum(removed.values()) and (report.requests, report.prompt_tokens) == (1, 1000)
    figures = json.loads(selfinstruct.similarity_path(out).read_text(encoding="utf-8"))
    assert [f["instruction"] for f in figures] == [items[i].instruction for i in kept]
    assert all(len(f["most_similar_instructions"]) == 10 and 0 <= f["avg_similarity_score"] < 0.7 for f in figures)


def test_similarity_equals_rouge_score(seeds):
    class Characters:
        def tokenize(self, text):
            return selfinstruct.words(text, "zh")

    for language, scorer in [("en", rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)),
                             ("zh", rouge_scorer.RougeScorer(["rougeL"], tokenizer=Characters()))]:  # fmt: skip
        index = SimilarityIndex(language)
        known = [s.instruction for s in seeds] + [i.instruction for i in parse_reply(reply("chat_zh.txt"), "stop", 3)[0]]
        for instruction in known:
            index.add(instruction)
        for item in parse_reply(reply("completion_en.txt"), "stop", 3)[0] + parse_reply(reply("chat_zh.txt"), "stop", 3)[0]:
            expected = [scorer.score(item.instruction, k)["rougeL"].fmeasure for k in known]
            assert index.scores(item.instruction) == expected


def test_retries_429_5xx_and_timeouts_and_says_so(tmp_path, seeds):
    request = httpx2.Request("POST", "http://127.0.0.1:8000/v1/chat/completions")
    errors = [openai.RateLimitError("slow down", response=httpx2.Response(429, request=request), body=None),
              openai.InternalServerError("oops", response=httpx2.Response(503, request=request), body=None),
              openai.APITimeoutError(request=request), openai.APIConnectionError(request=request)]  # fmt: skip
    report, log = run(seeds, tmp_path / "data.json", 3, FakeServer([*errors, fresh_reply(0)]))
    assert log == ["retry 1/5 after 429, waiting 0.0s", "retry 2/5 after 503, waiting 0.0s",
                   "retry 3/5 after a timeout, waiting 0.0s", "retry 4/5 after a connection error, waiting 0.0s"]  # fmt: skip
    assert (report.retries, report.requests, report.kept) == (4, 1, 3)
    with pytest.raises(openai.InternalServerError):  # gives up after max_retries
        run(seeds, tmp_path / "other.json", 3, FakeServer(errors[1:2] * 3), max_retries=2)
    bad = openai.BadRequestError("no such model", response=httpx2.Response(400, request=request), body=None)
    report = Report()
    with pytest.raises(openai.BadRequestError):  # not worth retrying
        run(seeds, tmp_path / "other.json", 3, FakeServer([bad]), report)
    assert report.retries == 0 and not (tmp_path / "other.json").exists()


def test_killed_run_resumes_and_loses_nothing_kept(tmp_path, seeds):
    out = tmp_path / "data.json"
    sizes = []

    def never_half_written():  # every time a request goes out, the output is whole Alpaca JSON
        if out.exists():
            sizes.append(len(load_examples(out)))
            assert len(json.loads(selfinstruct.similarity_path(out).read_text())) >= sizes[-1]

    killer = FakeServer([fresh_reply(1), fresh_reply(2), fresh_reply(3), KeyboardInterrupt()], never_half_written)
    with pytest.raises(KeyboardInterrupt):
        run(seeds, out, 20, killer, concurrency=2)
    first = json.loads(out.read_text())
    assert len(first) == 6 and sizes == sorted(sizes)  # 2 replies processed; the 3rd, unprocessed at the kill, is lost
    # The rerun repeats an instruction kept before the kill: it counts as similar, and nothing kept is lost.
    again = [Reply(fresh_reply(1, items=1), "stop")] + [fresh_reply(n) for n in range(10, 20)]
    report, log = run(seeds, out, 20, FakeServer(again, never_half_written), concurrency=2)
    final = json.loads(out.read_text())
    assert len(final) == 20 and final[: len(first)] == first and log == [f"{out}: continuing from {len(first)} kept instructions"]
    assert (report.already_kept, report.kept, report.removed) == (len(first), 20 - len(first), {"similar": 1})
    figures = json.loads(selfinstruct.similarity_path(out).read_text())
    assert [f["instruction"] for f in figures] == [r["instruction"] for r in final]
    assert not list(tmp_path.glob(".*partial*"))


def test_a_kill_while_writing_keeps_the_previous_files(tmp_path, seeds, monkeypatch):
    out = tmp_path / "data.json"
    run(seeds, out, 3, FakeServer([fresh_reply(1)]))
    before = out.read_text(), selfinstruct.similarity_path(out).read_text()

    def half_then_killed(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(selfinstruct.Path, "write_text", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        run(seeds, out, 6, FakeServer([fresh_reply(2)]))
    monkeypatch.undo()
    assert (out.read_text(), selfinstruct.similarity_path(out).read_text()) == before
    assert not list(tmp_path.glob(".*partial*"))


def test_similarity_side_file_is_recomputed_when_missing(tmp_path, seeds):
    out = tmp_path / "data.json"
    run(seeds, out, 3, FakeServer([fresh_reply(1)]))
    side = selfinstruct.similarity_path(out)
    figures = side.read_text()
    side.unlink()
    run(seeds, out, 3, FakeServer([]))
    assert side.read_text() == figures


def test_openai_client_chat_and_completions_on_the_wire():
    bodies = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        bodies.append((request.url.path, request.headers["authorization"], json.loads(request.content or "null")))
        usage = {"prompt_tokens": 700, "completion_tokens": 300, "total_tokens": 1000}
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": "smollm2", "object": "model", "created": 0, "owned_by": "me"}]})
        if request.url.path.endswith("/chat/completions"):
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "4. Instruction: x"}}
            return httpx2.Response(200, json={"id": "1", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice], "usage": usage})
        choice = {"index": 0, "finish_reason": "stop", "text": " y", "logprobs": None}
        return httpx2.Response(200, json={"id": "1", "object": "text_completion", "created": 0, "model": "m", "choices": [choice], "usage": usage})

    async def calls():
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        async with openai.AsyncOpenAI(base_url="http://server/v1", api_key="EMPTY", max_retries=0, http_client=http) as client:
            model = await selfinstruct.first_model(client)
            chat = await selfinstruct.openai_complete(client, model, "chat")("the prompt")
            completion = await selfinstruct.openai_complete(client, model, "completions", 64, 0.5, 0.9)("the prompt")
            return chat, completion

    chat, completion = asyncio.run(calls())
    assert chat == Reply("4. Instruction: x", "length", 700, 300) and completion == Reply(" y", "stop", 700, 300)
    assert bodies[0] == ("/v1/models", "Bearer EMPTY", None)
    assert bodies[1] == ("/v1/chat/completions", "Bearer EMPTY", {"model": "smollm2", "max_tokens": 3072, "temperature": 1.0, "top_p": 1.0,
                         "stop": ["\n20", "20."], "messages": [{"role": "user", "content": "the prompt"}]})  # fmt: skip
    assert bodies[2][2] == {"model": "smollm2", "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "stop": ["\n20", "20."], "prompt": "the prompt"}


def test_clean_removes_and_fixes_by_alpacadatacleaneds_rules(tmp_path, capsys):
    records = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep enough and move every day."},
        {"instruction": "Describe a sunset over the ocean.", "input": "", "output": "  "},
        {"instruction": "Find the capital city of Atlantis.", "input": "", "output": "N/A"},
        {"instruction": "Suggest a name for a bakery that sells vegan cakes.", "input": "<No Input>", "output": "Green Crumbs"},
        {"instruction": "Rewrite the sentence in formal English.", "input": "gonna be late", "output": "I am going to be late.\n5. Instruction: Translate it into German."},
        {"instruction": "Summarize the article.", "input": "https://www.example.com/news/123", "output": "A new park opened."},
        {"instruction": "Describe what the photo shows.", "input": '<img src="cat.jpg">', "output": "A cat on a sofa."},
        {"instruction": "Explain what a haiku is.\x07", "input": "No input required.", "output": "A three-line poem\x00 of 5, 7 and 5 syllables."},
        {"instruction": "give three tips  for staying healthy.", "input": "", "output": "Drink water."},
        {"instruction": "Suggest a name for a bakery that sells vegan pastries.", "input": "", "output": "Leaf & Loaf"},
        {"instruction": "Add the numbers.", "input": "2 3", "output": 5},
        ["not", "a", "record"],
        {"instruction": "Translate to French.", "input": "Good night", "output": "Bonne nuit"},
        {"instruction": " ", "input": "", "output": "x"},
    ]  # fmt: skip
    source = tmp_path / "alpaca.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert generate_data.main(["--clean", str(source), "--output", str(tmp_path / "clean.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert load_examples(tmp_path / "clean.json") == [
        Example("Give three tips for staying healthy.", "", "Eat well, sleep enough and move every day."),
        Example("Suggest a name for a bakery that sells vegan cakes.", "", "Green Crumbs"),
        Example("Explain what a haiku is.", "", "A three-line poem of 5, 7 and 5 syllables."),
        Example("Translate to French.", "Good night", "Bonne nuit"),
    ]
    assert report["removed"] == {"empty_output": 1, "na_output": 1, "label_fragment": 1, "url_in_input": 1, "image_in_input": 1,
                                 "exact_duplicate": 1, "near_duplicate": 1, "malformed": 2, "empty_instruction": 1}  # fmt: skip
    assert report["fixed"] == {"noinput_spelling": 2, "control_characters": 1}
    assert (report["records"], report["kept"]) == (14, 4)
    assert report["examples"]["near_duplicate"] == ["line 10: Suggest a name for a bakery that sells vegan pastries."]


def test_bad_seed_file_is_named_with_its_line_and_no_traceback(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a b c d", "instances": [{"input": "", "output": "e"}]}\n{"instruction": "f g h i"}\n')
    result = subprocess.run([sys.executable, "generate_data.py", "--seed_tasks", str(seeds), "--output", str(tmp_path / "data.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {seeds}: line 2: missing field 'output'"


def test_unreachable_server_and_bad_output_file_are_errors(tmp_path, capsys):
    common = ["--seed_tasks", str(SEEDS), "--base_url", f"http://127.0.0.1:{free_port()}/v1", "--max_retries", "0"]
    assert generate_data.main([*common, "--output", str(tmp_path / "data.json")]) == 1
    assert "error: cannot reach http://127.0.0.1:" in capsys.readouterr().err
    (tmp_path / "half.json").write_text('[{"instruction": "a b c d", "input": "", "output": "e"},\n{"instr')
    assert generate_data.main([*common, "--output", str(tmp_path / "half.json")]) == 1
    assert f"error: {tmp_path / 'half.json'}: line 2, column" in capsys.readouterr().err


def test_end_to_end_on_serve_py_resumes_after_a_kill_and_trains(tmp_path, weights_dir):
    """A small data set from the seed tasks by SmolLM2 through serve.py; SIGKILLed midway, rerun, then trained on."""
    out = tmp_path / "data.json"
    with serve_py(tmp_path) as server:
        # Short replies at a lower temperature: SmolLM2 at 1.0 often rambles to max_tokens without a usable item,
        # and each 512-token reply takes a minute on 2 cores.
        generate = [sys.executable, "generate_data.py", "--seed_tasks", str(SEEDS), "--output", str(out), "--num_instructions", "3",
                    "--base_url", f"{server.url}/v1", "--api", "completions", "--max_tokens", "160", "--temperature", "0.7", "--concurrency", "2"]  # fmt: skip
        killed = subprocess.Popen(generate, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not out.exists():
            assert killed.poll() is None, killed.communicate()
            assert time.monotonic() < deadline, "nothing kept in 10 minutes"
            time.sleep(0.2)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        first = json.loads(out.read_text())
        assert 1 <= len(first) and load_examples(out)
        resumed = subprocess.run(generate, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        report = json.loads(resumed.stdout)
        final = json.loads(out.read_text())
        assert len(final) == 3 and final[: len(first)] == first and report["already_kept"] == len(first)
        if len(first) < 3:  # the killed run's first reply may already have held all three
            assert report["requests"] >= 1 and report["completion_tokens"] > 0
        print(json.dumps(report, indent=2), json.dumps(final, indent=2, ensure_ascii=False), sep="\n")
    env = {**os.environ, "ALPACA_COG_CHECKPOINTS": str(tmp_path / "ckpt")}
    trained = subprocess.run([sys.executable, "train.py", "--train_data", str(out), "--max_steps", "2", "--batch_size", "2", "--micro_batch_size", "2",
                              "--val_set_size", "0", "--checkpoint_steps", "0", "--output_path", str(tmp_path / "out.tar")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "out.tar").is_file()
