"""The one decoding engine behind every front end (the Cog predictor, serve.py, evaluate.py).

Requests are decoded together, continuous-batching style: a background thread runs one step at a time
over every active sequence; a new request is prefilled alone and joins a running batch at the next step, a
finished or cancelled one leaves it. Each request keeps its own sampling parameters, seed, stop strings
and LoRA adapter; the engine samples every token itself, whichever backend computed the logits. Two kinds of
batch: transformers' (_TransformersBatch: every request, per-request adapters) and, on a CPU, llama.cpp's
(alpaca_cog.llamacpp: the default model, several times faster there); serving_engine says which is used.
Beam search, and compiled decoding when it is on (generate.use_compiled_decoding), run through transformers'
generate(), one request at a time, between steps.
"""

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import llamacpp
from .env import env_choice, env_flag, env_path
from .generate import MIN_SAMPLING_TEMPERATURE, GenerationParams, stream, use_compiled_decoding

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclass
class Request:
    prompt_ids: list[int]
    params: GenerationParams = field(default_factory=GenerationParams)
    stop: Sequence[str] = ()  # strings that end the answer, matched on decoded text, never returned
    adapter: str | None = None  # a name given to Engine.load_adapter; None: the engine's default model
    logprobs: int | None = None  # also record each token's log-probability and this many alternatives


@dataclass
class Result:
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    input_tokens: int = 0
    output_tokens: int = 0
    tokens: list[dict] = field(default_factory=list)  # with Request.logprobs: {"token", "logprob", "top"} each
    time_to_first_token: float | None = None
    backend: str = "transformers"  # or "llama.cpp"


_DONE = object()


class Handle:
    """One request in flight: iterate it (sync or async) for text pieces; `result` holds the totals."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None):
        self.request, self.result = request, Result(input_tokens=len(request.prompt_ids))
        self.cancelled = threading.Event()
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._started = time.monotonic()

    def _put(self, item) -> None:  # from the engine thread
        if self._loop:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        else:
            self._queue.put(item)

    def _emit(self, text: str) -> None:
        if text:
            if self.result.time_to_first_token is None:
                self.result.time_to_first_token = time.monotonic() - self._started
            self.result.text += text
            self._put(text)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.result.finish_reason = reason
        self._put(error if error is not None else _DONE)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a consumer that stops early frees its place in the batch

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while (item := await self._queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()


def emittable(text: str, sent: int, stops: Sequence[str]) -> tuple[int, bool]:
    """(end, stopped): text[sent:end] is final. stopped: a stop string starts at `end`. Otherwise `end` holds
    back an unfinished character and a tail that could be the start of a stop string."""
    for stop in stops:
        at = text.find(stop, max(0, sent - len(stop)))
        if at >= 0:
            return max(at, sent), True
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, end - sent), 0, -1):
            if text[end - n : end] == stop[:n]:
                end -= n
                break
    return end, False


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """A token drawn as generate() draws it (temperature, then top-k, then top-p), on the few candidates
    top-k leaves: sorting and sampling a whole 49K vocabulary takes tens of milliseconds on a CPU."""
    scores, index = logits / params.temperature, None
    if params.top_k:
        scores, index = scores.topk(min(params.top_k, scores.numel()))  # sorted, largest first
    elif params.top_p < 1.0:
        scores, index = scores.sort(descending=True)
    if params.top_p < 1.0:  # the smallest set whose probability reaches top_p (at least one token)
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs.cumsum(-1) - probs >= params.top_p, float("-inf"))
    probs = scores.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i, without multinomial's cost
    choice = int((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())
    return choice if index is None else int(index[choice])


class _Sequence:
    """Decoding state of one request in the running batch."""

    def __init__(self, handle: Handle, tokenizer, eos_ids: set[int]):
        self.handle, self.tokenizer, self.eos_ids = handle, tokenizer, eos_ids
        request = handle.request
        self.params, self.stop = request.params, [s for s in request.stop if s]
        self.ids: list[int] = []
        self.length = len(request.prompt_ids)  # tokens in the cache once this sequence's last token is fed
        self.sent = 0  # characters of the decoded text already emitted
        self.finish_reason: str | None = None  # set when it ends; the engine finishes the handle once it is out
        self.state = None  # its batch's: the prefilled KV cache until it joins (transformers), its sequence id (llama.cpp)
        self.sample = self.params.temperature >= MIN_SAMPLING_TEMPERATURE
        self.generator = None
        if self.sample:
            self.generator = torch.Generator(device="cpu")
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from this sequence's last-position logits (1-D, fp32)."""
        if self.handle.request.logprobs is not None:  # kept for advance(), which knows the token
            self._pending_logprobs = logits.log_softmax(-1)
        if not self.sample:
            return int(logits.argmax())
        return sample(logits.cpu(), self.params, self.generator)

    def advance(self, token: int) -> bool:
        """Take `token`; emit what text is final; return True when this sequence is finished."""
        handle = self.handle
        if handle.request.logprobs is not None:
            logprobs, k = self._pending_logprobs, handle.request.logprobs
            top = logprobs.topk(k) if k else None
            handle.result.tokens.append(dict(
                token=self.tokenizer.decode([token]), logprob=float(logprobs[token]),
                top=[] if top is None else [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(*top)]))  # fmt: skip
        if token in self.eos_ids:
            return self._end("stop")
        self.ids.append(token)
        handle.result.output_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end, stopped = emittable(text, self.sent, self.stop)
        if stopped or len(self.ids) >= self.params.max_tokens:
            handle._emit(text[self.sent : end if stopped else len(text)])
            return self._end("stop" if stopped else "length")
        if end > self.sent:
            handle._emit(text[self.sent : end])
            self.sent = end
        return False

    def _end(self, reason: str) -> bool:
        self.finish_reason = reason
        return True


class _TransformersBatch:
    """The running batch on transformers' forward: one KV cache, left-padded to its longest sequence, with an
    attention mask and per-sequence positions, so each sequence is decoded as if it were alone (up to rounding).
    Serves every request, each with its own LoRA adapter (PEFT's mixed-adapter batches)."""

    name = "transformers"

    def __init__(self, engine: "Engine"):
        self.engine, self.running = engine, []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, cache length): 1 where a sequence has a token
        self._padded = False  # whether the mask has a 0 anywhere

    def can_take(self, request: Request) -> bool:
        return len(self.running) < self.engine.max_batch

    def prefill(self, seq: "_Sequence") -> torch.Tensor:
        """The prompt alone, into a cache of its own (kept on seq until join); its last position's logits."""
        model = self.engine.model
        seq.state = DynamicCache(config=model.config)
        ids = torch.tensor([seq.handle.request.prompt_ids], device=model.device)
        with torch.inference_mode():
            return model(input_ids=ids, past_key_values=seq.state, use_cache=True, logits_to_keep=1,
                         **self.engine._adapter_names([seq])).logits[0, -1].float()  # fmt: skip

    def join(self, seq: "_Sequence") -> None:
        """Add a prefilled sequence to the running batch, left-padding the shorter cache."""
        cache, seq.state = seq.state, None
        mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long, device=self.engine.model.device)
        if self._cache is None:
            self._cache, self._mask, self.running, self._padded = cache, mask, [seq], False
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._padded = self._padded or self._mask.shape[1] != mask.shape[1]
        for ours, theirs in zip(self._cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(ours, name), getattr(theirs, name)
                setattr(ours, name, torch.cat([_left_pad(a, width, dim=2), _left_pad(b, width, dim=2)]))
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.running.append(seq)

    def drop(self, seq: "_Sequence") -> None:  # prefilled, finished before joining
        seq.state = None

    def step(self) -> torch.Tensor:
        """The next-token logits of every running sequence, (batch, vocab) fp32."""
        running, model = self.running, self.engine.model
        last = torch.tensor([[s.ids[-1]] for s in running], device=model.device)
        positions = torch.tensor([[s.length] for s in running], device=model.device)
        self._mask = torch.cat([self._mask, torch.ones(len(running), 1, dtype=torch.long, device=model.device)], dim=1)
        # Without padding (one sequence, or all of one length) the mask says nothing: let the model skip it.
        mask = self._mask if self._padded else None
        with torch.inference_mode():
            return model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=self._cache,
                         use_cache=True, **self.engine._adapter_names(running)).logits[:, -1].float()  # fmt: skip

    def shrink(self, keep: list[int]) -> None:
        if not keep:
            return self.clear()
        self.running = [self.running[i] for i in keep]
        index = torch.tensor(keep, device=self.engine.model.device)
        mask = self._mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every remaining row go
        self._mask = mask[:, start:]
        self._padded = not bool(self._mask.all())
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    def clear(self) -> None:
        self.running, self._cache, self._mask = [], None, None


class Engine:
    """Continuous batching over one model. Thread-safe: submit from any thread or event loop."""

    def __init__(self, model, tokenizer, max_batch: int = 8, default_adapter: str | None = None, llama_cpp=None):
        """llama_cpp: a llamacpp.LlamaCppBatch of the default model; it takes the requests it can serve exactly (the
        default adapter, no beams, no logprobs) while it has room, and transformers' batch the rest."""
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.llama_cpp, self._transformers = llama_cpp, _TransformersBatch(self)
        self._batches = [self._transformers] + ([llama_cpp] if llama_cpp is not None else [])
        self._alone_handles: set[Handle] = set()  # waiting for, or in, _generate_alone
        # The adapter a request without one gets: a PeftModel's active one (setup(weights) unmerged, a model in training).
        self.default_adapter = model.active_adapter if default_adapter is None and hasattr(model, "peft_config") else default_adapter
        eos = model.generation_config.eos_token_id
        self.eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.lock = threading.Lock()  # held for each step; adapter loading and beam search take it too
        self._waiting: deque[Handle] = deque()  # appended by submit, taken in order by the step loop
        self._wake = threading.Event()
        self._closed = False
        # A long-lived thread for what decodes outside the batch: on an H200, generate() in a fresh thread per
        # request decoded at a third of its speed in a warm one.
        self._alone_worker = ThreadPoolExecutor(1, thread_name_prefix="alpaca-cog-generate")
        self._thread = threading.Thread(target=self._loop, name="alpaca-cog-engine", daemon=True)
        self._thread.start()

    # ---- front ends -------------------------------------------------------------------------------
    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request; raises ValueError at once for a prompt the context cannot hold."""
        context = self.model.config.max_position_embeddings
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise ValueError("prompt: empty after tokenization")
        if prompt_len >= context:
            raise ValueError(f"prompt: {prompt_len} tokens with its template; the model's context holds {context}")
        if prompt_len + request.params.max_tokens > context:  # documented: the answer is cut at the end of the context
            request.params = GenerationParams(**{**request.params.__dict__, "max_tokens": context - prompt_len})
        handle = Handle(request, loop)
        if request.params.beams > 1 or self.one_at_a_time:
            self._alone_handles.add(handle)
            self._alone_worker.submit(self._generate_alone, handle)
        else:
            self._waiting.append(handle)
            self._wake.set()
        return handle

    def astream(self, request: Request) -> Handle:
        """For `async for piece in engine.astream(request)` inside a running event loop."""
        return self.submit(request, asyncio.get_running_loop())

    def complete(self, requests: list[Request]) -> list[Result]:
        """Decode every request (batched) and return their results in order."""
        handles = [self.submit(r) for r in requests]
        for handle in handles:
            for _ in handle:
                pass
        return [h.result for h in handles]

    def load(self) -> dict:
        """Requests decoding and waiting now (a health check's figures)."""
        return {"running": len(self._running), "waiting": len(self._waiting)}

    @property
    def one_at_a_time(self) -> bool:
        """Compiled decoding (generate.use_compiled_decoding's static KV cache) takes requests one by one."""
        return self.model.generation_config.cache_implementation == "static"

    def __str__(self) -> str:  # what setup logs
        mode = "compiled decoding, one request at a time" if self.one_at_a_time else f"batched decoding, up to {self.max_batch} requests"
        text = f"model on {self.model.device}, {self.model.dtype}, {mode}"
        if self.llama_cpp is not None:
            text += f"; {self.llama_cpp} decodes the requests for the default model"
        return text

    def close(self) -> None:
        """Cancel what is decoding or waiting and stop the step loop (the engine cannot be used afterwards)."""
        self._closed = True
        for handle in [s.handle for s in self._running] + list(self._alone_handles):
            handle.cancel()
        while self._waiting:
            self._waiting.popleft()._finish("cancelled")
        self._wake.set()
        self._thread.join()
        self._alone_worker.shutdown()  # the queued ones end at once: they are cancelled
        if self.llama_cpp is not None:
            self.llama_cpp.close()

    # ---- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder) -> None:
        """Load a PEFT adapter under `name`, beside the others; requests pick it by name."""
        from peft import PeftModel

        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            self.model.delete_adapter(name)

    def adapters_in_use(self) -> set[str]:
        return {s.handle.request.adapter for s in self._running} | {self.default_adapter}

    # ---- the step loop ----------------------------------------------------------------------------
    @property
    def _running(self) -> list[_Sequence]:
        return [seq for batch in self._batches for seq in batch.running]

    def _loop(self) -> None:
        while not (self._closed and not self._running and not self._waiting):
            if not self._running:
                self._wake.wait()
            self._wake.clear()
            with self.lock:
                self._admit()
                for batch in self._batches:
                    if batch.running:
                        try:
                            self._step(batch)
                        except Exception as e:  # a failed step fails the requests in it, never the engine
                            failed = batch.running
                            batch.clear()
                            for seq in failed:
                                seq.handle._finish("error", e)

    def _adapter_names(self, sequences: list[_Sequence]) -> dict:
        if not hasattr(self.model, "peft_config"):
            return {}
        return {"adapter_names": [s.handle.request.adapter or self.default_adapter or BASE for s in sequences]}

    def _batch_for(self, request: Request):
        """llama.cpp for what it serves exactly while it has room, else transformers' batch; None: wait."""
        if self.llama_cpp is not None and request.logprobs is None and request.adapter in (None, self.default_adapter):
            if self.llama_cpp.can_take(request):
                return self.llama_cpp
        return self._transformers if self._transformers.can_take(request) else None

    def _admit(self) -> None:
        """Prefill waiting requests one by one, in order, and add them to a running batch."""
        while self._waiting:
            handle = self._waiting[0]
            if handle.cancelled.is_set():
                self._waiting.popleft()._finish("cancelled")
                continue
            batch = self._batch_for(handle.request)
            if batch is None:
                return
            self._waiting.popleft()
            handle.result.backend = batch.name
            seq = _Sequence(handle, self.tokenizer, self.eos_ids)
            try:
                if seq.advance(seq.next_token(batch.prefill(seq))):
                    batch.drop(seq)
                    handle._finish(seq.finish_reason)
                else:
                    batch.join(seq)
            except Exception as e:  # this request fails alone
                batch.drop(seq)
                handle._finish("error", e)

    def _step(self, batch) -> None:
        """One token for every sequence of `batch`; finished and cancelled ones leave it. Their handles finish
        after that, so that a client answered can send its next request to the room it left (llama.cpp's cells)."""
        logits = batch.step()
        keep, ended = [], []
        for i, seq in enumerate(batch.running):
            seq.length += 1
            if seq.handle.cancelled.is_set():
                seq._end("cancelled")
            if seq.finish_reason or seq.advance(seq.next_token(logits[i])):
                ended.append(seq)
            else:
                keep.append(i)
        if ended:
            batch.shrink(keep)
        for seq in ended:
            seq.handle._finish(seq.finish_reason)

    def _generate_alone(self, handle: Handle) -> None:
        """Beam search (and compiled decoding) through transformers' generate(), holding the model meanwhile."""
        request = handle.request
        adapter = request.adapter or self.default_adapter or BASE
        peft = hasattr(self.model, "peft_config")
        try:
            if handle.cancelled.is_set():
                handle._finish("cancelled")
                return
            with self.lock:
                if peft and adapter != BASE:
                    self.model.set_adapter(adapter)
                stats, text, sent, stopped = {}, "", 0, False
                with self.model.disable_adapter() if peft and adapter == BASE else nullcontext():
                    pieces = stream(self.model, self.tokenizer, request.prompt_ids, request.params, stats)
                    for piece in pieces:
                        text += piece
                        end, stopped = emittable(text, sent, request.stop)
                        handle._emit(text[sent:end])
                        sent = end
                        if stopped or handle.cancelled.is_set():
                            pieces.close()  # generate() returns at its next token
                            break
                    if not stopped:
                        handle._emit(text[sent:])
                handle.result.output_tokens = stats.get("output_tokens", handle.result.output_tokens)
            if handle.cancelled.is_set():
                handle._finish("cancelled")
            else:
                handle._finish("stop" if stopped or handle.result.output_tokens < request.params.max_tokens else "length")
        except Exception as e:
            handle._finish("error", e)
        finally:
            self._alone_handles.discard(handle)


def serving_engine(model, tokenizer, max_batch: int, base_dir: str | None = None, adapter_dirs: Sequence = ()) -> Engine:
    """The engine as the servers (predict.py, serve.py) start it.

    ALPACA_COG_BACKEND picks who decodes: auto (the default) adds a llama.cpp batch for the default model's requests
    when the model runs on a CPU and llama-cpp-python is installed (a GGUF of base_dir plus adapter_dirs, merged:
    the same model as `model`); llama.cpp adds it on any device and fails when it cannot; transformers never uses
    it. On a GPU transformers' batch decodes everything (docs/performance.md).
    ALPACA_COG_COMPILE (opt-in) decodes compiled, one request at a time, with transformers.
    """
    backend = env_choice("ALPACA_COG_BACKEND", "auto", ["auto", "transformers", "llama.cpp"])
    if env_flag("ALPACA_COG_COMPILE", False) and use_compiled_decoding(model, tokenizer):
        backend = "transformers"
    installed = llamacpp.available()
    if backend == "llama.cpp" and not installed:
        raise ValueError("ALPACA_COG_BACKEND=llama.cpp: llama-cpp-python is not installed")
    llama_cpp = None
    if base_dir is not None and (backend == "llama.cpp" or (backend == "auto" and model.device.type == "cpu" and installed)):
        try:
            gguf = llamacpp.cached_gguf(base_dir, list(adapter_dirs), env_path("ALPACA_COG_GGUF_CACHE", llamacpp.DEFAULT_CACHE))
            llama_cpp = llamacpp.LlamaCppBatch(gguf, context=model.config.max_position_embeddings, max_batch=max_batch)
        except Exception as e:  # auto falls back to transformers and says why; asked for explicitly, it fails
            if backend == "llama.cpp":
                raise ValueError(f"ALPACA_COG_BACKEND=llama.cpp: {type(e).__name__}: {e}") from None
            print(f"llama.cpp not used ({type(e).__name__}: {e}); decoding with transformers", flush=True)
    return Engine(model, tokenizer, max_batch=max_batch, llama_cpp=llama_cpp)


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]  # F.pad lists dimensions from the last one back
    return F.pad(x, pad)
