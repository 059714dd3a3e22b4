"""Decoding speed: Alpaca-LoRA's generate.py path (baseline) against predict.py's path (ours), and llama.cpp.

Baseline: an unmerged PeftModel and model.generate with generate.py's settings. Ours: the Predictor's setup
(adapter merged) and its streaming generation as it runs by default on this machine (ALPACA_COG_BACKEND=auto:
llama.cpp's batch on a CPU), and with transformers forced (eager, and compiled with ALPACA_COG_COMPILE=1, opt-in).
llama_cpp: llama-cpp-python's own generate() (its Llama class) on the f16 GGUF export of the same merged model.
All use the same base model and the same random LoRA adapter (r=8 on q_proj,v_proj). Prints one JSON object and
keeps it in bench/results/predict-<date>.json.

    python bench/predict.py [--model weights] [--tokens 64]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from machine import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "Tell me about alpacas."


def make_adapter(model_dir: str, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    with torch.no_grad():  # small, so the greedy text stays sensible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out)
    return out


def timed(generate_pieces, tokens, repeats: int = 3) -> dict:
    """Time to the first piece, and tokens/s after it (over the whole call when it is one piece: beams);
    the median of a few runs, since this machine's neighbours make single runs noisy."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        first, pieces = None, 0
        for _ in generate_pieces():
            first = first or time.perf_counter()
            pieces += 1
        end = time.perf_counter()
        count = tokens() if callable(tokens) else tokens  # ours: what the engine decoded (it may stop at EOS)
        runs.append(dict(ttft_s=first - start, tokens_per_s=(count - 1) / (end - first) if pieces > 1 else count / (end - start)))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def run_baseline(args, adapter: Path) -> dict:
    """generate.py: LlamaForCausalLM + PeftModel.from_pretrained (unmerged), model.generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TextIteratorStreamer

    from alpaca_cog.prompts import build_prompt

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), str(adapter)).eval()
    setup = time.perf_counter() - start
    ids = tokenizer(build_prompt("alpaca", PROMPT), return_tensors="pt")["input_ids"]
    n = args.tokens

    def run(**settings):
        config = GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, **settings)
        kwargs = dict(input_ids=ids, generation_config=config, max_new_tokens=n, min_new_tokens=n, pad_token_id=tokenizer.eos_token_id)

        def pieces():
            if settings.get("num_beams", 1) > 1:  # generate.py's default path: no streaming
                with torch.no_grad():
                    yield model.generate(**kwargs)
                return
            import threading

            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
            thread = threading.Thread(target=lambda: model.generate(**kwargs, streamer=streamer))
            with torch.no_grad():
                thread.start()
                yield from streamer
            thread.join()

        return timed(pieces, n)

    return dict(setup_s=setup, greedy=run(num_beams=1, do_sample=False), sampled=run(num_beams=1, do_sample=True),
                beams4=run(num_beams=4), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip


def run_ours(args, adapter: Path) -> dict:
    os.environ["ALPACA_COG_BASE_WEIGHTS"] = args.model
    import peft  # noqa: F401  (imported before the clock starts, as the baseline's is)
    import predict
    from alpaca_cog.engine import Request
    from alpaca_cog.generate import GenerationParams
    from alpaca_cog.prompts import encode_prompt

    start = time.perf_counter()
    predictor = predict.Predictor()
    predictor.setup(weights=str(adapter))
    setup = time.perf_counter() - start
    ids = encode_prompt(predictor.tokenizer, "alpaca", PROMPT)
    n = args.tokens
    predictor.engine.model.generation_config.min_new_tokens = n  # beams (generate()) the same length as the baseline

    def run(**settings):  # through the engine, as run() decodes
        params = GenerationParams(max_tokens=n, seed=0, **settings)
        handles = []
        return timed(lambda: handles.append(predictor.engine.submit(Request(ids, params))) or handles[-1],
                     lambda: handles[-1].result.output_tokens)  # fmt: skip

    greedy_text = predictor.engine.complete([Request(ids, GenerationParams(temperature=0, max_tokens=n))])[0].text
    return dict(setup_s=setup, greedy=run(temperature=0), sampled=run(temperature=0.1), beams4=run(temperature=0, beams=4),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, greedy_text=greedy_text)  # fmt: skip


def run_llama_cpp(args, adapter: Path) -> dict:
    """llama-cpp-python on the f16 GGUF of base + adapter merged (convert_weights.py --to gguf --adapter)."""
    import llama_cpp

    from alpaca_cog.convert import export_gguf
    from alpaca_cog.model import load_tokenizer
    from alpaca_cog.prompts import encode_prompt

    gguf = export_gguf(args.model, Path(tempfile.mkdtemp()) / "merged-f16.gguf", str(adapter), outtype="f16")
    threads = len(os.sched_getaffinity(0))
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokenizer = load_tokenizer(args.model)
    ids, n = encode_prompt(tokenizer, "alpaca", PROMPT), args.tokens

    def greedy():
        llm.reset()
        for i, token in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)):
            yield token
            if i + 1 == n:
                return

    return dict(greedy=timed(greedy, n), greedy_text=tokenizer.decode(list(greedy()), skip_special_tokens=True), threads=threads,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip


def _agreeing_tokens(text: str, reference: str, model: str) -> int:
    """How many of the reference's first tokens `text` repeats."""
    from alpaca_cog.model import load_tokenizer

    tokenizer = load_tokenizer(model)
    a, b = tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(reference, add_special_tokens=False)["input_ids"]
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "weights"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--side", choices=["baseline", "ours", "llama_cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = dict(baseline=run_baseline, ours=run_ours, llama_cpp=run_llama_cpp)[args.side](args, Path(args.adapter))
        print("RESULT " + json.dumps(result))
        return
    adapter = make_adapter(args.model, Path(tempfile.mkdtemp()) / "adapter")
    sides = {}
    gguf_cache = tempfile.mkdtemp()  # ours' setup_s includes its first GGUF export
    runs = [("baseline", "baseline", {}), ("ours", "ours", {}), ("ours_transformers", "ours", {"ALPACA_COG_BACKEND": "transformers"}),
            ("ours_compiled", "ours", {"ALPACA_COG_COMPILE": "1"}), ("llama_cpp", "llama_cpp", {})]  # fmt: skip
    for name, side, env in runs:
        out = subprocess.run([sys.executable, __file__, "--side", side, "--model", args.model, "--tokens", str(args.tokens),
                              "--adapter", str(adapter)], capture_output=True, text=True, check=True, cwd=ROOT,
                             env=os.environ | {"ALPACA_COG_GGUF_CACHE": gguf_cache} | env)  # fmt: skip
        result = sides[name] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        for mode in ["greedy", "sampled", "beams4"]:
            if mode in result:
                result[mode] = {k: round(v, 3) for k, v in result[mode].items()}
        result["tokens_per_s"] = result["greedy"]["tokens_per_s"]
        result["ttft_s"] = result["greedy"]["ttft_s"]
    report = {
        "bench": "predict",
        "date": date.today().isoformat(),
        "machine": machine(),
        "settings": dict(model=Path(args.model).name, tokens=args.tokens, prompt=PROMPT, adapter="random LoRA r=8 q_proj,v_proj"),
        **sides,
        "speedup": {name: round(side["tokens_per_s"] / sides["baseline"]["tokens_per_s"], 2) for name, side in sides.items() if name != "baseline"},
        "ours_vs_llama_cpp": round(sides["ours"]["tokens_per_s"] / sides["llama_cpp"]["tokens_per_s"], 2),
        # greedy text of the merged model, first tokens: ours (default backend) and llama.cpp against fp32 transformers
        "greedy_agrees_with_fp32": {name: _agreeing_tokens(sides[name]["greedy_text"], sides["ours_transformers"]["greedy_text"], args.model)
                                    for name in ("ours", "llama_cpp")},
    }  # fmt: skip
    out = ROOT / "bench" / "results" / f"predict-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
