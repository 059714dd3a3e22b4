"""The LoRA finetune: it learns, its archive loads in plain PEFT, and it survives being killed."""

import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from alpaca_cog import finetune as recipe
from alpaca_cog.archive import adapter_dir
from alpaca_cog.data import IGNORE_INDEX, pack
from alpaca_cog.distributed import Processes
from alpaca_cog.finetune import CausalLMLoss, evaluate, finetune, loss_sum
from alpaca_cog.generate import GenerationParams, complete, generate_kwargs
from alpaca_cog.model import apply_adapter, cpu_packable, load_model, load_tokenizer
from alpaca_cog.prompts import encode_prompt
from conftest import ROOT, TINY_RUN, metrics_of, run_finetune, tiny_llama, train_defaults


@pytest.mark.parametrize("train_output_layer", [False, True])
def test_packed_loss_and_gradients_equal_each_example_run_alone(monkeypatch, train_output_layer):
    """Packing (no padding, attention inside each example) and the chunked cross-entropy change nothing:
    the loss and every gradient equal transformers' own loss summed over the examples run one by one."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(recipe, "CE_CHUNK", 5)  # several chunks, the last one ragged
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: every path carries gradient
    model = get_peft_model(tiny_llama(tie_word_embeddings=False), lora).train()
    model.get_base_model().lm_head.weight.requires_grad_(train_output_layer)
    ids = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 13)]
    examples = [dict(input_ids=ids[0], labels=ids[0]), dict(input_ids=ids[1], labels=ids[1]),
                dict(input_ids=ids[2], labels=[IGNORE_INDEX] * 6 + ids[2][6:])]  # a masked prompt  # fmt: skip

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    reference = sum(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                    * sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)  # fmt: skip
    expected = gradients(reference)
    packed = loss_sum(model, pack(examples))
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    assert len(expected) == 2 * 2 * 2 + train_output_layer
    for got, want in zip(gradients(packed), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_training(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return run_finetune(tiny_model_dir, tmp, max_steps=20)


def test_loss_falls_and_archive_holds_what_it_should(tiny_training):
    with tarfile.open(tiny_training) as tar:
        assert sorted(tar.getnames()) == sorted(
            ["adapter_model.safetensors", "adapter_config.json", "prompt_template.json", "metrics.json", "loss.png"]
        )
        assert tar.extractfile("loss.png").read(8) == b"\x89PNG\r\n\x1a\n"
        template = json.load(tar.extractfile("prompt_template.json"))
    assert template["name"] == "alpaca" and "### Response:" in template["no_input"]
    metrics = metrics_of(tiny_training)
    train = [h["loss"] for h in metrics["history"]["train"]]
    assert metrics["steps"] == 20 and len(train) == 20
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.5, train  # nats; about 1.4 measured
    assert [v["step"] for v in metrics["history"]["val"]] == [5, 10, 15, 20]
    assert metrics["history"]["val"][-1]["loss"] < metrics["history"]["val"][0]["loss"]
    assert metrics["val_examples"] == 8 and metrics["train_examples"] == 56 and metrics["tokens_per_s"] > 0


def test_adapter_loads_in_vanilla_peft_and_merged_equals_unmerged(tiny_training, tiny_model_dir, tmp_path):
    folder = adapter_dir(str(tiny_training), tmp_path)
    ids = torch.tensor([encode_prompt(load_tokenizer(tiny_model_dir), "alpaca", "What is 2 + 2?")])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, folder).eval()(ids).logits
        merged = apply_adapter(load_model(tiny_model_dir, device="cpu"), folder, merge=True)
        unmerged = apply_adapter(load_model(tiny_model_dir, device="cpu"), folder, merge=False)
        merged_logits, unmerged_logits = merged(ids).logits, unmerged(ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(unmerged_logits, peft_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)  # fp32 re-association only


def test_bf16_base_trains_fp32_adapters_to_the_fp32_losses(tiny_training, tiny_model_dir, tmp_path):
    """precision=bf16 (what auto picks on CPUs with native bf16 and on GPUs): the frozen base in bf16, the LoRA
    weights and their optimizer in fp32; the run follows the fp32 run's losses (same seed, data and steps)."""
    from safetensors.torch import load_file

    archive = run_finetune(tiny_model_dir, tmp_path, max_steps=20, precision="bf16")
    metrics, reference = metrics_of(archive), metrics_of(tiny_training)
    assert metrics["precision"] == "bf16" and reference["precision"] == "fp32"
    assert {t.dtype for t in load_file(adapter_dir(str(archive), tmp_path / "x") / "adapter_model.safetensors").values()} == {torch.float32}
    for key in ("train", "val"):
        ours, theirs = [h["loss"] for h in metrics["history"][key]], [h["loss"] for h in reference["history"][key]]
        assert ours == pytest.approx(theirs, rel=0.02), key


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_multiplies_it_natively(monkeypatch, native):
    from alpaca_cog import model

    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native)
    assert model.training_dtype("cpu", "auto") == (torch.bfloat16 if native else torch.float32)
    assert model.training_dtype("cuda", "auto") == torch.bfloat16
    assert model.training_dtype("cpu", "fp32") == torch.float32 and model.training_dtype("cuda", "fp32") == torch.float32
    assert model.training_dtype("cpu", "bf16") == torch.bfloat16
    # modules_to_save's whole copies would train in bf16 on a CPU (no autocast there)
    assert model.training_dtype("cpu", "auto", whole_modules=True) == torch.float32
    with pytest.raises(ValueError, match="precision: bf16 would train modules_to_save's whole copies in bf16"):
        model.training_dtype("cpu", "bf16", whole_modules=True)


def _linear4bit(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _repacked(layer) -> bool:
    """Whether bitsandbytes has repacked this layer's weight for its AVX512-BF16 CPU inference kernel."""
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def _cpu_has_bf16_4bit_kernel() -> bool:
    import bitsandbytes.functional

    return bool(bitsandbytes.functional.has_avx512bf16())


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_trains_and_validates_on_cpu(quantizable_model_dir, tmp_path, quantization):
    """Training steps and validation passes alternating, as in a real run, on a model whose every layer
    bitsandbytes can run in each of its CPU paths (AVX2, AVX512, AVX512-BF16)."""
    model = load_model(quantizable_model_dir, device="cpu", quantization=quantization)
    assert {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization] in {type(m).__name__ for m in model.modules()}
    with torch.no_grad():  # inference: on AVX512-BF16 CPUs the 4-bit layers are repacked for the packed kernel
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()
    assert [_repacked(layer) for layer in _linear4bit(model)] == [_cpu_has_bf16_4bit_kernel()] * len(_linear4bit(model))
    archive = run_finetune(quantizable_model_dir, tmp_path, max_steps=2, eval_steps=1, quantization=quantization)
    history = metrics_of(archive)["history"]
    assert [h["step"] for h in history["train"]] == [v["step"] for v in history["val"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) for h in history["train"] + history["val"]), history


def test_4bit_lora_gradients_are_unchanged_by_a_validation_pass(quantizable_model_dir):
    """bitsandbytes' packed 4-bit CPU kernel (AVX512-BF16) has no backward: had validation (eval mode, no grad)
    repacked the base weights, every later step would train on gradients cut at the base layers, silently."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_model(quantizable_model_dir, device="cpu", quantization="4bit", training=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    loss_module = CausalLMLoss(get_peft_model(model, lora))
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    ids = [torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 13)]
    batch = pack([dict(input_ids=i, labels=i) for i in ids])

    def gradients() -> list[torch.Tensor]:
        loss_module.train()
        loss_module.zero_grad()
        loss_module(**batch).backward()
        return [p.grad.clone() for p in trainable]

    before = gradients()
    assert all(g.abs().sum() > 0 for g in before)
    evaluate(loss_module, [batch], Processes())
    assert not any(_repacked(layer) for layer in _linear4bit(model))
    for after, want in zip(gradients(), before, strict=True):
        torch.testing.assert_close(after, want, rtol=0, atol=0)


# 32 wide (tiny_llama): in_features 32 is less than one 64-wide block, k_proj/v_proj have 16 rows.
# 96 wide: in_features 96 is one and a half blocks (a real model's width may be so), down_proj (in 192) can repack.
@pytest.mark.parametrize("shape", [{}, dict(hidden_size=96, intermediate_size=192, num_attention_heads=6)], ids=["32-wide", "96-wide"])
def test_4bit_layers_bitsandbytes_cannot_repack_fall_back_to_its_plain_cpu_kernel(tmp_path, shape):
    """bitsandbytes 0.50 repacks every 4-bit layer for its AVX512-BF16 kernel at the first inference pass, and
    fails with a reshape error on the shapes it cannot repack; load_model leaves those to the plain kernel."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    tiny_llama(**shape).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", quantization="4bit")
    layers = _linear4bit(model)
    for layer in layers:  # cpu_packable is bitsandbytes' own condition (its repacking is plain torch: checked on any CPU)
        try:
            _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
            repackable = True
        except (RuntimeError, AssertionError):
            repackable = False
        assert cpu_packable(layer) == repackable, (layer.in_features, layer.out_features)
    assert 0 < sum(map(cpu_packable, layers)) < len(layers)  # precondition: both kinds of layer
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        reference = model.train()(ids).logits  # training mode: never repacked
        logits = model.eval()(ids).logits
    assert [_repacked(layer) for layer in layers] == [cpu_packable(layer) and _cpu_has_bf16_4bit_kernel() for layer in layers]
    torch.testing.assert_close(logits, reference, rtol=0, atol=3e-3)  # the packed kernel computes in bf16: 5e-4 measured


def test_packed_4bit_cpu_inference_decodes_the_training_paths_greedy_tokens(weights_dir):
    """SmolLM2 (576 wide) in 4-bit. Decoding (eval mode, inference_mode) takes bitsandbytes' packed bf16 kernel on
    AVX512-BF16 CPUs, its plain no-grad kernel elsewhere; training takes its autograd path (dequantize, matmul,
    in float32). The training path's first choice after each prefix of the decoded answer is the decoded token:
    its own greedy decoding gives the same tokens."""
    tokenizer = load_tokenizer(weights_dir)
    model = load_model(weights_dir, device="cpu", quantization="4bit")
    training = copy.deepcopy(model).train()  # copied before any forward pass: never repacked
    layers = _linear4bit(model)
    assert len(layers) == 7 * model.config.num_hidden_layers and all(map(cpu_packable, layers))
    # A prompt whose greedy answer is clear-cut: its closest call (top-1 minus top-2 logit, 0.34) is four times
    # the most the packed kernel's bf16 arithmetic moves such a gap here (0.08).
    prompt = encode_prompt(tokenizer, "alpaca", "Name three primary colors.")
    greedy = generate_kwargs(GenerationParams(temperature=0, max_tokens=16), tokenizer)
    with torch.inference_mode():  # as alpaca_cog.generate decodes
        ids = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **greedy)
    answer = ids[0, len(prompt) :].tolist()
    assert len(answer) >= 8, tokenizer.decode(answer)
    assert [_repacked(layer) for layer in layers] == [_cpu_has_bf16_4bit_kernel()] * len(layers)
    embeds = training.get_input_embeddings()(ids.clone()).detach().requires_grad_()  # inputs needing grad, as in training
    logits = training(inputs_embeds=embeds).logits[0, len(prompt) - 1 : -1]
    assert logits.requires_grad and not any(_repacked(layer) for layer in _linear4bit(training))
    top2 = logits.topk(2).values
    assert logits.argmax(-1).tolist() == answer, (tokenizer.decode(answer), (top2[:, 0] - top2[:, 1]).tolist())


def test_only_bitsandbytes_notice_about_the_missing_kernels_package_is_kept_out_of_the_output():
    """bitsandbytes logs, at import on AVX512-BF16 CPUs, that it could not load a kernel from the Hugging Face
    hub through `kernels`: not an error (it has its own kernel), and offline anyway. alpaca_cog.model hides it."""
    import inspect

    import bitsandbytes.backends.cpu.ops as cpu_ops

    notice = "Failed to load CPU gemm_4bit_forward from kernels-community: %s."
    assert notice in inspect.getsource(cpu_ops)  # the message alpaca_cog.model filters is still bitsandbytes'
    logger = logging.getLogger(cpu_ops.__name__)

    def shown(message: str, *args) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, args, None)))

    assert not shown(notice + " Please pip install kernels", ModuleNotFoundError("No module named 'kernels'", name="kernels"))
    assert shown(notice + " Please pip install kernels", OSError("hub unreachable"))  # kernels installed, and failing
    assert shown(notice + " Please pip install kernels", ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert shown("Any other warning: %s", ModuleNotFoundError("No module named 'kernels'", name="kernels"))


def _script(tiny_model_dir, tmp_path, *args):
    env = {**os.environ, "ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_CHECKPOINTS": str(tmp_path / "ckpt")}
    flags = [f"--{k}={v}" for k, v in TINY_RUN.items()]
    return subprocess.Popen(
        [sys.executable, "train.py", *flags, *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_sigkilled_run_resumes_to_the_same_loss(tiny_model_dir, tmp_path):
    whole = _script(tiny_model_dir, tmp_path / "whole", "--max_steps=8", "--checkpoint_steps=2", f"--output_path={tmp_path / 'whole.tar'}")
    killed = _script(tiny_model_dir, tmp_path / "killed", "--max_steps=8", "--checkpoint_steps=2", f"--output_path={tmp_path / 'killed.tar'}")
    checkpoint = tmp_path / "killed" / "ckpt" / "step-000004"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert killed.poll() is None, killed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.tar").exists()
    assert whole.wait(timeout=300) == 0, whole.communicate()
    resumed = _script(tiny_model_dir, tmp_path / "killed", "--max_steps=8", "--checkpoint_steps=2",
                      f"--resume_from={tmp_path / 'killed' / 'ckpt'}", f"--output_path={tmp_path / 'killed.tar'}")  # fmt: skip
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    a, b = metrics_of(tmp_path / "whole.tar"), metrics_of(tmp_path / "killed.tar")
    assert a["steps"] == b["steps"] == 8
    # Same data order, RNG and optimizer state: the same float ops in the same order on the CPU,
    # so the losses agree to float32 rounding, not just roughly.
    assert [h["step"] for h in b["history"]["train"]] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in b["history"]["train"]]),
                               torch.tensor([h["loss"] for h in a["history"]["train"]]), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits(tiny_model_dir, tmp_path):
    run = _script(tiny_model_dir, tmp_path, "--max_steps=1000", f"--output_path={tmp_path / 'out.tar'}")
    for line in run.stdout:
        if line.startswith("step 2/"):
            break
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM
    assert "checkpoint written" in err and "Traceback" not in err
    assert "kernels-community" not in err  # bitsandbytes' notice at import (AVX512-BF16 CPUs), filtered out
    (checkpoint,) = (tmp_path / "ckpt").glob("step-*")
    assert int(checkpoint.name.split("-")[1]) >= 2 and (checkpoint / "trainer_state.pt").exists()
    assert not (tmp_path / "out.tar").exists()


def test_corrupt_checkpoint_fails_clearly(tiny_model_dir, tmp_path):
    run_finetune(tiny_model_dir, tmp_path, max_steps=3, checkpoint_steps=2)
    state = tmp_path / "ckpt" / "step-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="resume_from: .*step-000002 is corrupt"):
        run_finetune(tiny_model_dir, tmp_path, max_steps=3, resume_from=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        run_finetune(tiny_model_dir, tmp_path, max_steps=3, resume_from=tmp_path)


def test_smollm2_finetune_changes_its_answers(weights_dir, tmp_path):
    archive = run_finetune(weights_dir, tmp_path, max_steps=3, batch_size=2, micro_batch_size=2, val_set_size=2,
                           lora_target_modules="q_proj,v_proj", learning_rate=2e-3, eval_steps=3)  # fmt: skip
    metrics = metrics_of(archive)
    assert metrics["final_val_loss"] is not None and metrics["steps"] == 3
    tokenizer = load_tokenizer(weights_dir)
    prompt = encode_prompt(tokenizer, "alpaca", "Tom has 3 apples and buys 5 more. How many apples does he have?")
    greedy = GenerationParams(temperature=0, max_tokens=24)
    base = load_model(weights_dir, device="cpu")
    before = complete(base, tokenizer, prompt, greedy)
    tuned = apply_adapter(base, adapter_dir(str(archive), tmp_path / "x"))
    assert complete(tuned, tokenizer, prompt, greedy) != before


def test_unwritable_output_fails_before_training(tiny_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ValueError, match="output_path: cannot write into .*a-file"):
        finetune(**train_defaults(**TINY_RUN, max_steps=1), base_weights=tiny_model_dir,
                 output_path=tmp_path / "a-file" / "out.tar", checkpoint_dir=tmp_path / "ckpt")  # fmt: skip


def test_disk_full_while_writing_leaves_no_partial_archive(tiny_model_dir, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "add", full)
    with pytest.raises(OSError, match="No space left on device"):
        run_finetune(tiny_model_dir, tmp_path, max_steps=1)
    assert not (tmp_path / "out.tar").exists() and not list(tmp_path.glob(".out.tar*"))
