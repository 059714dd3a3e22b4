"""The LoRA finetune as one plain function: data in, a weights archive out (a torchtune-style recipe)."""

import json
import math
import random
import shutil
import signal
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from safetensors.torch import load_file

from .archive import adapter_dir
from .data import IGNORE_INDEX, collate, load_examples, tokenize
from .model import Quantization, default_device, load_model, load_tokenizer
from .outputs import atomic_dir, atomic_file
from .prompts import build_prompt

STATE_FILE = "trainer_state.pt"


CE_CHUNK = 1024  # positions per cross-entropy chunk


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of a micro-batch.

    Only labelled positions get logits, in chunks recomputed during backward, so the
    full (tokens x vocabulary) fp32 logits tensor never exists: with a 49K vocabulary it
    dominates training memory, and writing it dominates the time of the output layer.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[:, :-1][keep], labels[keep]
    weight = causal_lm.get_output_embeddings().weight
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(labels), CE_CHUNK):
        total = total + checkpoint(_chunk_loss, hidden[i : i + CE_CHUNK], weight, labels[i : i + CE_CHUNK], use_reentrant=False)
    return total


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class MicroBatches:
    """Micro-batch i of an endless sequence of epochs, each a seeded shuffle: resumable at any i.

    With group_by_length, each run of 50 micro-batches of the shuffle is sorted by length, so
    a micro-batch pads to a near neighbour rather than to a random long example (transformers'
    LengthGroupedSampler does the same); every epoch still sees every example once.
    """

    def __init__(self, examples: list[dict], size: int, seed: int, pad_id: int, group_by_length: bool):
        self.examples, self.size, self.seed, self.pad_id = examples, size, seed, pad_id
        self.group = 50 * size if group_by_length else 0
        self.per_epoch = math.ceil(len(examples) / size)
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        if not self.group:
            return order
        groups = [order[i : i + self.group] for i in range(0, len(order), self.group)]
        return [k for g in groups for k in sorted(g, key=lambda k: -len(self.examples[k]["input_ids"]))]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._epoch_order(epoch))
        index = self._order[1][j * self.size : (j + 1) * self.size]
        return collate([self.examples[k] for k in index], self.pad_id)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(path: Path) -> Path:
    """path itself if it is a checkpoint, else its newest step-* child."""
    if (path / STATE_FILE).exists() or not path.is_dir():
        return path
    steps = sorted(path.glob("step-*"))
    if not steps:
        raise ValueError(f"resume_from: {path} holds no checkpoint (no {STATE_FILE}, no step-* folders)")
    return steps[-1]


def _load_checkpoint(path: Path, model, optimizer, scheduler, lora_fingerprint: dict) -> dict:
    from peft import set_peft_model_state_dict

    path = latest_checkpoint(path)
    try:
        state = torch.load(path / STATE_FILE, weights_only=True)
        adapter = load_file(path / "adapter_model.safetensors")
    except FileNotFoundError as e:
        raise ValueError(f"resume_from: {path} is not a training checkpoint ({Path(e.filename).name} missing)") from None
    except Exception as e:  # truncated or foreign files: never start over silently
        raise ValueError(f"resume_from: {path} is corrupt ({type(e).__name__}: {e})") from None
    if state["lora"] != lora_fingerprint:
        raise ValueError(f"resume_from: {path} was trained with {state['lora']}, not {lora_fingerprint}")
    set_peft_model_state_dict(model, adapter)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    print(f"resumed from {path} at step {state['step']}", flush=True)
    return state


def _save_checkpoint(root: Path, step: int, model, optimizer, scheduler, history: dict, lora_fingerprint: dict) -> None:
    with atomic_dir(root / f"step-{step:06d}", force=True) as tmp:
        model.save_pretrained(tmp)
        state = dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     history=history, rng=_rng_state(), lora=lora_fingerprint)  # fmt: skip
        torch.save(state, tmp / STATE_FILE)
    for old in sorted(root.glob("step-*"))[:-1]:  # keep the newest only
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def evaluate(model, batches: list[dict], device: str) -> float:
    model.eval()
    total = sum(loss_sum(model, {k: v.to(device) for k, v in b.items()}).item() for b in batches)
    model.train()
    return total / max(1, sum(label_count(b) for b in batches))


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "#" * filled + "." * (width - filled)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([h["step"] for h in history["train"]], [h["loss"] for h in history["train"]], label="train")
    if history["val"]:
        ax.plot([h["step"] for h in history["val"]], [h["loss"] for h in history["val"]], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


ARCHIVE_FILES = ["adapter_model.safetensors", "adapter_config.json", "prompt_template.json", "metrics.json", "loss.png"]


def write_archive(model, tokenizer, prompt_template: str, metrics: dict, output_path: Path) -> None:
    """The training output: adapter, template, metrics and loss curve in one tar, written atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp)
        template = {"name": prompt_template, "no_input": build_prompt(prompt_template, "{instruction}", "", tokenizer),
                    "with_input": build_prompt(prompt_template, "{instruction}", "{input}", tokenizer)}  # fmt: skip
        (tmp / "prompt_template.json").write_text(json.dumps(template, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_losses(metrics["history"], tmp / "loss.png")
        with atomic_file(output_path) as partial, tarfile.open(partial, "w") as tar:
            for name in ARCHIVE_FILES:
                tar.add(tmp / name, arcname=name)


def _check_writable(output_path: Path) -> None:
    """Fail before hours of training, not after: the archive's folder must exist (or be creatable) and be writable."""
    folder = output_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"output_path: cannot write into {folder} ({e.strerror or e})") from None


class _StopOnSignal:
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, then stop."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a server worker): leave signals alone
                pass
        return self

    def _handle(self, sig, frame):
        self.signal = sig
        print(f"received signal {sig}: stopping after this step", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal


def finetune(
    *,
    train_data: Path,
    base_weights: Path,
    output_path: Path,
    checkpoint_dir: Path,
    num_train_epochs: int,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    micro_batch_size: int,
    cutoff_len: int,
    val_set_size: int,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target_modules: str,
    train_on_inputs: bool,
    group_by_length: bool,
    prompt_template: str,
    quantization: Quantization,
    seed: int,
    resume_from: Path | None,
    checkpoint_steps: int,
    logging_steps: int,
    eval_steps: int,
) -> Path:
    """Train a LoRA adapter on Alpaca-format data; write the weights archive to output_path and return it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    if batch_size % micro_batch_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro_batch_size})")
    started = time.monotonic()
    _check_writable(Path(output_path))
    examples = load_examples(train_data)  # fail fast on bad data, before loading any model
    tokenizer = load_tokenizer(base_weights)
    encoded, truncated = [], 0
    for example in examples:
        item, was_truncated = tokenize(example, tokenizer, prompt_template, cutoff_len, train_on_inputs)
        if any(label != IGNORE_INDEX for label in item["labels"][1:]):  # an example cut before its answer teaches nothing
            encoded.append(item)
        truncated += was_truncated
    print(f"{len(examples)} examples; {truncated} truncated to cutoff_len={cutoff_len}", flush=True)

    random.Random(seed).shuffle(encoded)
    if val_set_size >= len(encoded) // 2 and val_set_size:
        val_set_size = len(encoded) // 10
        print(f"val_set_size lowered to {val_set_size} (a tenth of the {len(encoded)} examples)", flush=True)
    val, train = encoded[:val_set_size], encoded[val_set_size:]
    if not train:
        raise ValueError(f"train_data: {train_data} has no usable examples")

    torch.manual_seed(seed)
    random.seed(seed)
    device = default_device()
    model = load_model(base_weights, device=device, quantization=quantization)
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = [m.strip() for m in lora_target_modules.split(",") if m.strip()]
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")  # fmt: skip
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(f"lora_target_modules: {e}") from None
    lora_fingerprint = dict(r=lora_r, alpha=lora_alpha, targets=sorted(targets), base=str(base_weights))
    model.print_trainable_parameters()

    accumulation = batch_size // micro_batch_size
    batches = MicroBatches(train, micro_batch_size, seed, tokenizer.pad_token_id, group_by_length)
    total_steps = max_steps if max_steps > 0 else math.ceil(batches.per_epoch * num_train_epochs / accumulation)
    warmup = min(100, total_steps // 10)  # Alpaca-LoRA warms up for 100 steps; short runs get a tenth
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    val_batches = [collate(val[i : i + micro_batch_size], tokenizer.pad_token_id) for i in range(0, len(val), micro_batch_size)]

    step, history = 0, {"train": [], "val": []}
    if resume_from is not None:
        resume_from = Path(resume_from)
        if resume_from.is_dir():
            state = _load_checkpoint(resume_from, model, optimizer, scheduler, lora_fingerprint)
            step, history = state["step"], state["history"]
        else:  # an earlier training output: start from its adapter, with a fresh optimizer
            set_peft_model_state_dict(model, load_file(adapter_dir(str(resume_from)) / "adapter_model.safetensors"))
            print(f"initialised the adapter from {resume_from}", flush=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    model.train()
    window = dict(loss=0.0, labels=0, tokens=0, time=0.0, steps=0)
    trained = dict(tokens=0, time=0.0, steps=0)
    print(f"training {total_steps} steps of {batch_size} examples on {device}", flush=True)
    with _StopOnSignal() as stop:
        while step < total_steps:
            step_start = time.monotonic()
            micro = [batches[step * accumulation + k] for k in range(accumulation)]
            labels = sum(label_count(b) for b in micro)
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                with autocast:
                    loss = loss_sum(model, b) / max(1, labels)
                loss.backward()
                window["loss"] += loss.item() * labels
                window["tokens"] += int(b["attention_mask"].sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["labels"] += labels
            window["time"] += time.monotonic() - step_start
            window["steps"] += 1

            if step % logging_steps == 0 or step == total_steps:
                for key in trained:
                    trained[key] += window[key]
                tps = window["tokens"] / window["time"]
                loss_value = window["loss"] / max(1, window["labels"])
                history["train"].append(dict(step=step, loss=loss_value, lr=scheduler.get_last_lr()[0], tokens_per_s=tps))
                eta = (total_steps - step) * trained["time"] / trained["steps"]
                print(f"step {step}/{total_steps} [{_bar(step, total_steps)}] loss {loss_value:.4f} | "
                      f"{tps:.0f} tok/s | eta {_duration(eta)}", flush=True)  # fmt: skip
                window = dict(loss=0.0, labels=0, tokens=0, time=0.0, steps=0)
            if val_batches and (step % eval_steps == 0 or step == total_steps):
                val_loss = evaluate(model, val_batches, device)
                history["val"].append(dict(step=step, loss=val_loss))
                print(f"step {step}: validation loss {val_loss:.4f}", flush=True)
            if stop.signal is not None or (checkpoint_steps and step % checkpoint_steps == 0 and step < total_steps):
                _save_checkpoint(Path(checkpoint_dir), step, model, optimizer, scheduler, history, lora_fingerprint)
            if stop.signal is not None:
                raise Interrupted(f"stopped at step {step}, checkpoint written; resume with --resume_from {checkpoint_dir}", stop.signal)

    metrics = dict(
        examples=len(examples), train_examples=len(train), val_examples=len(val), truncated=truncated,
        steps=step, batch_size=batch_size, cutoff_len=cutoff_len, prompt_template=prompt_template,
        tokens_per_s=trained["tokens"] / trained["time"] if trained["time"] else None,
        wall_time_s=time.monotonic() - started,
        final_train_loss=history["train"][-1]["loss"] if history["train"] else None,
        final_val_loss=history["val"][-1]["loss"] if history["val"] else None,
        device=device, history=history,
    )  # fmt: skip
    write_archive(model, tokenizer, prompt_template, metrics, Path(output_path))
    print(f"done in {_duration(time.monotonic() - started)}: final train loss {metrics['final_train_loss']:.4f}", flush=True)
    return Path(output_path)
