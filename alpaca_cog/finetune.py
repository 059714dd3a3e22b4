"""The LoRA finetune as one plain function: data in, a weights archive out (a torchtune-style recipe)."""

import json
import math
import os
import random
import shutil
import signal
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .archive import TOKENIZER_FILES, adapter_dir, tokenizer_dir
from .data import IGNORE_INDEX, is_plain_text, load_examples, load_texts, pack, text_blocks, tokenize
from .distributed import (Processes, gradient_sync, load_optimizer_state, optimizer_state, processes, trainable_state,
                          whole, wrap)  # fmt: skip
from .lean import causal_attention, use_lean_layers
from .model import Precision, Quantization, fit_vocabulary, load_model, load_tokenizer, training_dtype
from .outputs import atomic_dir, atomic_file
from .prompts import build_prompt

STATE_FILE = "trainer_state.pt"

# oneDNN keeps each bf16 matmul it builds, per shape, in two caches of 1024 (its primitives, ideep's LRU); packed
# micro-batches change shape at every step, so a CPU run grew ~20 MB a step (SmolLM2). One micro-batch's shapes fit
# in 32 and are all it reuses. Both are read at the process's first bf16 matmul; a value set by the user wins.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "32")


CE_CHUNK = 128  # positions per cross-entropy chunk: 25 MB of fp32 logits with a 49K vocabulary (256 was no faster on a CPU)
MAX_GRAD_NORM = 1.0  # transformers Trainer's default, so Alpaca-LoRA's recipe clips at 1.0 too
PACKED_ATTENTION = "packed_sdpa"
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def packed_attention(module, query, key, value, attention_mask, sequence_bounds: list[int] | None = None, **kwargs):
    """transformers' SDPA attention run on each packed example alone: causal, never across examples, no padding.
    On a CPU (no attention dropout) lean.causal_attention computes it."""
    if sequence_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cpu" and not kwargs.get("dropout"):
        pieces = [causal_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], kwargs.get("scaling"))
                  for s, e in zip(sequence_bounds, sequence_bounds[1:])]  # fmt: skip
        return torch.cat(pieces, dim=2).transpose(1, 2), None
    pieces = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
              for s, e in zip(sequence_bounds, sequence_bounds[1:])]  # fmt: skip
    return torch.cat(pieces, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against labels, CE_CHUNK positions at a time.

    Each chunk's gradient is taken as soon as its logits exist, so the (positions x vocabulary)
    fp32 logits are never whole in memory, and never recomputed during backward: with a 49K
    vocabulary they dominate training memory, and the output layer is a fifth of the FLOPs.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for i in range(0, len(labels), CE_CHUNK):
            h, y = hidden[i : i + CE_CHUNK], labels[i : i + CE_CHUNK, None]
            log_probs = torch.log_softmax(F.linear(h, weight), -1, dtype=torch.float32)
            total -= log_probs.gather(1, y).sum()
            if need_hidden or need_weight:
                grad = log_probs.exp_()  # softmax, in place
                grad.scatter_add_(1, y, grad.new_full(y.shape, -1.0))
                grad = grad.to(h.dtype)
                if need_hidden:
                    grad_hidden[i : i + CE_CHUNK] = grad @ weight
                if need_weight:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        return tuple(None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors) + (None,)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of a packed micro-batch (data.pack)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if causal_lm.config._attn_implementation != PACKED_ATTENTION:  # without bounds it is plain SDPA: harmless elsewhere
        causal_lm.set_attn_implementation(PACKED_ATTENTION)
    positions = batch["position_ids"]
    bounds = (positions[0] == 0).nonzero().flatten().tolist() + [positions.shape[1]]
    hidden = causal_lm.model(input_ids=batch["input_ids"], position_ids=positions, sequence_bounds=bounds).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    # With lm_head in modules_to_save the output layer is PEFT's wrapper, whose .weight is the trainable copy's.
    return _LinearCrossEntropy.apply(hidden[:, :-1][keep], causal_lm.get_output_embeddings().weight, labels[keep])


class CausalLMLoss(torch.nn.Module):
    """loss_sum as a module's forward, so that DDP and FSDP see (and sync, unshard) the whole computation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_sum(self.model, dict(input_ids=input_ids, position_ids=position_ids, labels=labels))


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class MicroBatches:
    """Micro-batch i (packed) of an endless sequence of epochs, each a seeded shuffle: resumable at any i."""

    def __init__(self, examples: list[dict], size: int, seed: int):
        self.examples, self.size, self.seed = examples, size, seed
        self.per_epoch = math.ceil(len(examples) / size)
        self._order: tuple[int, list[int]] | None = None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order = (epoch, order)
        return pack([self.examples[k] for k in self._order[1][j * self.size : (j + 1) * self.size]])


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


# Checkpoints hold the adapter (as PEFT saves it) and the optimizer state whole and keyed by
# parameter name, so that any number of processes, DDP or FSDP, can resume them.
def _read_checkpoint(path: Path, lora_fingerprint: dict) -> dict:
    path = latest_checkpoint(path)
    try:
        state = torch.load(path / STATE_FILE, weights_only=True)
        missing = {"step", "optimizer", "scheduler", "history", "rng", "lora"} - set(state)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        state["adapter"] = load_file(path / "adapter_model.safetensors")
    except FileNotFoundError as e:
        raise ValueError(f"resume_from: {path} is not a training checkpoint ({Path(e.filename).name} missing)") from None
    except Exception as e:  # truncated or foreign files: never start over silently
        raise ValueError(f"resume_from: {path} is corrupt ({type(e).__name__}: {e})") from None
    if state["lora"] != lora_fingerprint:
        raise ValueError(f"resume_from: {path} was trained with {state['lora']}, not {lora_fingerprint}")
    state["path"] = path
    return state


def _save_adapter(model, folder: Path, weights: dict[str, torch.Tensor]) -> None:
    # Where training changed whole embeddings (a grown vocabulary) modules_to_save holds them already; PEFT's
    # save_embedding_layers="auto" would add another copy of them.
    model.save_pretrained(folder, state_dict=weights, save_embedding_layers=False)


def _save_checkpoint(root: Path, step: int, model, optimizer, scheduler, history: dict, lora_fingerprint: dict, main: bool) -> None:
    weights, optimizer_saved = trainable_state(model), optimizer_state(model, optimizer)  # every process gathers
    if not main:
        return
    with atomic_dir(root / f"step-{step:06d}", force=True) as tmp:
        _save_adapter(model, tmp, weights)  # a PEFT adapter, loadable on its own
        state = dict(step=step, optimizer=optimizer_saved, scheduler=scheduler.state_dict(),
                     history=history, rng=_rng_state(), lora=lora_fingerprint)  # fmt: skip
        torch.save(state, tmp / STATE_FILE)
    for old in sorted(root.glob("step-*"))[:-1]:  # keep the newest only
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def evaluate(loss_module, batches: list[dict], procs: Processes) -> float:
    """Mean validation loss per labelled token; each process takes every count-th batch."""
    loss_module.eval()
    total, labels = 0.0, 0
    # Every process runs as many forward passes as the others (FSDP's gathers must pair up); padding ones count for nothing.
    for i in range(procs.rank, math.ceil(len(batches) / procs.count) * procs.count, procs.count):
        batch = batches[min(i, len(batches) - 1)]
        loss = loss_module(**{k: v.to(procs.device) for k, v in batch.items()}).item()
        if i < len(batches):
            total, labels = total + loss, labels + label_count(batch)
    loss_module.train()
    total, labels = procs.sum(total, labels)
    return total / max(1, labels)


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
EVAL_AT_END_EXAMPLES = 64  # a signal, not a benchmark: greedy answers dominate the time, and trainings should stay short


def evaluate_at_end(model, tokenizer, examples: list, template: str, cutoff_len: int, sharded: bool) -> dict | None:
    """eval_at_end: the trained model on (at most 64 of) the validation examples, for metrics.json and eval.png."""
    from .evaluation import evaluate_model  # rouge_score and its nltk load only when asked for

    if sharded:  # only all processes together can run a sharded model, and greedy answers would have to stay in step
        print("eval_at_end: skipped under fsdp; run evaluate.py on the archive", flush=True)
        return None
    if not examples:
        print("eval_at_end: skipped, no validation examples (val_set_size 0)", flush=True)
        return None
    examples = examples[:EVAL_AT_END_EXAMPLES]
    # Room for an answer half as long again as the longest reference; beyond cutoff_len nothing was trained.
    max_tokens = min(cutoff_len, max(len(tokenizer(e.output, add_special_tokens=False)["input_ids"]) for e in examples) * 3 // 2)
    print(f"eval_at_end: {len(examples)} validation examples, greedy answers of up to {max_tokens} tokens", flush=True)
    result = evaluate_model(model.eval(), tokenizer, examples, template, max_tokens)
    print(f"eval_at_end: perplexity {result['perplexity']:.3f}, ROUGE-L {result['rouge_l']:.3f}"
          + (f", exact match {result['exact_match']:.1%}" if result["exact_match"] is not None else ""), flush=True)  # fmt: skip
    return result


def write_archive(model, adapter: dict, tokenizer, prompt_template: str, metrics: dict, output_path: Path,
                  tokenizer_folder: Path | None = None) -> None:  # fmt: skip
    """The training output: adapter, template, metrics and loss curve in one tar, written atomically; and the
    tokenizer's files from `tokenizer_folder` when training extended the vocabulary."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _save_adapter(model, tmp, adapter)
        template = {"name": prompt_template, "no_input": build_prompt(prompt_template, "{instruction}", "", tokenizer),
                    "with_input": build_prompt(prompt_template, "{instruction}", "{input}", tokenizer)}  # fmt: skip
        (tmp / "prompt_template.json").write_text(json.dumps(template, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_losses(metrics["history"], tmp / "loss.png")
        names = list(ARCHIVE_FILES)
        if "evaluation" in metrics:
            from .evaluation import plot_evaluation

            plot_evaluation({"trained": metrics["evaluation"]}, tmp / "eval.png")
            names.append("eval.png")
        with atomic_file(output_path) as partial, tarfile.open(partial, "w") as tar:
            for name in names:
                tar.add(tmp / name, arcname=name)
            for name in TOKENIZER_FILES if tokenizer_folder else ():
                if (tokenizer_folder / name).is_file():
                    tar.add(tokenizer_folder / name, arcname=name)


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


def _encode_and_split(examples: list, tokenizer, prompt_template: str, cutoff_len: int, train_on_inputs: bool,
                      val_set_size: int, seed: int, say) -> tuple[list[dict], list[dict], int]:
    """(train, validation, truncated count): the examples tokenized, shuffled (seeded) and split."""
    encoded, truncated = [], 0
    for example in examples:
        item, was_truncated = tokenize(example, tokenizer, prompt_template, cutoff_len, train_on_inputs)
        if any(label != IGNORE_INDEX for label in item["labels"][1:]):  # an example cut before its answer teaches nothing
            encoded.append(item | {"example": example})  # the text too, for eval_at_end
        truncated += was_truncated
    say(f"{len(examples)} examples; {truncated} truncated to cutoff_len={cutoff_len}")
    return *_split(encoded, val_set_size, seed, "examples", say), truncated


def _blocks_and_split(texts: list[str], tokenizer, cutoff_len: int, val_set_size: int, seed: int, say) -> tuple[list[dict], list[dict], int]:
    """(train, validation, 0): plain text as cutoff_len-token blocks (continued pre-training), shuffled and split."""
    blocks = text_blocks(texts, tokenizer, cutoff_len)
    say(f"{len(texts)} texts; {sum(len(b['input_ids']) for b in blocks)} tokens in {len(blocks)} blocks of cutoff_len={cutoff_len}")
    return *_split(blocks, val_set_size, seed, "blocks", say), 0


def _split(items: list[dict], val_set_size: int, seed: int, unit: str, say) -> tuple[list[dict], list[dict]]:
    """(train, validation): the items shuffled (seeded), val_set_size of them held out."""
    random.Random(seed).shuffle(items)
    if val_set_size >= len(items) // 2 and val_set_size:
        val_set_size = len(items) // 10
        say(f"val_set_size lowered to {val_set_size} (a tenth of the {len(items)} {unit})")
    return items[val_set_size:], items[:val_set_size]


EMBEDDINGS = ("embed_tokens", "lm_head")  # LLaMA's input and output layers, one matrix when the model ties them


def _training_tokenizer(tokenizer: Path | None, base_weights: Path, modules_to_save: list[str]) -> tuple[object, Path | None]:
    """(tokenizer, the folder it came from when not the base's): the `tokenizer` input checked to extend the base's
    vocabulary, every old id kept, with its new rows trained whole (modules_to_save)."""
    from transformers import AutoConfig

    if tokenizer is None:
        return load_tokenizer(base_weights), None
    folder = tokenizer_dir(str(tokenizer), tempfile.mkdtemp(prefix="alpaca-cog-tokenizer-"))
    extended, base_vocab = load_tokenizer(folder), load_tokenizer(base_weights).get_vocab()
    vocab = extended.get_vocab()
    moved = next(((piece, i) for piece, i in base_vocab.items() if vocab.get(piece) != i), None)
    if moved:
        raise ValueError(f"tokenizer: {tokenizer} does not extend the base's vocabulary: {moved[0]!r} is id {moved[1]} in "
                         f"the base, {vocab.get(moved[0])} here (convert_weights.py --extend_vocab keeps every id)")  # fmt: skip
    config = AutoConfig.from_pretrained(base_weights)
    trained = set(EMBEDDINGS) & set(modules_to_save)
    # Tied embeddings are one matrix: training either trains both (PEFT's ensure_weight_tying).
    if len(extended) > config.vocab_size and not (trained if config.tie_word_embeddings else trained == set(EMBEDDINGS)):
        raise ValueError(f"modules_to_save: the tokenizer adds {len(extended) - config.vocab_size} tokens, whose embedding "
                         f"and output rows must be trained and saved: include {','.join(EMBEDDINGS)}")  # fmt: skip
    return extended, folder


def _lora_model(base_weights, procs: Processes, shard: bool, quantization: Quantization, dtype: torch.dtype, lora: dict,
                vocab_size: int, say):  # fmt: skip
    """The base model (in `dtype`, or quantized; its embeddings grown to `vocab_size`) with fresh LoRA adapters on
    `lora["target_modules"]`, which PEFT keeps in fp32 whatever the base's dtype, and trainable copies of
    `lora["modules_to_save"]`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # FSDP shards from host memory, so no GPU ever holds the whole model.
    model = load_model(base_weights, device="cpu" if shard else procs.device, dtype=dtype, quantization=quantization, training=True)
    if fit_vocabulary(model, vocab_size, mean_resizing=True):
        say(f"embeddings grown to the tokenizer's {vocab_size} tokens (new rows around the old ones' mean)")
    _check_modules_to_save(model, lora["modules_to_save"] or [])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    named = set(EMBEDDINGS) & {*lora["target_modules"], *(lora["modules_to_save"] or [])}
    if tied and named:
        say(f"tied embeddings: {' and '.join(EMBEDDINGS)} are one matrix in this model; {', '.join(sorted(named))} "
            "trains it for both, and it stays tied")  # fmt: skip
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(**lora, bias="none", task_type="CAUSAL_LM", ensure_weight_tying=tied and bool(named))
    if procs.device == "cpu" and quantization == "none":  # measured on CPUs only; GPUs (bf16 autocast) keep the stock modules
        use_lean_layers(model, config)
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"lora_target_modules: {e}") from None
    if hasattr(model.get_base_model().get_output_embeddings(), "lora_A"):
        # loss_sum multiplies by the output layer's weight itself (chunked cross-entropy): a LoRA beside it would get no gradient.
        raise ValueError("lora_target_modules: a LoRA on the output layer (lm_head" + (", tied to embed_tokens" if tied else "")
                         + ") is not trained by this recipe; train it whole with modules_to_save instead")  # fmt: skip
    if procs.main:
        model.print_trainable_parameters()
    return model


def _check_modules_to_save(model, names: list[str]) -> None:
    """Each name must be a module of the model: a misspelt one would train nothing."""
    modules = [name for name, _ in model.named_modules()]
    for name in names:
        if not any(m == name or m.endswith(f".{name}") for m in modules):
            raise ValueError(f"modules_to_save: {name!r} is no module of this model (LLaMA's: embed_tokens, lm_head, norm, ...)")


def _load_adapter_to_resume(model, resume_from: Path, lora_fingerprint: dict, say) -> dict | None:
    """Put a checkpoint's (or an earlier output's) adapter into `model`; return the checkpoint, if it was one."""
    from peft import set_peft_model_state_dict

    checkpoint = None
    if resume_from.is_dir():
        checkpoint = _read_checkpoint(resume_from, lora_fingerprint)
        adapter = checkpoint["adapter"]
    else:
        adapter = load_file(adapter_dir(str(resume_from)) / "adapter_model.safetensors")
        say(f"initialised the adapter from {resume_from}")
    set_peft_model_state_dict(model, adapter)  # before sharding: whole tensors into whole parameters
    return checkpoint


def _backward(loss_module, mine: list[dict], labels: int, procs: Processes, autocast) -> tuple[float, int]:
    """Gradients of this process's micro-batches of one step; (summed loss, tokens) of them."""
    step_loss, tokens = 0.0, 0
    for i, b in enumerate(mine):
        b = {k: v.to(procs.device) for k, v in b.items()}
        with gradient_sync(loss_module, enabled=i == len(mine) - 1):
            with autocast:
                loss = loss_module(**b)
            # DDP and FSDP average gradients over processes; scaled so, the update is one process's on the whole batch.
            (loss * (procs.count / max(1, labels))).backward()
        step_loss += loss.item()
        tokens += b["input_ids"].numel()
    return step_loss, tokens


def _log_window(window: dict, trained: dict, history: dict, step: int, total_steps: int, grad_norm: float, lr: float, say) -> None:
    """Account the steps since the last report (`window`) into `trained` and the history, and print one line."""
    for key in trained:
        trained[key] += window[key]
    tps = window["tokens"] / window["time"]
    loss_value = window["loss"] / max(1, window["labels"])
    history["train"].append(dict(step=step, loss=loss_value, grad_norm=grad_norm, lr=lr, tokens_per_s=tps))
    eta = (total_steps - step) * trained["time"] / trained["steps"]
    say(f"step {step}/{total_steps} [{_bar(step, total_steps)}] loss {loss_value:.4f} | {tps:.0f} tok/s | eta {_duration(eta)}")


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
    modules_to_save: str,
    tokenizer: Path | None,
    train_on_inputs: bool,
    prompt_template: str,
    quantization: Quantization,
    precision: Precision,
    fsdp: bool,
    seed: int,
    resume_from: Path | None,
    checkpoint_steps: int,
    logging_steps: int,
    eval_steps: int,
    eval_at_end: bool,
) -> Path:
    """Train a LoRA adapter on Alpaca-format data, or on plain text (continued pre-training); write the weights
    archive to output_path and return it.

    Under torchrun or accelerate launch, each process trains on its share of every batch and
    only the first one prints and writes files.
    """
    from transformers import get_linear_schedule_with_warmup
    from transformers.utils import logging

    with processes() as procs:
        def say(message: str) -> None:
            if procs.main:
                print(message, flush=True)

        if not procs.main:
            logging.set_verbosity_error()  # library warnings once, not once per process
        if batch_size % (micro_batch_size * procs.count):
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro_batch_size})"
                             + (f" times the {procs.count} processes" if procs.count > 1 else ""))  # fmt: skip
        if fsdp and quantization != "none":
            raise ValueError("quantization: 8bit/4bit base weights cannot be sharded with fsdp; choose one")
        started = time.monotonic()
        if procs.main:
            _check_writable(Path(output_path))
        text = is_plain_text(train_data)
        examples = load_texts(train_data) if text else load_examples(train_data)  # fail fast on bad data, before loading any model
        saved = [m.strip() for m in modules_to_save.split(",") if m.strip()]
        tokenizer, tokenizer_folder = _training_tokenizer(tokenizer, base_weights, saved)  # the input's path, then the tokenizer
        if text:
            say("plain text: continued pre-training, every token learned; the archive's prompt template is 'none'")
            prompt_template = "none"
            train, val, truncated = _blocks_and_split(examples, tokenizer, cutoff_len, val_set_size, seed, say)
        else:
            train, val, truncated = _encode_and_split(examples, tokenizer, prompt_template, cutoff_len, train_on_inputs, val_set_size, seed, say)
        if not train:
            raise ValueError(f"train_data: {train_data} has no usable examples")

        torch.manual_seed(seed)
        random.seed(seed)
        shard = fsdp and procs.count > 1
        targets = [m.strip() for m in lora_target_modules.split(",") if m.strip()]
        lora_fingerprint = (dict(r=lora_r, alpha=lora_alpha, targets=sorted(targets), base=str(base_weights))
                            | ({"modules_to_save": sorted(saved)} if saved else {})
                            | ({"vocab_size": len(tokenizer)} if tokenizer_folder else {}))  # fmt: skip
        lora = dict(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, modules_to_save=saved or None)
        dtype = training_dtype(procs.device, precision, whole_modules=bool(saved))
        model = _lora_model(base_weights, procs, shard, quantization, dtype, lora, len(tokenizer) if tokenizer_folder else 0, say)
        checkpoint = None
        if resume_from is not None:  # a checkpoint folder, or an earlier training output (its adapter, a fresh optimizer)
            checkpoint = _load_adapter_to_resume(model, Path(resume_from), lora_fingerprint, say)
        loss_module = wrap(CausalLMLoss(model), procs, shard)

        accumulation = batch_size // micro_batch_size
        batches = MicroBatches(train, micro_batch_size, seed)
        total_steps = max_steps if max_steps > 0 else math.ceil(batches.per_epoch * num_train_epochs / accumulation)
        warmup = min(100, total_steps // 10)  # Alpaca-LoRA warms up for 100 steps; short runs get a tenth
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
        val_batches = [pack(val[i : i + micro_batch_size]) for i in range(0, len(val), micro_batch_size)]

        step, history = 0, {"train": [], "val": []}
        if checkpoint is not None:
            load_optimizer_state(model, optimizer, checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            _set_rng_state(checkpoint["rng"])
            step, history = checkpoint["step"], checkpoint["history"]
            say(f"resumed from {checkpoint['path']} at step {step}")

        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=procs.device.startswith("cuda"))
        loss_module.train()
        window = dict(loss=0.0, labels=0, tokens=0, time=0.0, steps=0)
        trained = dict(tokens=0, time=0.0, steps=0)
        say(f"training {total_steps} steps of {batch_size} examples on {procs.device}, {_DTYPE_NAMES[dtype]} base"
            + (f" in {procs.count} processes ({'FSDP' if shard else 'DDP'})" if procs.count > 1 else "")
            + (" (fsdp: one process, nothing to shard)" if fsdp and not shard else ""))  # fmt: skip
        try:
            with _StopOnSignal() as stop:
                while step < total_steps:
                    step_start = time.monotonic()
                    micro = [batches[step * accumulation + k] for k in range(accumulation)]
                    labels = sum(label_count(b) for b in micro)
                    step_loss, tokens = _backward(loss_module, micro[procs.rank :: procs.count], labels, procs, autocast)
                    grad_norm = float(whole(torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    step_loss, tokens, stopping = procs.sum(step_loss, tokens, float(stop.signal is not None))
                    window["loss"] += step_loss
                    window["labels"] += labels
                    window["tokens"] += int(tokens)
                    window["time"] += time.monotonic() - step_start
                    window["steps"] += 1

                    if step % logging_steps == 0 or step == total_steps:
                        _log_window(window, trained, history, step, total_steps, grad_norm, scheduler.get_last_lr()[0], say)
                        window = dict(loss=0.0, labels=0, tokens=0, time=0.0, steps=0)
                    if val_batches and (step % eval_steps == 0 or step == total_steps):
                        val_loss = evaluate(loss_module, val_batches, procs)
                        history["val"].append(dict(step=step, loss=val_loss))
                        say(f"step {step}: validation loss {val_loss:.4f}")
                    if stopping or (checkpoint_steps and step % checkpoint_steps == 0 and step < total_steps):
                        _save_checkpoint(Path(checkpoint_dir), step, model, optimizer, scheduler, history, lora_fingerprint, procs.main)
                    if stopping:
                        raise Interrupted(f"stopped at step {step}, checkpoint written; resume with --resume_from {checkpoint_dir}",
                                          stop.signal or signal.SIGTERM)  # fmt: skip
        finally:
            # DDP's reducer holds the process group from C++: freed after the group is destroyed, it would join
            # gloo's threads with the GIL held while one of them waits for the GIL (pytorch#56297), a hang at exit.
            del loss_module

        metrics = dict(
            data_format="text" if text else "alpaca", examples=len(examples), train_examples=len(train), val_examples=len(val),
            truncated=truncated,
            steps=step, batch_size=batch_size, cutoff_len=cutoff_len, prompt_template=prompt_template,
            tokens_per_s=trained["tokens"] / trained["time"] if trained["time"] else None,
            wall_time_s=time.monotonic() - started,
            final_train_loss=history["train"][-1]["loss"] if history["train"] else None,
            final_val_loss=history["val"][-1]["loss"] if history["val"] else None,
            device=procs.device, precision=_DTYPE_NAMES[dtype], processes=procs.count, history=history,
        )  # fmt: skip
        adapter = trainable_state(model)  # every process gathers its shards
        if eval_at_end and text:
            say("eval_at_end: skipped for plain text (the validation loss measures it)")
        elif eval_at_end and procs.main:
            with autocast:
                evaluation = evaluate_at_end(model, tokenizer, [v["example"] for v in val], prompt_template, cutoff_len, shard)
            if evaluation is not None:
                metrics["evaluation"] = evaluation
        if procs.main:
            write_archive(model, adapter, tokenizer, prompt_template, metrics, Path(output_path), tokenizer_folder)
        say(f"done in {_duration(time.monotonic() - started)}: final train loss {metrics['final_train_loss']:.4f}")
        return Path(output_path)
