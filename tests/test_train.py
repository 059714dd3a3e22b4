"""The LoRA finetune: it learns, its archive loads in plain PEFT, and it survives being killed."""

import json
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
from alpaca_cog.finetune import finetune, loss_sum
from alpaca_cog.generate import GenerationParams, complete
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
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


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_trains_on_cpu(tiny_model_dir, tmp_path, quantization):
    layers = {type(m).__name__ for m in load_model(tiny_model_dir, device="cpu", quantization=quantization).modules()}
    assert {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization] in layers
    archive = run_finetune(tiny_model_dir, tmp_path, max_steps=2, quantization=quantization)
    metrics = metrics_of(archive)
    assert metrics["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"]["train"])


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
