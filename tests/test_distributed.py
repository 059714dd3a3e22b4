"""train.py in several processes (torchrun, accelerate launch, and Cog on a multi-GPU machine),
on the CPU with the gloo backend: it must train exactly as one process does on the same batches."""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch

from conftest import FIXTURES, ROOT, TINY_RUN, cog_server, data_uri, free_port, metrics_of, run_finetune, submit

# No dropout: with it each process draws its own masks, and the runs may only agree on average.
RUN = TINY_RUN | dict(lora_dropout=0.0, max_steps=4, checkpoint_steps=2, eval_steps=2)


def losses(metrics: dict) -> dict[str, list[float]]:
    """Training and validation losses, and gradient norms (which tell a half-scaled gradient that Adam would hide)."""
    history = metrics["history"]
    return dict(train=[h["loss"] for h in history["train"]], grad_norm=[h["grad_norm"] for h in history["train"]],
                val=[h["loss"] for h in history["val"]])  # fmt: skip


def assert_same_losses(got: dict, expected: dict) -> None:
    # Same batches, weights and float ops; only the order in which the two processes' gradients
    # are summed differs (an all-reduce instead of local accumulation): fp32 rounding, about 1e-7
    # relative per step, which Adam's normalised updates do not amplify over four steps.
    for kind in got:
        torch.testing.assert_close(torch.tensor(got[kind]), torch.tensor(expected[kind]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> dict:
    return losses(metrics_of(run_finetune(tiny_model_dir, tmp_path_factory.mktemp("one-process"), **RUN)))


def launch(launcher: list[str], tiny_model_dir, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_CHECKPOINTS": str(tmp_path / "ckpt")}
    args = [f"--{k}={v}" for k, v in RUN.items()] + [f"--output_path={tmp_path / 'out.tar'}", *flags]
    proc = subprocess.Popen([*launcher, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        for process in [*psutil.Process(proc.pid).children(recursive=True), proc]:  # a hung run leaves no worker behind
            process.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"training did not finish in 300 s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def accelerate_launch() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"]  # fmt: skip


@pytest.mark.parametrize("mode", ["ddp (accelerate launch)", "fsdp (torchrun)"])
def test_two_processes_train_as_one_and_resume_in_one(mode, one_process, tiny_model_dir, tmp_path):
    fsdp = mode.startswith("fsdp")
    run = launch(TORCHRUN if fsdp else accelerate_launch(), tiny_model_dir, tmp_path, *(["--fsdp"] if fsdp else []))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("step 1/4 ") == 1 and f"in 2 processes ({'FSDP' if fsdp else 'DDP'})" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == str(tmp_path / "out.tar")  # printed once, by the first process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out.tar"]  # one archive, no partial files
    metrics = metrics_of(tmp_path / "out.tar")
    assert metrics["processes"] == 2
    assert_same_losses(losses(metrics), one_process)

    # The step-2 checkpoint two processes wrote, resumed by one: steps 3 and 4 as if never stopped.
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    assert checkpoint.name == "step-000002"
    resumed = run_finetune(tiny_model_dir, tmp_path / "resumed", **RUN, resume_from=tmp_path / "ckpt")
    assert_same_losses(losses(metrics_of(resumed)), one_process)


def test_batch_that_does_not_split_over_processes_fails_once_and_clearly(tiny_model_dir, tmp_path):
    run = launch(TORCHRUN, tiny_model_dir, tmp_path, "--batch_size=4")
    assert run.returncode != 0
    message = "error: batch_size (4) must be a multiple of micro_batch_size (4) times the 2 processes"
    assert (run.stdout + run.stderr).count(message) == 1, run.stderr[-3000:]
    assert not (tmp_path / "out.tar").exists()


def training_processes(checkpoints: Path) -> list[psutil.Process]:
    """The processes started for the trainings of this test (told apart by their checkpoint folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            ours = proc.environ().get("ALPACA_COG_CHECKPOINTS") == str(checkpoints)
            if ours and any(arg.endswith("train.py") for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_cog_training_on_a_multi_device_machine_uses_every_process(tiny_model_dir, tmp_path):
    # ALPACA_COG_PROCESSES stands in for the GPU count, so this runs without GPUs.
    env = {"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_CHECKPOINTS": str(tmp_path / "ckpt"), "ALPACA_COG_PROCESSES": "2"}
    records = json.loads((FIXTURES / "gsm8k_64.json").read_text())[:16]
    data = data_uri(records)
    with cog_server(tmp_path, train=True, env=env) as url:
        good = submit(f"{url}/trainings", {"train_data": data, "max_steps": 2, "batch_size": 8, "val_set_size": 4, "logging_steps": 1},
                      timeout=600).json()  # fmt: skip
        bad = submit(f"{url}/trainings", {"train_data": data, "batch_size": 6}, timeout=600).json()
        # A cancelled training stops its processes (they checkpoint first): none is left holding the GPUs.
        long = {"train_data": data, "max_steps": 10000, "batch_size": 8, "val_set_size": 0}
        assert submit(f"{url}/trainings/long", long, "PUT", headers={"Prefer": "respond-async"}, timeout=30).status_code == 202
        deadline = time.monotonic() + 120
        while len(training_processes(tmp_path / "ckpt")) < 3:  # torchrun and its 2 workers
            assert time.monotonic() < deadline, "training processes did not start"
            time.sleep(0.5)
        assert requests.post(f"{url}/trainings/long/cancel", timeout=30).status_code == 200
        _, alive = psutil.wait_procs(training_processes(tmp_path / "ckpt"), timeout=60)
        assert not alive, alive
    assert good["status"] == "succeeded", good.get("error") or good.get("logs", "")[-3000:]
    assert "starting 2 training processes" in good["logs"] and good["logs"].count("step 2/2 ") == 1
    (tmp_path / "weights.tar").write_bytes(base64.b64decode(good["output"]["weights"].split(",", 1)[1]))
    assert metrics_of(tmp_path / "weights.tar")["processes"] == 2
    assert bad["status"] == "failed"
    assert bad["error"].endswith("ValueError: batch_size (6) must be a multiple of micro_batch_size (4) times the 2 processes")
