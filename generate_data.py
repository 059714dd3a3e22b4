"""Alpaca's self-instruct data generation from seed tasks, against any OpenAI-compatible server.

    python generate_data.py --seed_tasks ../shared/data/alpaca_seed_tasks.jsonl --output data.json --num_instructions 100
    python generate_data.py --clean alpaca_data.json --output alpaca_data_cleaned.json

The API key comes from OPENAI_API_KEY (a local serve.py needs none). Rerun a killed run with the same
--output to continue it; the similarity figures Stanford keeps go beside it, in data.similarity.json.
"""

import asyncio
import json
import os
import sys
from pathlib import Path

import openai
from cog import Input

from alpaca_cog import selfinstruct
from alpaca_cog.data import load_examples

NO_KEY = "EMPTY"  # what the client sends when OPENAI_API_KEY is unset: a local server ignores it


def generate_data(
    output: Path = Input(description="Alpaca JSON to write; if it exists, generation continues from it. With --clean: the cleaned file."),
    seed_tasks: Path | None = Input(description="Seed tasks (self-instruct JSONL, or Alpaca JSON/JSONL) shown as examples in each request.", default=None),
    num_instructions: int = Input(description="Stop once the output holds this many instructions.", default=100, ge=1),
    base_url: str = Input(description="An OpenAI-compatible API: by default this package's serve.py.", default="http://127.0.0.1:8000/v1"),
    model: str | None = Input(description="Model name; by default the first one the server lists.", default=None),
    api: str = Input(description="chat: the prompt as one user message; completions: the prompt continued, as Stanford did.", default="chat", choices=["chat", "completions"]),
    concurrency: int = Input(description="Requests in flight at once (Stanford sent its prompts 5 at a time).", default=5, ge=1, le=256),
    num_prompt_instructions: int = Input(description="Seed tasks shown in each request.", default=3, ge=1, le=19),
    language: str = Input(description="en: Stanford's rules; zh: Chinese, ROUGE-L on characters, no ASCII-first-character rule.", default="en", choices=list(selfinstruct.LANGUAGES)),
    temperature: float = Input(description="Sampling temperature.", default=1.0, ge=0.0, le=2.0),
    top_p: float = Input(description="Nucleus sampling probability.", default=1.0, ge=0.0, le=1.0),
    max_tokens: int = Input(description="Tokens per reply.", default=3072, ge=16),
    max_retries: int = Input(description="Retries of a request after 429, 5xx, a timeout or no connection, with exponential backoff.", default=5, ge=0),
    request_timeout: float = Input(description="Seconds one request may take.", default=600.0, ge=1.0),
    clean: Path | None = Input(description="Instead of generating: clean this Alpaca JSON/JSONL file into --output (AlpacaDataCleaned's rules).", default=None),
) -> dict:
    """Generate (or clean) into `output`; returns the report."""
    if clean is not None:
        return selfinstruct.clean_file(clean, output, language)
    if seed_tasks is None:
        raise ValueError("--seed_tasks is required (or --clean INPUT to clean a file)")
    seeds = selfinstruct.load_seed_tasks(seed_tasks)
    if output.exists():
        load_examples(output)  # a bad --output fails now, not after the server has been asked
    report = selfinstruct.Report()
    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or NO_KEY, max_retries=0, timeout=request_timeout)

    async def run() -> None:
        async with client:
            complete = selfinstruct.openai_complete(client, model or await selfinstruct.first_model(client), api, max_tokens, temperature, top_p)
            await selfinstruct.generate(seeds, output, num_instructions, complete, report, concurrency=concurrency,
                                        num_prompt_tasks=num_prompt_instructions, language=language, max_retries=max_retries)  # fmt: skip

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        print(json.dumps(report.summary(), indent=2))
        raise
    return {"output": str(output), "similarity": str(selfinstruct.similarity_path(output))} | report.summary()


def main(argv: list[str] | None = None) -> int:
    from alpaca_cog.cli import parse_inputs, parser_for

    parser = parser_for(generate_data, __doc__.splitlines()[0])
    inputs = parse_inputs(generate_data, parser, argv)
    try:
        print(json.dumps(generate_data(**inputs), indent=2, ensure_ascii=False))
        return 0
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to continue {inputs['output']}", file=sys.stderr)
        return 130
    except openai.AuthenticationError:
        no_key = (os.environ.get("OPENAI_API_KEY") or NO_KEY) == NO_KEY
        print(f"error: {inputs['base_url']} answered 401: " + ("set OPENAI_API_KEY" if no_key else "it refuses OPENAI_API_KEY"), file=sys.stderr)
    except openai.APIConnectionError as e:
        print(f"error: cannot reach {inputs['base_url']} ({e}); is the server running?", file=sys.stderr)
    except (openai.APIError, ValueError, OSError) as e:  # a refused request, bad seed or output file, a full disk
        print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
