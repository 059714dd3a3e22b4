"""Text generation with streaming and cooperative stopping, on top of transformers' generate()."""

import threading
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


@dataclass
class GenerationParams:
    temperature: float = 0.1  # 0 means greedy
    top_p: float = 0.75
    top_k: int = 40
    beams: int = 1
    max_tokens: int = 128
    seed: int | None = None


class _StopFlag(StoppingCriteria):
    """Lets the consumer stop generate() between tokens (cancelled or abandoned stream)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


MIN_SAMPLING_TEMPERATURE = 1e-5  # below it logits / T overflows; sampling that cold is greedy decoding anyway


def generate_kwargs(params: GenerationParams, tokenizer) -> dict:
    sample = params.temperature >= MIN_SAMPLING_TEMPERATURE
    kwargs = dict(
        max_new_tokens=params.max_tokens,
        num_beams=params.beams,
        do_sample=sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:  # keep the model's generation_config from adding sampling knobs to greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


MIN_STATIC_CACHE = 128  # tokens: the smallest KV cache compiled decoding asks for


def use_compiled_decoding(model, tokenizer) -> bool:
    """Decode through a static (fixed-shape) KV cache and a torch.compile'd forward, as generate() does for
    such caches; warmed up here, so the first request does not wait for compilation. Returns False, and
    leaves decoding eager, if compiling fails.

    Each request asks for a cache of its length rounded up to a power of two; transformers keeps the
    largest asked for, so the compiled step is reused, and compiled again only when a request outgrows it.
    Beam search stays eager.
    """
    config = model.generation_config
    config.cache_implementation = "static"
    config.compile_config = CompileConfig()
    config.compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    try:
        complete(model, tokenizer, tokenizer("Hello")["input_ids"], GenerationParams(temperature=0))
        return True
    except Exception as e:  # an unsupported backend or model: slower, but still answering
        print(f"compiled decoding unavailable ({type(e).__name__}: {e}); decoding eagerly")
        config.cache_implementation = config.compile_config = None
        return False


def _static_cache_length(model, tokens: int) -> int:
    return min(max(MIN_STATIC_CACHE, 1 << (tokens - 1).bit_length()), model.config.max_position_embeddings)


def stream(model, tokenizer, prompt_ids: list[int], params: GenerationParams, stats: dict | None = None) -> Iterator[str]:
    """Yield the response text piece by piece (the prompt is never echoed).

    Beam search cannot stream (the best beam is known only at the end), so with
    beams > 1 the whole response comes as one piece. A prompt that fills the model's
    context is refused; max_tokens is cut to what the context has left.
    `stats` receives token counts.
    """
    if params.seed is not None:
        torch.manual_seed(params.seed)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    prompt_len = input_ids.shape[1]
    context = model.config.max_position_embeddings
    if prompt_len >= context:
        raise ValueError(f"prompt: {prompt_len} tokens with its template; the model's context holds {context}")
    if prompt_len + params.max_tokens > context:  # documented: the answer is cut at the end of the context
        params = replace(params, max_tokens=context - prompt_len)
    stop = _StopFlag()
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **generate_kwargs(params, tokenizer), stopping_criteria=StoppingCriteriaList([stop]))
    if model.generation_config.cache_implementation == "static":  # compiled decoding: one sequence at a time
        if params.beams == 1:
            kwargs["max_cache_len"] = _static_cache_length(model, prompt_len + params.max_tokens)
        else:  # beams would compile for their own batch shape, a long first wait for a rare request: eager
            kwargs["cache_implementation"] = "dynamic"
    if stats is not None:
        stats["input_tokens"] = prompt_len

    if params.beams > 1:
        with torch.inference_mode():
            out = model.generate(**kwargs)
        new_ids = _strip_eos(out[0, prompt_len:], tokenizer)
        if stats is not None:
            stats["output_tokens"] = len(new_ids)
        yield tokenizer.decode(new_ids, skip_special_tokens=True)
        return

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work() -> None:
        try:
            with torch.inference_mode():
                result["ids"] = model.generate(**kwargs, streamer=streamer)
        except BaseException as e:  # surface in the consumer, never lose it in the thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for text in streamer:
            if text:
                yield text
    finally:
        stop.event.set()  # cancelled or closed early: let generate() return at the next token
        thread.join()
    if "error" in result:
        raise result["error"]
    if stats is not None:
        stats["output_tokens"] = len(_strip_eos(result["ids"][0, prompt_len:], tokenizer))


def _strip_eos(ids: torch.Tensor, tokenizer) -> list[int]:
    ids = ids.tolist()
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def complete(model, tokenizer, prompt_ids: list[int], params: GenerationParams) -> str:
    return "".join(stream(model, tokenizer, prompt_ids, params))
