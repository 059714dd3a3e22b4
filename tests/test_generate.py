"""Prompt templates, response extraction and stopping, on a tiny random LLaMA (fast)."""

import threading

import pytest
import torch

from transformers import CompileConfig

from alpaca_cog.generate import GenerationParams, complete, stream, use_compiled_decoding
from alpaca_cog.model import load_tokenizer
from alpaca_cog.prompts import ALPACA_NO_INPUT, build_prompt, encode_prompt
from conftest import tiny_llama

GREEDY = GenerationParams(temperature=0, max_tokens=12)
HELLO = [28120, 905]


@pytest.fixture(scope="module")
def tokenizer(weights_dir):
    return load_tokenizer(weights_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding written out: argmax of the last position's logits, n times, no cache."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            out.append(next_id)
    return out


def test_alpaca_template_is_stanford_alpacas():
    assert build_prompt("alpaca", "Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    with_input = build_prompt("alpaca", "Translate.", input="Bonjour")
    assert "paired with an input" in with_input and with_input.endswith("### Input:\nBonjour\n\n### Response:\n")
    assert ALPACA_NO_INPUT.format(instruction="x") == build_prompt("alpaca", "x")


def test_chat_template_is_the_tokenizers(tokenizer):
    prompt = build_prompt("chat", "Hello there", tokenizer=tokenizer)
    assert prompt.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt("none", "Once upon a time") == "Once upon a time"


def test_unknown_template_or_missing_chat_template_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="prompt_template"):
        build_prompt("vicuna", "x")
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt("chat", "x", tokenizer=None)


def test_prompt_tokens_are_the_tokenizers_own(tokenizer):
    ids = encode_prompt(tokenizer, "alpaca", "Hi")
    assert ids == tokenizer(build_prompt("alpaca", "Hi"))["input_ids"]
    chat = encode_prompt(tokenizer, "chat", "Hi")
    assert tokenizer.decode(chat) == build_prompt("chat", "Hi", tokenizer=tokenizer)


def test_greedy_stream_equals_written_out_greedy_and_excludes_the_prompt(model, tokenizer):
    prompt_ids = encode_prompt(tokenizer, "alpaca", "Name a color.")
    expected = reference_greedy(model, prompt_ids, GREEDY.max_tokens)
    assert tokenizer.eos_token_id not in expected  # precondition: no early stop in this sample
    stats: dict = {}
    pieces = list(stream(model, tokenizer, prompt_ids, GREEDY, stats))
    assert "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)
    assert stats == {"input_tokens": len(prompt_ids), "output_tokens": GREEDY.max_tokens}
    assert len(pieces) > 1  # streamed, not returned whole


def test_generation_stops_at_eos(model, tokenizer):
    prompt_ids = encode_prompt(tokenizer, "alpaca", "Name a color.")
    greedy = reference_greedy(model, prompt_ids, 6)
    k, eos = 3, tokenizer.eos_token_id
    assert greedy[k] not in greedy[:k] and eos not in greedy[:k]
    stopping = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)
    with torch.no_grad():  # swap the output rows so the model says EOS where it said greedy[k]
        w = stopping.lm_head.weight
        w[[greedy[k], eos]] = w[[eos, greedy[k]]]
    stats: dict = {}
    text = "".join(stream(stopping, tokenizer, prompt_ids, GREEDY, stats))
    assert text == tokenizer.decode(greedy[:k], skip_special_tokens=True)
    assert stats["output_tokens"] == k


def test_beams_and_sampling_respect_max_tokens(model, tokenizer):
    for params in [GenerationParams(beams=3, max_tokens=5), GenerationParams(temperature=1.0, max_tokens=5, seed=0)]:
        stats: dict = {}
        list(stream(model, tokenizer, HELLO, params, stats))
        assert 1 <= stats["output_tokens"] <= 5


def test_vanishing_temperature_decodes_greedily(model, tokenizer):
    # found by fuzzing the server: 2.2e-309 > 0 made logits / T overflow into NaN probabilities
    for temperature in [2.225073858507203e-309, 1e-6]:
        cold = complete(model, tokenizer, HELLO, GenerationParams(temperature=temperature, max_tokens=8, seed=0))
        assert cold == complete(model, tokenizer, HELLO, GenerationParams(temperature=0, max_tokens=8))


def test_same_seed_same_sample(model, tokenizer):
    params = GenerationParams(temperature=1.5, top_k=0, top_p=1.0, max_tokens=10, seed=7)
    assert complete(model, tokenizer, HELLO, params) == complete(model, tokenizer, HELLO, params)


def test_closing_the_stream_stops_generation(model, tokenizer):
    before = threading.active_count()
    pieces = stream(model, tokenizer, HELLO, GenerationParams(temperature=0, max_tokens=100_000))
    next(pieces)
    pieces.close()  # what Cog does when a prediction is cancelled mid-stream
    assert threading.active_count() == before


def test_prompt_longer_than_context_is_refused_and_max_tokens_is_cut(model, tokenizer):
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"prompt: \d+ tokens .* context holds 128"):
        list(stream(model, tokenizer, [7] * context, GREEDY))
    stats: dict = {}
    list(stream(model, tokenizer, [7] * (context - 4), GenerationParams(temperature=0, max_tokens=50), stats))
    assert stats["input_tokens"] + stats["output_tokens"] <= context


def test_compiled_decoding_gives_the_eager_tokens_and_reuses_its_compiled_step(tokenizer):
    from torch._dynamo.utils import counters

    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False, max_position_embeddings=512)
    prompts = [encode_prompt(tokenizer, "alpaca", text) for text in ["Name a color.", "Say hello to the alpacas, twice."]]
    eager = [complete(model, tokenizer, ids, GREEDY) for ids in prompts]
    before = counters["stats"]["unique_graphs"]
    assert use_compiled_decoding(model, tokenizer)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # compiled while warming up
    assert [complete(model, tokenizer, ids, GREEDY) for ids in prompts] == eager
    assert counters["stats"]["unique_graphs"] == graphs  # two prompt lengths, one 256-token cache: no recompiling


def test_compiled_decoding_that_fails_to_compile_falls_back_to_eager(monkeypatch, tokenizer, model, capsys):
    import alpaca_cog.generate as generate

    ids = encode_prompt(tokenizer, "alpaca", "Name a color.")
    eager = complete(model, tokenizer, ids, GREEDY)
    monkeypatch.setattr(generate, "CompileConfig", lambda: CompileConfig(backend="no_such_backend"))
    assert not use_compiled_decoding(model, tokenizer)
    assert "compiled decoding unavailable" in capsys.readouterr().out
    assert model.generation_config.cache_implementation is None
    assert complete(model, tokenizer, ids, GREEDY) == eager
