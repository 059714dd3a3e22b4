"""An OpenAI-compatible HTTP API over the decoding engine, with the playground page at `/` (serve.py runs it).

Requests are validated by pydantic models whose message and stream-option fields are the `openai` package's own
parameter types; answers are built from its response types (ChatCompletion, Completion, CreateEmbeddingResponse,
Model), so they have exactly the shape its client parses. Every answer is decoded by the engine, beside whatever
else it is decoding: concurrent clients are batched.
"""

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, CreateEmbeddingResponse, Embedding, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionMessageParam
from openai.types.chat import ChatCompletionStreamOptionsParam, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from .adapters import AdapterCache
from .embeddings import embed
from .engine import Engine, Handle, Request, Result
from .generate import GenerationParams
from .prompts import STOP_STRINGS, TemplateName, encode_prompt

LORA_PREFIX = "lora:"  # model="lora:<archive path or URL>[#sha256=...]": a per-request adapter (predict's lora_weights)
PLAYGROUND = Path(__file__).with_name("playground.html")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---- requests: OpenAI's fields with their bounds; fields we do not use (user, metadata, ...) are ignored --------
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # torch.Generator.manual_seed takes up to 2**64 - 1: room for seed + i


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the model's context, as OpenAI
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, as OpenAI; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM has it too); 0 or None: off
    seed: Seed | None = None  # choice i of n samples with seed + i
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: ChatCompletionStreamOptionsParam | None = None
    prompt_template: TemplateName | None = None  # extension: alpaca, chat or none, instead of the default


class ChatRequest(Sampling):
    messages: list[Annotated[ChatCompletionMessageParam, Field(discriminator="role")]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    input: str = ""  # extension: the Alpaca template's input, with prompt_template "alpaca"
    logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 unless told


# ---- what is served ------------------------------------------------------------------------------------------
@dataclass
class Served:
    """The engine and every model name a request may give: the base, named adapters and per-request ones."""

    engine: Engine
    tokenizer: Any
    adapters: AdapterCache
    named: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # name -> (where from, prompt template)
    base_name: str = "base"
    base_root: str = ""
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    per_request: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # "lora:..." -> (adapter, template)

    def default_template(self, adapter: str | None, template: str | None) -> str:
        """An adapter's own template (train.py writes it), else the base's chat template, else Alpaca."""
        if template:
            return template
        return "chat" if adapter is None and self.tokenizer.chat_template else "alpaca"

    async def resolve(self, model: str) -> tuple[str | None, str | None]:
        """(engine adapter name, None for the base; its prompt template) for a request's `model`."""
        if model == self.base_name:
            return None, None
        if model in self.named:
            return model, self.named[model][1]
        if model.startswith(LORA_PREFIX):
            try:
                name, template, _ = await asyncio.to_thread(self.adapters.get, model[len(LORA_PREFIX) :])
            except FileNotFoundError as e:
                raise APIError(404, str(e), "model", "model_not_found") from None
            except ValueError as e:  # refused by archive.py's checks, or by PEFT (an adapter for another base model)
                raise APIError(400, str(e), "model") from None
            loaded = set(self.adapters.names())  # forget what the cache evicted: clients may name many
            self.per_request = {s: v for s, v in self.per_request.items() if v[0] in loaded} | {model: (name, template)}
            return name, template
        message = f"The model `{model}` does not exist: GET /v1/models lists those served"
        raise APIError(404, message, "model", "model_not_found")

    def models(self) -> list[Model]:
        """The base, then its adapters with `parent` = the base, as vLLM lists LoRA modules."""
        def entry(model_id: str, root: str, template: str | None, parent: str | None = None) -> Model:
            template = self.default_template(None if parent is None else model_id, template)
            return Model(id=model_id, created=self.created, object="model", owned_by="alpaca-cog", root=root, parent=parent, prompt_template=template)  # fmt: skip

        loaded = set(self.adapters.names())
        return [entry(self.base_name, self.base_root, None)] + [
            entry(name, root, template, self.base_name) for name, (root, template) in self.named.items()
        ] + [entry(spec, spec[len(LORA_PREFIX) :], template, self.base_name)
             for spec, (name, template) in self.per_request.items() if name in loaded]  # fmt: skip


# ---- prompts -------------------------------------------------------------------------------------------------
def message_text(message: dict) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    parts = list(content)  # openai's types say Iterable: pydantic checks the parts as they are read, here
    if any(part["type"] != "text" for part in parts):
        raise APIError(400, "messages: only text content is supported", "messages")
    return "".join(part["text"] for part in parts)


def chat_prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """chat: the tokenizer's chat template over every message. alpaca: the last message, which must be the user's,
    is the instruction, and the earlier ones (a system prompt, previous turns) are the input, a paragraph each.
    none: the messages' texts, a line each."""
    try:
        turns = [("system" if m["role"] == "developer" else m["role"], message_text(m)) for m in messages]
    except ValidationError as e:
        raise APIError(422, f"messages: {e.errors()[0]['msg']}", "messages") from None
    if template == "alpaca":
        if turns[-1][0] != "user":
            raise APIError(400, "messages: with the Alpaca template the last message must be the user's", "messages")
        return encode_prompt(tokenizer, "alpaca", turns[-1][1], "\n\n".join(text for _, text in turns[:-1]))
    if template == "none":
        return encode_prompt(tokenizer, "none", "\n".join(text for _, text in turns))
    if not tokenizer.chat_template:
        message = "prompt_template: this model's tokenizer has no chat template; use alpaca or none"
        raise APIError(400, message, "prompt_template")
    try:  # as prompts.build_prompt does for one user turn: the template holds its own special tokens
        chat = [{"role": role, "content": text} for role, text in turns]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own refusal (roles out of order, ...)
        raise APIError(400, f"messages: the chat template refused them ({e})", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- decoding ------------------------------------------------------------------------------------------------
def submit(engine: Engine, prompts: list[list[int]], body: Sampling, max_tokens: int | None, stops: list[str],
           adapter: str | None, logprobs: int | None, param: str) -> list[Handle]:  # fmt: skip
    """n requests per prompt, queued in the engine (they decode together, with whatever else it runs)."""
    context = engine.model.config.max_position_embeddings
    handles: list[Handle] = []
    try:
        for ids in prompts:
            for i in range(body.n):
                params = GenerationParams(
                    temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
                    top_k=body.top_k or 0, max_tokens=max_tokens or context, seed=None if body.seed is None else body.seed + i)  # fmt: skip
                handles.append(engine.astream(Request(ids, params, stops, adapter, logprobs)))
    except ValueError as e:  # the prompt does not fit the context
        for handle in handles:
            handle.cancel()
        raise APIError(400, str(e), param, "context_length_exceeded") from None
    return handles


def stop_strings(template: str, stop: str | list[str] | None) -> list[str]:
    return STOP_STRINGS[template] + ([stop] if isinstance(stop, str) else stop or [])


async def pieces(handles: list[Handle]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice, text) as any choice produces text, (choice, None) as it ends. Stopping early (a client that went
    away) cancels every choice, so the engine drops them at its next step."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: Handle) -> None:
        try:
            async for piece in handle:
                queue.put_nowait((i, piece))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    ended = 0
    try:
        while ended < len(handles):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            ended += item is None
            yield i, item
    finally:
        for handle, task in zip(handles, tasks):
            handle.cancel()
            task.cancel()


async def finish(handles: list[Handle], http: HTTPRequest) -> bool:
    """Decode every choice to its end; False if the client disconnected first (its choices are then cancelled)."""
    async def drain() -> None:
        async for _ in pieces(handles):
            pass

    task = asyncio.create_task(drain())
    while not (await asyncio.wait({task}, timeout=0.5))[0]:
        if await http.is_disconnected():
            task.cancel()
            await asyncio.wait({task})  # its pieces() cancels every choice as it closes
            return False
    task.result()
    return True


class TokenCursor:
    """Walks a choice's recorded tokens beside its text, so each chunk carries its own tokens' logprobs."""

    def __init__(self, result: Result):
        self.result, self.count, self.chars = result, 0, 0

    def upto(self, chars: int) -> list[dict]:
        """The further tokens that begin within the first `chars` characters (EOS and a stop string's never do)."""
        tokens, start = self.result.tokens[: self.result.output_tokens], self.count
        while self.count < len(tokens) and self.chars < chars:
            self.chars += len(tokens[self.count]["token"])
            self.count += 1
        return tokens[start : self.count]


def chat_logprobs(tokens: list[dict]) -> list[ChatCompletionTokenLogprob]:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return [ChatCompletionTokenLogprob(**top(t["token"], t["logprob"]).model_dump(), top_logprobs=[top(*a) for a in t["top"]])
            for t in tokens]  # fmt: skip


def returned_tokens(result: Result) -> list[dict]:
    return TokenCursor(result).upto(len(result.text))


def completion_logprobs(tokens: list[dict], offset: int = 0) -> Logprobs:
    return Logprobs(tokens=[t["token"] for t in tokens], token_logprobs=[t["logprob"] for t in tokens],
                    top_logprobs=[dict(t["top"]) for t in tokens],
                    text_offset=list(accumulate((len(t["token"]) for t in tokens[:-1]), initial=offset)) if tokens else [])  # fmt: skip


def usage(prompts: list[list[int]], handles: list[Handle]) -> CompletionUsage:
    prompt, completion = sum(map(len, prompts)), sum(h.result.output_tokens for h in handles)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def log(rid: str, model: str, started: float, prompts: list[list[int]], handles: list[Handle]) -> None:
    # a choice cancelled a moment ago has no finish_reason yet: the engine sets it at its next step
    reasons = ",".join(h.result.finish_reason or ("cancelled" if h.cancelled.is_set() else "running") for h in handles)
    tokens = sum(h.result.output_tokens for h in handles)
    print(f"{rid} model={model} n={len(handles)} finish={reasons} prompt_tokens={sum(map(len, prompts))} "
          f"completion_tokens={tokens} {time.monotonic() - started:.2f}s", flush=True)  # fmt: skip


def event_stream(handles: list[Handle], chunk: Callable[..., BaseModel], usage_chunk: Callable[[], BaseModel] | None,
                 logprobs: bool, done: Callable[[], None]) -> StreamingResponse:  # fmt: skip
    """Server-sent events: chunk(choice, text, finish_reason, tokens) for each piece and each choice's end, the
    usage chunk if asked for, then [DONE]. Starlette cancels this generator when the client disconnects."""
    def data(obj: BaseModel | str) -> str:
        return f"data: {obj.model_dump_json(exclude_none=True) if isinstance(obj, BaseModel) else obj}\n\n"

    async def events() -> AsyncIterator[str]:
        cursors, sent = [TokenCursor(h.result) for h in handles], [0] * len(handles)
        try:
            async for i, piece in pieces(handles):
                result = handles[i].result
                sent[i] += len(piece or "")
                tokens = cursors[i].upto(sent[i]) if logprobs else None
                yield data(chunk(i, piece or "", None if piece is not None else finish_reason(result), tokens))
            if usage_chunk:
                yield data(usage_chunk())
        except Exception as e:  # the engine failed these requests: say so in the stream, which has begun
            yield data(json.dumps({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}))
        finally:
            done()
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold tokens back
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="alpaca-cog", summary="OpenAI-compatible API over alpaca-cog's batching engine")
    tokenizer, engine = served.tokenizer, served.engine

    async def check_key(authorization: str | None = Header(None)) -> None:
        if served.api_key and not secrets.compare_digest(authorization or "", f"Bearer {served.api_key}"):
            raise APIError(401, "Incorrect API key: send `Authorization: Bearer <key>`", None, "invalid_api_key")

    auth = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(where) if where and first["type"] != "json_invalid" else None
        return error_response(422, f"{param or 'body'}: {first['msg']}", param, first["type"])

    @app.exception_handler(Exception)
    async def failed(_, e: Exception) -> JSONResponse:  # a server fault: never for bad input, which is caught above
        return error_response(500, f"{type(e).__name__}: {e}")

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return error_response(e.status_code, str(e.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return PLAYGROUND.read_text()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [m.model_dump() for m in served.models()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str) -> dict:
        for entry in served.models():
            if entry.id == model:
                return entry.model_dump()
        raise APIError(404, f"The model `{model}` does not exist", "model", "model_not_found")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, http: HTTPRequest) -> Response:
        started, rid, created = time.monotonic(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        adapter, template = await served.resolve(body.model)
        template = body.prompt_template or served.default_template(adapter, template)
        prompts = [chat_prompt_ids(tokenizer, body.messages, template)]
        k = (body.top_logprobs or 0) if body.logprobs else None
        handles = submit(engine, prompts, body, body.max_completion_tokens or body.max_tokens,
                         stop_strings(template, body.stop), adapter, k, "messages")  # fmt: skip
        done = lambda: log(rid, body.model, started, prompts, handles)  # noqa: E731

        if body.stream:
            started_choices: set[int] = set()

            def chunk(i: int, text: str, reason: str | None, tokens: list[dict] | None) -> ChatCompletionChunk:
                logprobs = None if tokens is None else ChunkLogprobs(content=chat_logprobs(tokens))
                delta = ChoiceDelta(role=None if i in started_choices else "assistant", content=text)
                started_choices.add(i)
                return ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=body.model,
                                           choices=[ChunkChoice(index=i, delta=delta, finish_reason=reason, logprobs=logprobs)])  # fmt: skip

            def usage_chunk() -> ChatCompletionChunk:
                return ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created, model=body.model,
                                           choices=[], usage=usage(prompts, handles))  # fmt: skip

            include = bool((body.stream_options or {}).get("include_usage"))
            return event_stream(handles, chunk, usage_chunk if include else None, k is not None, done)

        gone = not await finish(handles, http)
        done()
        if gone:
            return Response(status_code=499)  # nobody reads it
        choices = [Choice(index=i, message=ChatCompletionMessage(role="assistant", content=h.result.text),
                          finish_reason=finish_reason(h.result),
                          logprobs=None if k is None else ChoiceLogprobs(content=chat_logprobs(returned_tokens(h.result))))
                   for i, h in enumerate(handles)]  # fmt: skip
        answer = ChatCompletion(id=rid, object="chat.completion", created=created, model=body.model, choices=choices, usage=usage(prompts, handles))  # fmt: skip
        return JSONResponse(answer.model_dump(mode="json", exclude_none=True))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Response:
        started, rid, created = time.monotonic(), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        adapter, _ = await served.resolve(body.model)
        template = body.prompt_template or "none"  # OpenAI's completions take the prompt as it is
        try:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            prompts = [encode_prompt(tokenizer, template, text, body.input) for text in texts]
        except ValueError as e:  # the chat template asked of a tokenizer without one
            raise APIError(400, str(e), "prompt_template") from None
        stops = stop_strings(template, body.stop)
        handles = submit(engine, prompts, body, body.max_tokens, stops, adapter, body.logprobs, "prompt")
        done = lambda: log(rid, body.model, started, prompts, handles)  # noqa: E731

        def choice(i: int, text: str, reason: str | None, tokens: list[dict] | None, offset: int = 0) -> CompletionChoice:
            logprobs = None if tokens is None else completion_logprobs(tokens, offset)
            # constructed, not validated: OpenAI's type requires a finish_reason, which a chunk mid-stream has not
            return CompletionChoice.model_construct(index=i, text=text, finish_reason=reason, logprobs=logprobs)

        if body.stream:
            offsets = [0] * len(handles)

            def chunk(i: int, text: str, reason: str | None, tokens: list[dict] | None) -> Completion:
                offsets[i] += len(text)
                return Completion(id=rid, object="text_completion", created=created, model=body.model,
                                  choices=[choice(i, text, reason, tokens, offsets[i] - len(text))])  # fmt: skip

            def usage_chunk() -> Completion:
                return Completion(id=rid, object="text_completion", created=created, model=body.model, choices=[], usage=usage(prompts, handles))  # fmt: skip

            include = bool((body.stream_options or {}).get("include_usage"))
            return event_stream(handles, chunk, usage_chunk if include else None, body.logprobs is not None, done)

        gone = not await finish(handles, http)
        done()
        if gone:
            return Response(status_code=499)
        choices = [choice(i, h.result.text, finish_reason(h.result), None if body.logprobs is None else returned_tokens(h.result))
                   for i, h in enumerate(handles)]  # fmt: skip
        answer = Completion(id=rid, object="text_completion", created=created, model=body.model, choices=choices, usage=usage(prompts, handles))  # fmt: skip
        return JSONResponse(answer.model_dump(mode="json", exclude_none=True))

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest) -> dict:
        adapter, _ = await served.resolve(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input

        def locked() -> tuple:
            with engine.lock:  # between two decoding steps, never during one
                return embed(engine.model, tokenizer, texts, adapter)

        try:
            vectors, tokens = await asyncio.to_thread(locked)
        except ValueError as e:
            raise APIError(400, str(e), "input") from None
        answer = CreateEmbeddingResponse(
            data=[Embedding(embedding=v.tolist(), index=i, object="embedding") for i, v in enumerate(vectors)],
            model=body.model, object="list", usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump()  # fmt: skip
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
            for item, v in zip(answer["data"], vectors):
                item["embedding"] = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        return answer

    return app
