"""An OpenAI-compatible server and a playground page, decoding through the same batching engine as predict.py.

    python serve.py [--host 127.0.0.1] [--port 8000] [--weights NAME=training_output.tar ...] [--api-key KEY]

`model` in a request picks the base ("base"), an adapter named by --weights, or any train.py archive as
"lora:<path or URL>[#sha256=<hex>]" (fetched, checked and cached as predict.py's lora_weights are).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from alpaca_cog import archive
from alpaca_cog.adapters import AdapterCache, check_vocabulary, prompt_template_of
from alpaca_cog.engine import serving_engine
from alpaca_cog.env import env_int, env_path
from alpaca_cog.model import load_model, load_tokenizer
from alpaca_cog.openai_api import LORA_PREFIX, Served, create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=ARCHIVE",
                        help="a train.py archive (path or URL) served as model NAME; NAME defaults to the file's stem. Repeatable.")  # fmt: skip
    parser.add_argument("--api-key", "--api_key", default=env_path("ALPACA_COG_API_KEY", "") or None,
                        help="require `Authorization: Bearer KEY` on /v1 (default: $ALPACA_COG_API_KEY; none: open)")  # fmt: skip
    parser.add_argument("--base_weights", default=env_path("ALPACA_COG_BASE_WEIGHTS", "weights"), help="the base model folder")
    parser.add_argument("--max_batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--adapter_cache", type=int, default=env_int("ALPACA_COG_ADAPTER_CACHE", 10),
                        help="per-request (lora:...) adapters kept loaded")  # fmt: skip
    return parser.parse_args(argv)


def named_weights(specs: list[str]) -> dict[str, str]:
    """NAME=ARCHIVE (or ARCHIVE alone, named by its stem) -> {name: archive}."""
    named: dict[str, str] = {}
    for spec in specs:
        name, _, location = spec.partition("=") if "=" in spec else (Path(spec).name.split(".")[0], "", spec)
        if not name or name == "base" or name.startswith(LORA_PREFIX) or name in named:
            raise ValueError(f"--weights {spec}: the name must be unique, not 'base', not starting with {LORA_PREFIX!r}")
        named[name] = location
    return named


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    weights = named_weights(args.weights)  # a bad name fails before the model loads
    tokenizer = load_tokenizer(args.base_weights)
    model = load_model(args.base_weights)
    engine = serving_engine(model, tokenizer, args.max_batch, args.base_weights)  # as predict.py's
    named = {}
    for name, location in weights.items():
        with tempfile.TemporaryDirectory(prefix="alpaca-cog-weights-") as work_dir:  # PEFT copies the weights in
            folder = archive.adapter_dir(location, work_dir)
            check_vocabulary(folder, engine.model, location)
            engine.load_adapter(name, folder)
            named[name] = (location, prompt_template_of(folder))
    served = Served(engine, tokenizer, AdapterCache(engine, args.adapter_cache), named,
                    base_root=str(args.base_weights), api_key=args.api_key)  # fmt: skip
    print(f"{engine}; serving {', '.join(m.id for m in served.models())} "
          f"at http://{args.host}:{args.port}{' (API key required)' if args.api_key else ''}", flush=True)  # fmt: skip
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()  # exiting while its thread is inside torch would abort the interpreter


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad weights or flags: the message, not a traceback
        sys.exit(f"error: {e}")
