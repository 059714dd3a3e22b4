"""The batching engine on a tiny random LLaMA: batched answers equal single ones, per-request parameters,
stop strings, adapters and cancellation stay per request."""

import threading
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model

from alpaca_cog.engine import BASE, Engine, Request, emittable
from alpaca_cog.generate import GenerationParams, complete
from alpaca_cog.model import load_tokenizer
from alpaca_cog.prompts import encode_prompt
from conftest import tiny_llama

GREEDY = GenerationParams(temperature=0, max_tokens=16)
PROMPTS = ["Name a color.", "Say hello to the alpacas, twice, and then once more.", "2+2?", "Write a long poem about the sea and the sky."]


@pytest.fixture(scope="module")
def tokenizer(weights_dir):
    return load_tokenizer(weights_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False, max_position_embeddings=256)


def prompt_ids(tokenizer, text: str) -> list[int]:
    return encode_prompt(tokenizer, "alpaca", text)


def test_batched_greedy_answers_equal_each_answered_alone(model, tokenizer):
    requests = [Request(prompt_ids(tokenizer, p), GREEDY) for p in PROMPTS]
    alone = [complete(model, tokenizer, r.prompt_ids, GREEDY) for r in requests]  # transformers' generate()
    results = Engine(model, tokenizer).complete(requests)
    assert [r.text for r in results] == alone
    assert all(r.output_tokens == 16 and r.finish_reason == "length" for r in results)


def test_a_request_joins_a_running_batch_and_answers_as_alone(model, tokenizer):
    engine = Engine(model, tokenizer)
    long = Request(prompt_ids(tokenizer, PROMPTS[3]), GenerationParams(temperature=0, max_tokens=120))
    first = engine.submit(long)
    pieces = iter(first)
    next(pieces)  # the first request is decoding
    late = engine.complete([Request(prompt_ids(tokenizer, PROMPTS[1]), GREEDY)])[0]
    rest = "".join(pieces)
    assert late.text == complete(model, tokenizer, prompt_ids(tokenizer, PROMPTS[1]), GREEDY)
    assert first.result.text == complete(model, tokenizer, long.prompt_ids, long.params)
    assert rest and first.result.output_tokens == 120


def test_each_request_keeps_its_own_sampling_and_seed(model, tokenizer):
    ids = prompt_ids(tokenizer, PROMPTS[0])
    hot = GenerationParams(temperature=1.5, top_k=0, top_p=1.0, max_tokens=12, seed=7)
    engine = Engine(model, tokenizer)
    alone = engine.complete([Request(ids, hot)])[0].text
    together = engine.complete([Request(ids, GREEDY), Request(ids, hot), Request(ids, hot)])
    assert together[0].text == complete(model, tokenizer, ids, GREEDY)
    assert together[1].text == together[2].text == alone  # the seed decides, not the neighbours
    other = engine.complete([Request(ids, GenerationParams(**{**hot.__dict__, "seed": 8}))])[0].text
    assert other != alone


def test_stop_strings_end_the_answer_across_token_boundaries_and_are_never_returned(model, tokenizer):
    ids = prompt_ids(tokenizer, PROMPTS[1])
    full = Engine(model, tokenizer).complete([Request(ids, GenerationParams(temperature=0, max_tokens=24))])[0].text
    pieces = tokenizer(full, add_special_tokens=False)["input_ids"]
    # a stop string made of the end of one token and the start of the next
    boundary = len(tokenizer.decode(pieces[:5]))
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and full.find(stop) == boundary - 2  # precondition
    engine = Engine(model, tokenizer)
    handle = engine.submit(Request(ids, GenerationParams(temperature=0, max_tokens=24), stop=["zzz-never", stop]))
    streamed = list(handle)
    assert "".join(streamed) == full[: boundary - 2] == handle.result.text
    assert handle.result.finish_reason == "stop"


def test_emittable_holds_back_what_may_begin_a_stop_string():
    assert emittable("Hello ##", 0, ["### Instruction:"]) == (6, False)
    assert emittable("Hello ### Instruction: more", 0, ["### Instruction:"]) == (6, True)
    assert emittable("caf\ufffd", 0, []) == (3, False)
    assert emittable("plain", 2, ["xyz"]) == (5, False)


def test_cancelling_one_request_leaves_the_others_unchanged(model, tokenizer):
    engine = Engine(model, tokenizer)
    requests = [Request(prompt_ids(tokenizer, p), GREEDY) for p in PROMPTS[:3]]
    doomed = engine.submit(Request(prompt_ids(tokenizer, PROMPTS[3]), GenerationParams(temperature=0, max_tokens=200)))
    handles = [engine.submit(r) for r in requests]
    next(iter(doomed))
    doomed.cancel()
    answers = ["".join(h) for h in handles]
    assert answers == [complete(model, tokenizer, r.prompt_ids, GREEDY) for r in requests]
    deadline = time.monotonic() + 30
    while doomed.result.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert doomed.result.finish_reason == "cancelled" and doomed.result.output_tokens < 200


def test_requests_for_different_adapters_in_one_batch_answer_as_each_alone(tokenizer, tmp_path):
    """PEFT's mixed-adapter batches: base, adapter a and adapter b decoded together."""
    folders = {}
    for name, seed in [("a", 1), ("b", 2)]:
        model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)
        torch.manual_seed(seed)  # after tiny_llama, which seeds itself
        lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    base = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)
    engine = Engine(base, tokenizer)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    ids = prompt_ids(tokenizer, PROMPTS[1])
    results = engine.complete([Request(ids, GREEDY, adapter=a) for a in [None, "a", "b", "a"]])
    alone = {}
    for name in [None, "a", "b"]:
        single = Engine(engine.model, tokenizer, default_adapter=BASE)  # not the PeftModel's active adapter
        alone[name] = single.complete([Request(ids, GREEDY, adapter=name)])[0].text
    assert [r.text for r in results] == [alone[None], alone["a"], alone["b"], alone["a"]]
    assert len(set(alone.values())) == 3  # the adapters really change the answer
    with engine.model.disable_adapter():
        assert alone[None] == complete(engine.model, tokenizer, ids, GREEDY)
    engine.model.set_adapter("b")  # a PeftModel handed over as is (an unmerged setup adapter, a model in training)
    assert Engine(engine.model, tokenizer).complete([Request(ids, GREEDY)])[0].text == alone["b"]


def test_context_limits_are_checked_before_decoding(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match=r"prompt: 256 tokens .* context holds 256"):
        engine.submit(Request([7] * 256, GREEDY))
    result = engine.complete([Request([7] * 250, GenerationParams(temperature=0, max_tokens=50))])[0]
    assert result.input_tokens + result.output_tokens <= 256


def test_beam_search_and_logprobs(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = prompt_ids(tokenizer, PROMPTS[0])
    beams = GenerationParams(beams=3, temperature=0, max_tokens=6)
    assert engine.complete([Request(ids, beams)])[0].text == complete(model, tokenizer, ids, beams)
    result = engine.complete([Request(ids, GenerationParams(temperature=0, max_tokens=4), logprobs=2)])[0]
    assert len(result.tokens) == 4
    first = result.tokens[0]
    assert first["logprob"] == pytest.approx(first["top"][0][1]) and first["top"][0][1] >= first["top"][1][1]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1).max()
    assert first["logprob"] == pytest.approx(float(expected), abs=1e-4)


def test_engine_is_usable_from_many_threads(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS]
    answers: dict[int, str] = {}

    def client(i: int) -> None:
        answers[i] = "".join(engine.submit(Request(ids[i % 4], GREEDY)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = [complete(model, tokenizer, i, GREEDY) for i in ids]
    assert [answers[i] for i in range(8)] == expected * 2


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (4, 0.5)])
def test_sampling_draws_from_the_distribution_generate_samples_from(top_k, top_p):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from alpaca_cog.engine import sample

    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2
    params = GenerationParams(temperature=0.7, top_k=top_k, top_p=top_p)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))  # fmt: skip
    expected = warpers(None, logits[None])[0].softmax(-1)
    generator = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([sample(logits, params, generator) for _ in range(20_000)]), minlength=12)
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())  # never outside top-k/top-p
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)

