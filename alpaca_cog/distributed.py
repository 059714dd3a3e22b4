"""Several training processes on torch.distributed: data parallel (DDP) or sharded (FSDP2).

One process per device, started by torchrun or `accelerate launch` (both set RANK, WORLD_SIZE and
LOCAL_RANK), or by `launch()` below when Cog runs train() on a machine with several GPUs.
"""

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor, distribute_tensor

from .env import env_int
from .model import default_device


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes (one all-reduce)."""
        if self.count == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()


def launched() -> bool:
    """True inside a process that torchrun or accelerate launch started."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@contextmanager
def processes():
    """This process's place in the run; joins the process group for the duration when there are several."""
    count = int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1
    if count == 1:
        yield Processes(device=default_device())
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:  # CPU processes (tests, or a cluster without GPUs)
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend)
    try:
        yield Processes(rank=dist.get_rank(), count=count, device=device)
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, procs: Processes, shard: bool) -> torch.nn.Module:
    """The module to train: model itself (one process), replicated (DDP) or sharded per decoder layer (FSDP2).

    Gradients are averaged over processes by DDP and FSDP alike; callers scale the loss by the
    process count so that the update equals one process's on the whole batch.
    """
    if procs.count == 1:
        return model
    if not shard:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[torch.device(procs.device).index] if procs.device != "cpu" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):  # a bf16 layer and its fp32 adapters share a group: FSDP2 gathers mixed dtypes
        fully_shard(layer)
    fully_shard(model)  # the rest: embeddings, final norm, output layer
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks transformers declares unsplittable (LlamaDecoderLayer): one FSDP group each."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    return [m for m in model.modules() if type(m).__name__ in names]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor gathered from its FSDP shards (a collective: every process calls it, in the same order), on the CPU."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole: the same for any process count, DDP or FSDP. A parameter shared by
    two modules (tied embeddings trained with modules_to_save) is listed under both names, as PEFT saves it."""
    return {name: whole(p) for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name and whole (its own state_dict numbers the
    parameters and, under FSDP, holds shards). The optimizer must have been given the model's
    trainable parameters in named_parameters() order."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    saved = optimizer.state_dict()
    return dict(state={names[i]: {k: whole(v) for k, v in s.items()} for i, s in saved["state"].items()},
                param_groups=saved["param_groups"])  # fmt: skip


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """optimizer_state()'s output back into an optimizer, sharded as the parameters now are."""

    def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if isinstance(param, DTensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    state = {i: {k: like(v, p) for k, v in saved["state"][name].items()} for i, (name, p) in enumerate(params) if name in saved["state"]}
    optimizer.load_state_dict(dict(state=state, param_groups=saved["param_groups"]))


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the all-reduce on all but the last micro-batch of a step: gradients accumulate locally first."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def process_count() -> int:
    """Training processes for this machine: ALPACA_COG_PROCESSES if set, else one per GPU."""
    return env_int("ALPACA_COG_PROCESSES", max(1, torch.cuda.device_count()))


def launch(script: str, inputs: dict, output_path: Path, count: int) -> Path:
    """Run `script` under torchrun with `count` processes on this machine; returns the archive rank 0 wrote.

    The inputs travel as a --config file; the processes' output is echoed line by line so that
    Cog's log capture sees it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "inputs.yaml"
        config.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in inputs.items() if v is not None}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
                   script, "--config", str(config), "--output_path", str(output_path)]  # fmt: skip
        print(f"starting {count} training processes: {' '.join(command[1:])}", flush=True)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last_error = ""
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("error: "):
                    last_error = line[len("error: ") :].strip()
            proc.wait()
        finally:
            if proc.poll() is None:  # we were cancelled: let the processes checkpoint and stop
                proc.terminate()
                proc.wait()
    if proc.returncode != 0:
        raise ValueError(last_error or f"training processes failed (exit status {proc.returncode}); see the log above")
    return Path(output_path)
