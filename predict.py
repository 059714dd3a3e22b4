"""Cog predictor: the base model in weights/, with a trained LoRA adapter when Cog passes one, and any
other adapter per request. Concurrent predictions are decoded together by one engine (alpaca_cog.engine)."""

import asyncio
import random
from collections.abc import Iterator

import cog
from cog import BaseRunner, ConcatenateIterator, Input, streaming

from alpaca_cog import archive
from alpaca_cog.adapters import AdapterCache, prompt_template_of
from alpaca_cog.engine import Request, serving_engine
from alpaca_cog.env import env_flag, env_int, env_path
from alpaca_cog.generate import GenerationParams
from alpaca_cog.model import apply_adapters, load_model, load_tokenizer
from alpaca_cog.prompts import STOP_STRINGS, TEMPLATE_NAMES, encode_prompt

MAX_CONCURRENCY = 8  # as @cog.concurrent's literal below, which Cog's build reads; COG_MAX_CONCURRENCY overrides both


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """weights: trained weights from train.py (a tar path or URL), as Replicate passes them; several, comma-separated,
        are applied in their order (all merged, or the last one kept apart); None for the base model."""
        base = env_path("ALPACA_COG_BASE_WEIGHTS", "weights")
        merge = env_flag("ALPACA_COG_MERGE", True)
        folders = archive.adapter_dirs(str(weights)) if weights else []
        self.tokenizer = load_tokenizer(base, folders)  # an adapter's own where training extended the vocabulary
        model = apply_adapters(load_model(base), folders, merge=merge)
        self.default_template = next(filter(None, map(prompt_template_of, reversed(folders))), None)  # the last one's that says
        self.merged = bool(weights) and merge
        if weights:
            print(f"{len(folders)} adapter(s) from {weights} applied ({'merged' if merge else 'the last one unmerged'})")
        # An unmerged adapter is every request's default.
        self.engine = serving_engine(model, self.tokenizer, env_int("COG_MAX_CONCURRENCY", MAX_CONCURRENCY), base, folders)
        self.adapters = AdapterCache(self.engine, env_int("ALPACA_COG_ADAPTER_CACHE", 10))
        print(self.engine)

    @cog.concurrent(max=8)
    @streaming
    async def run(
        self,
        prompt: str = Input(description="Instruction for the model.", min_length=1, regex=r"[\s\S]*\S"),
        prompt_template: str | None = Input(
            description="alpaca: the Stanford Alpaca template (what train.py uses); chat: the model's own chat "
            "template; none: the prompt as is. Empty: the adapter's own template, else alpaca.",
            default=None,
            choices=TEMPLATE_NAMES,
        ),
        max_tokens: int = Input(description="Maximum number of tokens to generate.", default=128, ge=1, le=4096),
        temperature: float = Input(description="Sampling temperature; 0 (or below 1e-5) is greedy decoding.", default=0.1, ge=0.0, le=5.0),
        top_p: float = Input(description="Nucleus sampling: keep the smallest token set with this much probability.", default=0.75, ge=0.01, le=1.0),
        top_k: int = Input(description="Sample from the k most likely tokens; 0 disables.", default=40, ge=0, le=1000),
        beams: int = Input(description="Beam search width; above 1 the answer arrives whole, not streamed.", default=1, ge=1, le=8),
        stop_sequences: str | None = Input(description="Comma-separated strings that end the answer (never returned), besides the template's own.", default=None),
        lora_weights: str | None = Input(description="A LoRA adapter for this request: a train.py archive or adapter folder, as a path or http(s) URL, optionally pinned as URL#sha256=<hex>.", default=None),
        seed: int | None = Input(description="Random seed for sampling; empty for a random one.", default=None, ge=0, le=2**31 - 1),
    ) -> ConcatenateIterator[str]:
        # An async run() lets Cog run predictions concurrently. It returns a plain generator because Cog 0.23.1
        # (coglet) streams those token by token, while it collects an async generator whole; the price is that
        # Cog's cancel no longer reaches the generator once it streams (docs/internals.md, "Cancelling").
        if seed is None:
            seed = random.randint(0, 2**31 - 1)
        print(f"seed: {seed}")
        adapter, template, metrics = None, self.default_template, {}
        if lora_weights:
            if self.merged:
                raise ValueError("lora_weights: this instance merged its setup weights into the base; "
                                 "start it with ALPACA_COG_MERGE=0 to serve other adapters per request")  # fmt: skip
            adapter, template, metrics = await asyncio.to_thread(self.adapters.get, lora_weights)
        template = prompt_template or template or "alpaca"
        stops = STOP_STRINGS[template] + [s for s in (stop_sequences or "").split(",") if s]
        params = GenerationParams(temperature, top_p, top_k, beams, max_tokens, seed)
        handle = self.engine.submit(Request(encode_prompt(self.tokenizer, template, prompt), params, stops, adapter))
        return self._stream(handle, metrics, cog.current_scope())

    @staticmethod
    def _stream(handle, metrics: dict, scope) -> Iterator[str]:
        yield from handle
        result = handle.result
        metrics |= dict(input_tokens=result.input_tokens, output_tokens=result.output_tokens, backend=result.backend)
        if result.time_to_first_token is not None:
            metrics["time_to_first_token"] = round(result.time_to_first_token, 3)
        for key, value in metrics.items():
            scope.record_metric(key, value)  # the prediction's scope: Cog iterates this generator in another thread


if __name__ == "__main__":  # python predict.py --prompt "..." [--weights training_output.tar]
    import sys

    from alpaca_cog.cli import parse_inputs, parser_for

    parser = parser_for(Predictor.run, "Answer one prompt with the model in weights/, streaming to stdout.")
    parser.add_argument("--weights", help="trained weights (training_output.tar) to apply; several, comma-separated, in order")
    inputs = parse_inputs(Predictor.run, parser)

    async def main() -> None:
        predictor = Predictor()
        predictor.setup(weights=parser.parse_args().weights)
        try:
            for text in await predictor.run(**inputs):
                print(text, end="", flush=True)
            print()
        finally:
            predictor.engine.close()  # exiting while its thread is inside torch would abort the interpreter

    try:
        asyncio.run(main())
    except (ValueError, OSError) as e:  # bad input, weights or environment: the message, not a traceback
        sys.exit(f"error: {e}")
