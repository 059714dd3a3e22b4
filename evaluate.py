"""Did the finetune help? The base model against trained adapters, on the same held-out examples.

    python evaluate.py --eval_data held_out.json --weights training_output.tar [--max_examples 100]

For each model: perplexity of the reference responses, ROUGE-L of its greedy answers, exact match of
final answers (GSM8K's `#### N`); a side-by-side table of a few answers, then the JSON report, last.
"""

import json
import sys
import tempfile

from cog import Input, Path

from alpaca_cog.adapters import prompt_template_of
from alpaca_cog.archive import adapter_dir
from alpaca_cog.data import load_examples
from alpaca_cog.env import env_path
from alpaca_cog.evaluation import answers_table, evaluate_model, summary_table
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
from alpaca_cog.outputs import atomic_file
from alpaca_cog.prompts import TEMPLATE_NAMES

BASE_WEIGHTS = env_path("ALPACA_COG_BASE_WEIGHTS", "weights")


def evaluate(
    eval_data: Path = Input(description="Held-out Alpaca-format examples: a JSON list or JSONL of {instruction, input, output} records."),
    weights: str = Input(description="Comma-separated train.py archives (or adapter folders) to compare with the base model.", default=""),
    max_examples: int = Input(description="Evaluate the first N examples; 0 for all.", default=0, ge=0),
    max_tokens: int = Input(description="Longest greedy answer, in tokens (GSM8K solutions take up to about 200).", default=256, ge=1, le=4096),
    prompt_template: str = Input(description="Template for every model; auto: each adapter's own (its prompt_template.json), "
                                 "and the first adapter's for the base model (alpaca without adapters).",
                                 default="auto", choices=["auto", *TEMPLATE_NAMES]),  # fmt: skip
    reference_last_number: bool = Input(description="References without '#### N': take their last number as the final answer "
                                        "(GSM8K solutions stripped of their '####' line end with it).", default=False),  # fmt: skip
    batch_size: int = Input(description="Examples per forward pass when scoring perplexity.", default=8, ge=1, le=512),
    show: int = Input(description="Examples shown side by side.", default=3, ge=0),
    output: Path | None = Input(description="Also write the report here, with every answer (stdout gets the aggregates).", default=None),
    base_weights: str = Input(description="The base model folder (ALPACA_COG_BASE_WEIGHTS).", default=BASE_WEIGHTS),
) -> dict:
    examples = load_examples(eval_data)[: max_examples or None]  # a bad file fails before any model loads
    if output is not None and not Path(output).parent.is_dir():
        raise ValueError(f"output: folder {Path(output).parent} does not exist")
    tokenizer = load_tokenizer(base_weights)
    with tempfile.TemporaryDirectory(prefix="alpaca-cog-eval-") as work:
        adapters = {}  # name -> (adapter folder, template, where the template came from)
        for i, name in enumerate(w.strip() for w in weights.split(",") if w.strip()):
            folder = adapter_dir(name, Path(work) / str(i))
            adapters[name] = (folder, *_template_of(folder, prompt_template))
        first = next(iter(adapters.values()), None)
        base_template = prompt_template if prompt_template != "auto" else first[1] if first else "alpaca"
        why = "--prompt_template" if prompt_template != "auto" else "the adapters' template: the same prompt for both" if first else "default"
        models = {"base": (None, base_template, why), **adapters}

        results = {}
        for n, (name, (folder, template, why)) in enumerate(models.items(), start=1):
            print(f"[{n}/{len(models)}] {name}: {len(examples)} examples, {template} template ({why})", file=sys.stderr, flush=True)
            model = load_model(base_weights)
            if folder is not None:
                model = apply_adapter(model, folder)
            own = load_tokenizer(base_weights, [folder]) if folder is not None else tokenizer  # an extended vocabulary's
            results[name] = evaluate_model(model, own, examples, template, max_tokens, batch_size, reference_last_number)
            print(f"[{n}/{len(models)}] {name}: done in {results[name]['time_s']:.0f}s", file=sys.stderr, flush=True)
            del model

    if show:
        print(answers_table(examples, {name: [r["answer"] for r in result["records"]] for name, result in results.items()}, show))
        print()
    print(summary_table(results))
    report = dict(eval_data=str(eval_data), examples=len(examples), max_tokens=max_tokens, reference_last_number=reference_last_number,
                  models={name: {k: v for k, v in r.items() if k != "records"} | {"weights": base_weights if name == "base" else name}
                          for name, r in results.items()})  # fmt: skip
    if output is not None:
        records = [dict(instruction=e.instruction, input=e.input, reference=e.output,
                        models={name: r["records"][i] for name, r in results.items()}) for i, e in enumerate(examples)]  # fmt: skip
        with atomic_file(output) as partial:  # never a half-written report
            partial.write_text(json.dumps(report | {"records": records}, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _template_of(folder: Path, prompt_template: str) -> tuple[str, str]:
    """(template, why): --prompt_template, else the one the adapter was trained with (train.py writes prompt_template.json)."""
    if prompt_template != "auto":
        return prompt_template, "--prompt_template"
    name = prompt_template_of(folder)
    if name is None:
        return "alpaca", "no prompt_template.json with the adapter: alpaca assumed"
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"weights: prompt_template.json names template {name!r}, not one of {TEMPLATE_NAMES}")
    return name, "its prompt_template.json"


if __name__ == "__main__":
    from alpaca_cog.cli import parse_inputs, parser_for

    inputs = parse_inputs(evaluate, parser_for(evaluate, __doc__.splitlines()[0]))
    try:
        evaluate(**inputs)
    except (ValueError, OSError) as e:  # bad eval data or weights: the message names the file and line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
