"""llama.cpp as the engine's batch on CPUs: the same greedy answers as fp32 transformers (up to f16 near-ties), with
an adapter merged in, batched answers equal to lone ones, and only what it can serve exactly routed to it."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from alpaca_cog import llamacpp
from alpaca_cog.engine import Engine, Handle, Request, serving_engine
from alpaca_cog.generate import GenerationParams
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
from alpaca_cog.prompts import encode_prompt

PROMPTS = ["Tell me about alpacas.", "Name three primary colors.", "What is the capital of France?"]
GREEDY = GenerationParams(temperature=0, max_tokens=32)
MATCHING = 16  # tokens that must agree; after them an f16 rounding may flip a near-tie


@pytest.fixture(scope="module")
def tokenizer(weights_dir):
    return load_tokenizer(weights_dir)


@pytest.fixture(scope="module")
def base_model(weights_dir):
    return load_model(weights_dir, device="cpu")


@pytest.fixture(scope="module")
def engine(base_model, tokenizer, weights_dir):
    engine = serving_engine(base_model, tokenizer, 8, weights_dir)
    yield engine
    engine.close()


def assert_agrees_with_fp32(model, tokenizer, ids: list[int], text: str) -> None:
    """`text` starts with transformers' fp32 greedy tokens: all of them, or at least MATCHING and then a token
    whose fp32 lead over the runner-up is a near-tie (under 1 logit), which f16 arithmetic may flip."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    expected = out.sequences[0, len(ids) :].tolist()
    if text == tokenizer.decode(expected, skip_special_tokens=True):
        return
    first_different = next(k for k in range(len(expected)) if not text.startswith(tokenizer.decode(expected[: k + 1], skip_special_tokens=True)))
    top2 = out.scores[first_different][0].float().topk(2).values
    assert first_different >= MATCHING, (first_different, text, tokenizer.decode(expected))
    assert float(top2[0] - top2[1]) < 1.0, (first_different, top2)


def test_a_lone_greedy_request_is_decoded_by_llama_cpp_as_fp32_transformers_decodes_it(engine, base_model, tokenizer):
    assert engine.llama_cpp is not None and "llama.cpp" in str(engine)
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, "alpaca", prompt)
        result = engine.complete([Request(ids, GREEDY)])[0]
        assert result.backend == "llama.cpp"
        assert_agrees_with_fp32(base_model, tokenizer, ids, result.text)


def test_a_merged_adapter_is_in_the_llama_cpp_model(weights_dir, tokenizer, engine, tmp_path, monkeypatch):
    peft_model = get_peft_model(load_model(weights_dir, device="cpu"), LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                                  init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    merged = apply_adapter(load_model(weights_dir, device="cpu"), folder, merge=True)
    tuned = serving_engine(merged, tokenizer, 8, weights_dir, [folder])
    try:
        ids = encode_prompt(tokenizer, "alpaca", PROMPTS[0])
        answer = tuned.complete([Request(ids, GREEDY)])[0]
        assert answer.backend == "llama.cpp"
        assert answer.text != engine.complete([Request(ids, GREEDY)])[0].text  # the adapter changes the answer
        assert_agrees_with_fp32(merged, tokenizer, ids, answer.text)
    finally:
        tuned.close()


def test_only_requests_it_serves_exactly_go_to_llama_cpp(engine, tokenizer):
    ids = encode_prompt(tokenizer, "alpaca", PROMPTS[1])
    story = encode_prompt(tokenizer, "alpaca", "Write a long story about a llama who travels the world.")
    long = engine.submit(Request(story, GenerationParams(temperature=0, max_tokens=400)))
    pieces = iter(long)
    next(pieces)  # llama.cpp is decoding the first request; the next one joins its batch, logprobs go to transformers
    busy, with_logprobs = engine.submit(Request(ids, GREEDY)), engine.submit(Request(ids, GREEDY, logprobs=2))
    assert [list(h) and h.result.backend for h in (busy, with_logprobs)] == ["llama.cpp", "transformers"]
    long.cancel()
    list(pieces)
    assert long.result.backend == "llama.cpp" and long.result.finish_reason == "cancelled"
    assert with_logprobs.result.tokens
    beams = engine.complete([Request(ids, GenerationParams(temperature=0, max_tokens=8, beams=2))])[0]
    assert beams.backend == "transformers" and beams.output_tokens == 8


def test_requests_decoded_together_answer_as_alone_and_a_cancel_leaves_the_others(engine, tokenizer):
    requests = [Request(encode_prompt(tokenizer, "alpaca", p), GenerationParams(temperature=0, max_tokens=24))
                for p in PROMPTS + ["Write a haiku about rain.", "List three fruits."]]  # fmt: skip
    alone = [engine.complete([r])[0].text for r in requests]
    handles = [engine.submit(r) for r in requests]
    cancelled = iter(handles[2])
    next(cancelled)  # decoding in the batch by now
    handles[2].cancel()
    assert list(cancelled) == [] and handles[2].result.finish_reason == "cancelled"
    others = [(list(h), h.result)[1] for i, h in enumerate(handles) if i != 2]
    assert [r.backend for r in others] == ["llama.cpp"] * len(others) and handles[2].result.backend == "llama.cpp"
    assert [r.text for r in others] == [t for i, t in enumerate(alone) if i != 2]


def test_llama_cpp_takes_what_its_cache_holds_and_transformers_the_rest(base_model, tokenizer, engine, monkeypatch):
    """Two sequence ids and 256 cache cells: a third request, or one whose prompt and max_tokens do not fit beside
    the others, is decoded by transformers' batch meanwhile (and answers the same). A request finishes only once
    its cells are free, so that the client's next request, sent on the answer, finds them."""
    small = Engine(base_model, tokenizer, max_batch=8, llama_cpp=llamacpp.LlamaCppBatch(engine.llama_cpp.path, context=256, max_batch=2))
    held_at_finish, finish = [], Handle._finish

    def finish_noting_the_cells(handle, *args):
        if handle.result.backend == "llama.cpp":
            held_at_finish.append((small.llama_cpp._reserved, len(small.llama_cpp.running)))
        finish(handle, *args)

    monkeypatch.setattr(Handle, "_finish", finish_noting_the_cells)
    try:
        ids = encode_prompt(tokenizer, "alpaca", PROMPTS[0])
        short = GenerationParams(temperature=0, max_tokens=16)
        results = small.complete([Request(ids, short), Request(ids, short), Request(ids, short)])
        assert [r.backend for r in results] == ["llama.cpp", "llama.cpp", "transformers"]
        assert len({r.text for r in results}) == 1
        long = GenerationParams(temperature=0, max_tokens=200)  # ~40 prompt tokens + 200 > 256 - 56 left
        results = small.complete([Request(ids, short), Request(ids, long)])
        assert [r.backend for r in results] == ["llama.cpp", "transformers"]
        assert small.complete([Request(ids, long)])[0].backend == "llama.cpp"  # alone it fits
        assert held_at_finish == [(0, 0)] * 4
    finally:
        small.close()


def test_a_prompt_longer_than_a_prefill_chunk_is_prefilled_in_chunks(engine, base_model, tokenizer):
    text = " ".join(f"Fact {i}: alpacas are kept for their soft fleece." for i in range(60))
    ids = encode_prompt(tokenizer, "alpaca", "Summarize these facts.", text)
    assert len(ids) > llamacpp._CHUNK
    result = engine.complete([Request(ids, GREEDY)])[0]
    assert result.backend == "llama.cpp"
    assert_agrees_with_fp32(base_model, tokenizer, ids, result.text)


def test_sampling_on_llama_cpp_follows_the_seed(engine, tokenizer):
    ids = encode_prompt(tokenizer, "alpaca", PROMPTS[0])
    hot = [GenerationParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=24, seed=s) for s in (1, 1, 2)]
    first, again, other = (engine.complete([Request(ids, p)])[0] for p in hot)
    assert {first.backend, again.backend, other.backend} == {"llama.cpp"}
    assert first.text == again.text and first.text != other.text


def test_the_export_is_cached_by_content(weights_dir, tmp_path, monkeypatch):
    exports = []
    monkeypatch.setattr(llamacpp, "_export_in_child", lambda base, path, adapters: exports.append(path) or path.write_bytes(b"x"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    first = llamacpp.cached_gguf(weights_dir, [adapter], tmp_path / "cache")
    assert llamacpp.cached_gguf(weights_dir, [adapter], tmp_path / "cache") == first and exports == [first]
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    assert llamacpp.cached_gguf(weights_dir, [adapter], tmp_path / "cache") != first and len(exports) == 2
    assert llamacpp.cached_gguf(weights_dir, [], tmp_path / "cache") not in exports[:2]


def test_backend_setting_errors_name_the_variable(base_model, tokenizer, weights_dir, monkeypatch):
    monkeypatch.setenv("ALPACA_COG_BACKEND", "vllm")
    with pytest.raises(ValueError, match="ALPACA_COG_BACKEND='vllm': expected one of auto, transformers, llama.cpp"):
        serving_engine(base_model, tokenizer, 8, weights_dir)
    monkeypatch.setenv("ALPACA_COG_BACKEND", "llama.cpp")
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(ValueError, match="ALPACA_COG_BACKEND=llama.cpp: llama-cpp-python is not installed"):
        serving_engine(base_model, tokenizer, 8, weights_dir)
    monkeypatch.setenv("ALPACA_COG_BACKEND", "transformers")
    engine = serving_engine(base_model, tokenizer, 8, weights_dir)
    assert engine.llama_cpp is None and "llama.cpp" not in str(engine)
    engine.close()
