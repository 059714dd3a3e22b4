"""Training throughput: Alpaca-LoRA's finetune.py recipe (baseline) against train.py (ours).

Same model, data, LoRA settings, examples and schedule; each side runs in its own process so
peak RSS is its own. ours is train.py's default configuration on this machine (precision auto: a bf16 base
where the CPU multiplies bf16 natively, else fp32); ours_fp32 forces fp32. Prints one JSON object and keeps it
in bench/results/train-<date>.json.

    python bench/train.py [--examples 400] [--batch_size 8] [--model weights]   # ~20 min on 2 CPU cores
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from machine import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
LORA = dict(r=8, alpha=16, dropout=0.05, targets="q_proj,v_proj")  # Alpaca-LoRA's defaults
CUTOFF, MICRO, LR = 256, 4, 3e-4


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split(examples: int, held_out: int = 32):
    data = json.loads(DATA.read_text())
    return data[:examples], data[examples : examples + held_out]


@torch.no_grad()
def held_out_loss(model, tokenizer, records) -> float:
    """Mean token loss on held-out examples, computed the same way for both sides."""
    from alpaca_cog.data import Example, pack, tokenize
    from alpaca_cog.finetune import label_count, loss_sum

    model.eval()
    total = labels = 0
    for i in range(0, len(records), MICRO):
        batch = pack([tokenize(Example(r["instruction"], r["input"], r["output"]), tokenizer, "alpaca", CUTOFF, True)[0]
                      for r in records[i : i + MICRO]])  # fmt: skip
        batch = {k: v.to(model.device) for k, v in batch.items()}
        total += loss_sum(model, batch).item()
        labels += label_count(batch)
    return total / labels


def run_baseline(args) -> dict:
    """tloen/alpaca-lora finetune.py, ported to transformers 5 / peft 0.21 and nothing else changed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from alpaca_cog.prompts import build_prompt

    train, held_out = split(args.examples)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token_id = 0  # as finetune.py: unk
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"].split(","),
                                             lora_dropout=LORA["dropout"], bias="none", task_type="CAUSAL_LM"))  # fmt: skip

    def tokenize(record):  # generate_and_tokenize_prompt with train_on_inputs=True (the default)
        text = build_prompt("alpaca", record["instruction"], record["input"]) + record["output"]
        result = tokenizer(text, truncation=True, max_length=CUTOFF, padding=False)
        if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < CUTOFF:
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    dataset = [tokenize(r) for r in train]
    steps = -(-len(dataset) // args.batch_size)
    trainer = Trainer(
        model=model,
        train_dataset=dataset,
        args=TrainingArguments(
            per_device_train_batch_size=MICRO, gradient_accumulation_steps=args.batch_size // MICRO,
            warmup_steps=steps // 10, num_train_epochs=1, learning_rate=LR, logging_steps=1, optim="adamw_torch",
            save_strategy="no", eval_strategy="no", output_dir="/tmp/bench-baseline", report_to=[],
            bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=42, disable_tqdm=True,
        ),
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )  # fmt: skip
    start = time.monotonic()
    trainer.train()
    seconds, peak = time.monotonic() - start, peak_rss_mb()
    real_tokens = sum(len(d["input_ids"]) for d in dataset)
    from alpaca_cog.model import load_tokenizer

    return dict(tokens_per_s=real_tokens / seconds, train_seconds=seconds, real_tokens=real_tokens, steps=steps,
                peak_rss_mb=peak, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                final_loss=held_out_loss(model, load_tokenizer(args.model), held_out))  # fmt: skip


def run_ours(args) -> dict:
    import tarfile
    import tempfile

    from alpaca_cog.cli import defaults
    from alpaca_cog.finetune import finetune
    from alpaca_cog.model import load_model, load_tokenizer
    from train import train as train_fn

    train, held_out = split(args.examples)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "train.json").write_text(json.dumps(train))
    settings = dict(train_data=tmp / "train.json", num_train_epochs=1, learning_rate=LR, batch_size=args.batch_size, precision=args.precision,
                    micro_batch_size=MICRO, cutoff_len=CUTOFF, val_set_size=0, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                    lora_dropout=LORA["dropout"], lora_target_modules=LORA["targets"], checkpoint_steps=0, logging_steps=1)  # fmt: skip
    start = time.monotonic()
    archive = finetune(**defaults(train_fn) | settings, base_weights=args.model, output_path=tmp / "out.tar", checkpoint_dir=tmp / "ckpt")
    wall, peak = time.monotonic() - start, peak_rss_mb()
    metrics = json.load(tarfile.open(archive).extractfile("metrics.json"))
    from alpaca_cog.archive import adapter_dir
    from alpaca_cog.model import apply_adapter

    model = apply_adapter(load_model(args.model), adapter_dir(str(archive), tmp / "x"), merge=False)
    return dict(tokens_per_s=metrics["tokens_per_s"], train_seconds=wall, steps=metrics["steps"], precision=metrics["precision"],
                peak_rss_mb=peak, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                final_loss=held_out_loss(model, load_tokenizer(args.model), held_out))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--model", default=str(ROOT / "weights"))
    parser.add_argument("--side", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_baseline if args.side == "baseline" else run_ours)(args)
        print("RESULT " + json.dumps(result))
        return
    sides = {}
    for name, side, precision in [("baseline", "baseline", "fp32"), ("ours", "ours", "auto"), ("ours_fp32", "ours", "fp32")]:
        out = subprocess.run([sys.executable, __file__, "--side", side, "--examples", str(args.examples), "--batch_size",
                              str(args.batch_size), "--model", args.model, "--precision", precision],
                             capture_output=True, text=True, check=True)  # fmt: skip
        sides[name] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    report = {
        "bench": "train",
        "date": date.today().isoformat(),
        "machine": machine(),
        "settings": dict(model=Path(args.model).name, examples=args.examples, batch_size=args.batch_size, micro_batch_size=MICRO,
                         cutoff_len=CUTOFF, lora=LORA, learning_rate=LR, data=DATA.name),
        **sides,
        "speedup": sides["ours"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"],
        "speedup_fp32": sides["ours_fp32"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"],
        "held_out_loss_ratio": sides["ours"]["final_loss"] / sides["baseline"]["final_loss"],
        "memory_ratio": {name: side["peak_rss_mb"] / sides["baseline"]["peak_rss_mb"] for name, side in sides.items() if name != "baseline"},
    }  # fmt: skip
    out = ROOT / "bench" / "results" / f"train-{report['date']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
