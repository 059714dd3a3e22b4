"""Cog predictor: the base model in weights/, with a trained LoRA adapter when Cog passes one."""

import os
import random

from cog import BaseRunner, ConcatenateIterator, Input, streaming

from alpaca_cog import archive
from alpaca_cog.generate import GenerationParams, stream, use_compiled_decoding
from alpaca_cog.model import apply_adapter, default_device, load_model, load_tokenizer
from alpaca_cog.prompts import TEMPLATE_NAMES, encode_prompt

BASE_WEIGHTS = os.environ.get("ALPACA_COG_BASE_WEIGHTS", "weights")
# Merging the adapter into the base weights decodes faster; ALPACA_COG_MERGE=0 keeps them apart.
MERGE_ADAPTER = os.environ.get("ALPACA_COG_MERGE", "1") != "0"
# Compiled decoding (static KV cache + torch.compile) by default on GPUs; on a CPU it compiles for about a
# minute to gain little (1.0x to 1.5x measured), so ALPACA_COG_COMPILE=1 asks for it there (0 turns it off anywhere).
COMPILE = os.environ.get("ALPACA_COG_COMPILE", "1" if default_device() == "cuda" else "0") == "1"


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """weights: trained weights from train.py (a tar path or URL), as Replicate passes them; None for the base model."""
        self.tokenizer = load_tokenizer(BASE_WEIGHTS)
        self.model = load_model(BASE_WEIGHTS)
        if weights:
            self.model = apply_adapter(self.model, archive.adapter_dir(str(weights)), merge=MERGE_ADAPTER)
            print(f"adapter from {weights} applied ({'merged' if MERGE_ADAPTER else 'unmerged'})")
        compiled = COMPILE and use_compiled_decoding(self.model, self.tokenizer)
        print(f"model on {self.model.device}, {self.model.dtype}, {'compiled' if compiled else 'eager'} decoding")

    @streaming
    def run(
        self,
        prompt: str = Input(description="Instruction for the model.", min_length=1, regex=r"[\s\S]*\S"),
        prompt_template: str = Input(
            description="alpaca: the Stanford Alpaca template (what train.py uses); "
            "chat: the model's own chat template; none: the prompt as is.",
            default="alpaca",
            choices=TEMPLATE_NAMES,
        ),
        max_tokens: int = Input(description="Maximum number of tokens to generate.", default=128, ge=1, le=4096),
        temperature: float = Input(description="Sampling temperature; 0 (or below 1e-5) is greedy decoding.", default=0.1, ge=0.0, le=5.0),
        top_p: float = Input(description="Nucleus sampling: keep the smallest token set with this much probability.", default=0.75, ge=0.01, le=1.0),
        top_k: int = Input(description="Sample from the k most likely tokens; 0 disables.", default=40, ge=0, le=1000),
        beams: int = Input(description="Beam search width; above 1 the answer arrives whole, not streamed.", default=1, ge=1, le=8),
        seed: int | None = Input(description="Random seed for sampling; empty for a random one.", default=None, ge=0, le=2**31 - 1),
    ) -> ConcatenateIterator[str]:
        if seed is None:
            seed = random.randint(0, 2**31 - 1)
        print(f"seed: {seed}")
        params = GenerationParams(temperature, top_p, top_k, beams, max_tokens, seed)
        stats: dict = {}
        prompt_ids = encode_prompt(self.tokenizer, prompt_template, prompt)
        yield from stream(self.model, self.tokenizer, prompt_ids, params, stats)
        for key, value in stats.items():
            self.record_metric(key, value)


if __name__ == "__main__":  # python predict.py --prompt "..." [--weights training_output.tar]
    from alpaca_cog.cli import parse_inputs, parser_for

    parser = parser_for(Predictor.run, "Answer one prompt with the model in weights/, streaming to stdout.")
    parser.add_argument("--weights", help="trained weights (training_output.tar) to apply")
    inputs = parse_inputs(Predictor.run, parser)
    predictor = Predictor()
    predictor.setup(weights=parser.parse_args().weights)
    for text in predictor.run(**inputs):
        print(text, end="", flush=True)
    print()
