"""serve.py, the OpenAI-compatible server, started as a subprocess and driven by real clients: the official `openai`
package (sync and async), LangChain, plain HTTP, and the playground in a headless Chromium. Most tests run on the
tiny random model (fast); one module-scoped server runs the real SmolLM2 for exact answers, retrieval and
disconnects mid-answer."""

import asyncio
import base64
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import psutil
import pytest
import requests
from peft import LoraConfig, get_peft_model

from alpaca_cog.engine import Engine, Request
from alpaca_cog.generate import GenerationParams
from alpaca_cog.model import load_model, load_tokenizer
from alpaca_cog.prompts import encode_prompt
from conftest import run_finetune, serve_py as serve, tiny_llama

KEY = "sk-test-key"
PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def archive(tiny_model_dir, tmp_path_factory) -> Path:
    """A real train.py archive (Alpaca template) for the tiny model."""
    return run_finetune(tiny_model_dir, tmp_path_factory.mktemp("adapter"), max_steps=2)


@pytest.fixture(scope="module")
def server(tiny_model_dir, archive, tmp_path_factory):
    args = ["--base_weights", str(tiny_model_dir), "--weights", f"tuned={archive}", "--api-key", KEY]
    with serve(tmp_path_factory.mktemp("serve"), *args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model in this process, decoded by its own engine: what the server must answer."""
    tokenizer = load_tokenizer(tiny_model_dir)
    return Engine(load_model(tiny_model_dir), tokenizer), tokenizer


def greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(temperature=0, top_p=1.0, top_k=0, max_tokens=max_tokens)


def chat(client, content: str = PROMPT, model: str = "base", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kwargs)


# ---- the openai client ---------------------------------------------------------------------------------------
def test_chat_answers_as_the_engine_does_through_the_chat_template(client, tiny):
    engine, tokenizer = tiny
    ids = encode_prompt(tokenizer, "chat", PROMPT)
    expected = engine.complete([Request(ids, greedy(12))])[0]
    answer = chat(client, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected.text and answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 12)
    streamed = chat(client, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_async_client_streams_and_completes(server, tiny):
    engine, tokenizer = tiny
    expected = engine.complete([Request(encode_prompt(tokenizer, "none", "Once upon a time"), greedy(10))])[0].text

    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as aclient:
            request = dict(model="base", prompt="Once upon a time", max_tokens=10, temperature=0)
            whole = await aclient.completions.create(**request)
            stream = await aclient.completions.create(**request, stream=True)
            return whole.choices[0].text, "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(main()) == (expected, expected)


def test_n_choices_and_seeds(client):
    same = chat(client, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in same.choices] == [0, 1]
    assert same.choices[0].message.content == same.choices[1].message.content
    assert same.usage.completion_tokens == 16
    streamed = ["", ""]
    for c in chat(client, max_tokens=8, temperature=0, n=2, stream=True):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == [same.choices[0].message.content] * 2
    sampled = [chat(client, max_tokens=8, temperature=1.0, n=2, seed=s) for s in (7, 7, 8)]
    texts = [[c.message.content for c in r.choices] for r in sampled]
    assert texts[0] == texts[1]  # a seed reproduces every choice
    assert texts[0][0] != texts[0][1] and texts[2] != texts[0]  # choice i samples with seed + i


def test_stop_strings_end_the_answer_and_are_never_returned(client):
    full = chat(client, max_tokens=16, temperature=0).choices[0].message.content
    at = next(i for i in range(4, len(full) - 3) if full.find(full[i : i + 3]) == i and full[i : i + 3].strip())
    answer = chat(client, max_tokens=16, temperature=0, stop=["never-there", full[at : at + 3]])
    assert answer.choices[0].message.content == full[:at] and answer.choices[0].finish_reason == "stop"
    streamed = chat(client, max_tokens=16, temperature=0, stop=full[at : at + 3], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:at]


def test_logprobs_in_openai_formats(client):
    answer = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    text = client.completions.create(model="base", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    text = text.choices[0]
    assert len(text.logprobs.tokens) == 5 and "".join(text.logprobs.tokens) == text.text
    assert text.logprobs.text_offset == [len("".join(text.logprobs.tokens[:i])) for i in range(5)]
    assert all(len(top) == 2 for top in text.logprobs.top_logprobs)
    chunks = chat(client, max_tokens=6, temperature=0, logprobs=True, stream=True)
    streamed = [t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]  # each chunk carries its own tokens


def test_embeddings_are_unit_vectors_in_float_and_base64(client, server):
    texts = ["Alpacas eat grass.", "The stock market fell today.", "Alpacas eat grass."]
    vectors = np.array([d.embedding for d in client.embeddings.create(model="base", input=texts).data])  # base64
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)  # batched with others or not, the same vector
    single = client.embeddings.create(model="base", input=texts[1], encoding_format="float").data[0].embedding
    assert np.allclose(single, vectors[1], atol=1e-5)
    raw = requests.post(f"{server.url}/v1/embeddings", json={"model": "base", "input": ["x"], "encoding_format": "base64"},
                        headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    assert len(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")) == 32


def test_adapters_by_model_name_listed_with_their_parent(client, archive, tiny):
    _, tokenizer = tiny
    models = {m.id: m for m in client.models.list()}
    assert models["base"].parent is None and models["tuned"].parent == "base"
    assert models["tuned"].model_extra["prompt_template"] == "alpaca"
    tuned = chat(client, model="tuned", max_tokens=10, temperature=0)
    assert tuned.usage.prompt_tokens == len(encode_prompt(tokenizer, "alpaca", PROMPT))  # the adapter's own template
    spec = f"lora:{archive}"
    per_request = chat(client, model=spec, max_tokens=10, temperature=0)
    assert per_request.choices[0].message.content == tuned.choices[0].message.content
    base = chat(client, max_tokens=10, temperature=0, extra_body={"prompt_template": "alpaca"})
    assert base.usage.prompt_tokens == tuned.usage.prompt_tokens
    assert base.choices[0].message.content != tuned.choices[0].message.content  # the adapter is applied
    listed = {m.id: m for m in client.models.list()}
    assert listed[spec].parent == "base" and client.models.retrieve("tuned").id == "tuned"
    vectors = [np.array(client.embeddings.create(model=m, input=PROMPT).data[0].embedding) for m in ("base", "tuned")]
    assert np.linalg.norm(vectors[1]) == pytest.approx(1, abs=1e-5) and not np.allclose(*vectors, atol=1e-4)


def test_errors_are_openai_shaped_and_raised_as_the_client_own_types(client, server, tmp_path):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key"
    assert requests.get(f"{server.url}/v1/models").status_code == 401  # no Authorization header at all
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="lora:/no/such/archive.tar", prompt="hi")
    other = tmp_path / "other-base-adapter"  # a LoRA for a model of another width
    get_peft_model(tiny_llama(hidden_size=64), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(other)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=f"lora:{other}", prompt="hi")
    assert "cannot load this adapter" in e.value.message and e.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(client, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="alpaca " * 1500, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="base", input="")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status in [("{", 422), ("[]", 422), ('{"model": "base"}', 422), ('{"model": "base", "messages": []}', 422),
                         ('{"model": "base", "messages": [{"role": "wizard", "content": "x"}]}', 422),
                         ('{"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400)]:  # fmt: skip
        response = requests.post(f"{server.url}/v1/chat/completions", data=body, headers=headers)
        assert response.status_code == status, body
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(f"{server.url}/v1/nothing").json()["error"]["message"] == "Not Found"


# ---- LangChain -----------------------------------------------------------------------------------------------
def test_langchain_chat_invoke_stream_batch_and_embeddings(server, client, tiny):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    engine, tokenizer = tiny
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="base", temperature=0, max_tokens=8, max_retries=0)
    questions = [PROMPT, "What is 2 + 2?", "Say hello."]
    expected = engine.complete([Request(encode_prompt(tokenizer, "chat", q), greedy(8)) for q in questions])
    expected = [r.text for r in expected]
    assert llm.invoke(questions[0]).content == expected[0]
    assert "".join(chunk.content for chunk in llm.stream(questions[1])) == expected[1]
    assert [m.content for m in llm.batch(questions)] == expected
    embeddings = OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key=KEY, model="base", check_embedding_ctx_length=False, tiktoken_enabled=False)  # fmt: skip
    ours = client.embeddings.create(model="base", input=questions, encoding_format="float").data
    assert np.allclose(embeddings.embed_documents(questions), [d.embedding for d in ours], atol=1e-5)
    assert np.allclose(embeddings.embed_query(questions[2]), ours[2].embedding, atol=1e-5)


# ---- load ----------------------------------------------------------------------------------------------------
def test_eight_concurrent_clients_five_requests_each(server, client):
    """Chat, completions and streams mixed: no 5xx, every answer complete, the server's memory flat."""
    def one(i: int, j: int) -> tuple[str, int]:
        kind, max_tokens = (i + j) % 3, 4 + (i + j) % 5
        if kind == 0:
            r = chat(client, f"Request {i}.{j}: tell me a story.", max_tokens=max_tokens, temperature=0.7, seed=i)
            return r.choices[0].finish_reason, r.usage.completion_tokens == max_tokens
        if kind == 1:
            r = client.completions.create(model="base", prompt=f"Request {i}.{j}", max_tokens=max_tokens, temperature=0)
            return r.choices[0].finish_reason, r.usage.completion_tokens == max_tokens
        chunks = list(chat(client, f"Request {i}.{j}", max_tokens=max_tokens, temperature=0, stream=True,
                           stream_options={"include_usage": True}))  # fmt: skip
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return reason, chunks[-1].usage.completion_tokens == max_tokens

    def client_run(i: int) -> list:
        return [one(i, j) for j in range(5)]

    process = psutil.Process(server.process.pid)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client_run, range(8)))  # warm-up: allocator pools, caches of every batch size
        before = process.memory_info().rss
        results = [r for rs in pool.map(client_run, range(8)) for r in rs]
    grown = (process.memory_info().rss - before) / 2**20
    print(f"\nserver RSS {before / 2**20:.0f} MiB after warm-up, grew {grown:.1f} MiB over 40 requests")
    assert len(results) == 40 and all(reason == "length" and complete for reason, complete in results)
    assert grown < 50, f"server memory grew by {grown:.1f} MiB over 40 requests"
    assert requests.get(f"{server.url}/health").json()["running"] == 0


# ---- the playground ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (make test installs it)")
def test_playground_streams_tokens_and_stops_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"])  # fmt: skip
        page = browser.new_page()
        offline = []
        page.on("request", lambda r: offline.append(r.url) if not r.url.startswith(server.url) else None)
        page.goto(server.url)
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        expect(page.locator("#model option[value=tuned]")).to_have_count(1)  # listed by /v1/models
        assert page.input_value("#template") == "chat"  # the base's own template
        page.select_option("#model", "tuned")
        assert page.input_value("#template") == "alpaca"  # the adapter's, from its archive
        page.select_option("#model", "base")
        page.fill("#prompt", "Tell me about alpacas.")
        page.fill("#max_tokens", "1000")
        page.click("#generate")
        expect(page.locator("#output")).not_to_be_empty(timeout=30_000)
        expect(page.locator("#stats")).to_contain_text("tokens/s")
        page.wait_for_function("document.getElementById('output').textContent.length > 40", timeout=30_000)
        page.click("#stop")
        expect(page.locator("#stats")).to_contain_text("stopped")
        text = page.text_content("#output")
        time.sleep(1)
        assert page.text_content("#output") == text and page.is_enabled("#generate")  # nothing arrives after stop
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nplayground screenshot: {shot}")
        browser.close()
    assert not offline, f"the page fetched from elsewhere: {offline}"
    deadline = time.monotonic() + 10
    while requests.get(f"{server.url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests.get(f"{server.url}/health").json()["running"] == 0  # stop reached the engine


# ---- the real SmolLM2 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(weights_dir, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("smol"), "--base_weights", str(weights_dir)) as s:
        yield s


def test_smollm2_answers_as_predict_engine_does(smol, weights_dir):
    client = openai.OpenAI(base_url=f"{smol.url}/v1", api_key="unused", max_retries=0)
    answer = chat(client, max_tokens=48, temperature=0).choices[0].message.content
    assert "red" in answer.lower() and "blue" in answer.lower(), answer
    tokenizer = load_tokenizer(weights_dir)  # predict.py's objects, the same way: template chat, greedy
    engine = Engine(load_model(weights_dir), tokenizer)
    assert engine.complete([Request(encode_prompt(tokenizer, "chat", PROMPT), greedy(48))])[0].text == answer


def test_a_client_that_disconnects_stops_its_generation(smol):
    """On the real model (llama.cpp, ~90 tokens/s on 2 cores), counting on for 2000 tokens would take ~20 s; the
    tiny model decodes its whole context in under a second, before a disconnect can be seen."""
    body = {"model": "base", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "temperature": 0}
    url = f"{smol.url}/v1/completions"
    cancelled_before = len(smol.log_lines("finish=cancelled"))
    with requests.post(url, json=body | {"stream": True}, stream=True) as r:
        assert next(r.iter_lines()).startswith(b"data: ")
    with pytest.raises(requests.Timeout):  # non-streaming: the server polls for the disconnect
        requests.post(url, json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while requests.get(f"{smol.url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests.get(f"{smol.url}/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    cancelled = smol.log_lines("finish=cancelled")[cancelled_before:]
    assert len(cancelled) == 2 and all(int(line.split("completion_tokens=")[1].split()[0]) < 1000 for line in cancelled)


def test_langchain_retrieval_qa_over_a_text_file(smol, tmp_path):
    """Split a file, embed the chunks with the model, retrieve the chunk for a question, answer from it."""
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    notes = tmp_path / "notes.txt"
    notes.write_text(
        "Alpacas are domesticated camelids from South America. They eat grass and hay, and live in herds.\n\n"
        "The Eiffel Tower is a wrought-iron tower in Paris, France. It was finished in 1889 and is 330 metres tall.\n\n"
        "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen.\n\n"
        "Python is a programming language created by Guido van Rossum and first released in 1991.\n")
    chunks = RecursiveCharacterTextSplitter(chunk_size=120, chunk_overlap=0).split_text(notes.read_text())
    assert len(chunks) == 4
    url = f"{smol.url}/v1"
    store = InMemoryVectorStore.from_texts(chunks, OpenAIEmbeddings(
        base_url=url, api_key="unused", model="base", check_embedding_ctx_length=False, tiktoken_enabled=False))  # fmt: skip
    # Mean-pooled SmolLM2 states rank each question's own paragraph first here, by 0.05 to 0.14 in cosine similarity.
    questions = {"What do alpacas eat?": "Alpacas", "How tall is the Eiffel Tower?": "The Eiffel Tower",
                 "How do plants make sugar?": "Photosynthesis", "Who created Python?": "Python"}  # fmt: skip
    for question, start in questions.items():
        assert store.similarity_search(question, k=1)[0].page_content.startswith(start), question
    question = "How tall is the Eiffel Tower?"
    context = store.similarity_search(question, k=1)[0].page_content
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from this context only:\n{context}"),
                                               ("user", "{question}")])  # fmt: skip
    chain = prompt | ChatOpenAI(base_url=url, api_key="unused", model="base", temperature=0, max_tokens=32)
    answer = chain.invoke({"context": context, "question": question}).content
    print(f"\nretrieved: {context!r}\nanswer: {answer!r}")
    assert answer.strip()
