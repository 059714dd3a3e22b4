"""What a reader needs to compare benchmark figures across machines: the CPU and the flags that decide its fast paths."""

import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    flags = info.split("\nflags")[1].split("\n")[0].split()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    return dict(cpu=model, cores=len(os.sched_getaffinity(0)), **{f: f in flags for f in ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"]},
                platform=platform.platform(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)  # fmt: skip
