"""Meta-to-HF conversion memory and speed: transformers 4.40.2's convert_llama_weights_to_hf.py
(baseline; transformers 5 no longer ships it) against convert_weights.py (ours), on the same
synthetic 2+ GB fp16 checkpoint, each in its own process. Prints one JSON object and keeps it in
bench/results/convert-<date>.json.

    pip install --target /tmp/tf440 transformers==4.40.2      # the baseline's transformers, kept apart
    python bench/convert.py [--baseline_site /tmp/tf440]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# 20 layers of dim 2048 (MLP 5632), a 4096-token vocabulary: 1.04B parameters, 2.1 GB in fp16.
SHAPE = dict(dim=2048, n_layers=20, n_heads=16, vocab_size=4096, multiple_of=256, dtype=torch.float16)


def timed_peak(cmd: list[str], env: dict) -> dict:
    """Wall time and the child's peak RSS (GNU time's maximum resident set size)."""
    start = time.monotonic()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    rss_kb = int(next(l for l in out.stderr.splitlines() if l.startswith("MAXRSS")).split()[1])
    return dict(seconds=seconds, peak_rss_mb=rss_kb / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline_site", default="/tmp/tf440", help="site-packages folder holding transformers 4.40.2")
    args = parser.parse_args()
    from meta_llama import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    make_checkpoint(tmp / "meta", **SHAPE)
    size_mb = sum(f.stat().st_size for f in (tmp / "meta" / "7B").glob("*.pth")) / 2**20
    script = Path(args.baseline_site) / "transformers/models/llama/convert_llama_weights_to_hf.py"
    base_env = {**os.environ, "PYTHONPATH": args.baseline_site}
    baseline = timed_peak([sys.executable, str(script), "--input_dir", str(tmp / "meta"), "--model_size", "7B",
                           "--output_dir", str(tmp / "baseline"), "--safe_serialization", "true"], base_env)  # fmt: skip
    ours = timed_peak([sys.executable, str(ROOT / "convert_weights.py"), "--input_dir", str(tmp / "meta"), "--model_size", "7B",
                       "--output_dir", str(tmp / "ours")], dict(os.environ))  # fmt: skip
    for side in (baseline, ours):
        side["mb_per_s"] = size_mb / side["seconds"]
    report = {
        "bench": "convert",
        "date": date.today().isoformat(),
        "machine": dict(cores=os.cpu_count(), torch=torch.__version__),
        "checkpoint": dict(size_mb=round(size_mb), **{k: str(v) for k, v in SHAPE.items()}),
        "baseline": baseline,
        "ours": ours,
        "speedup": baseline["seconds"] / ours["seconds"],
        "peak_rss_ratio": ours["peak_rss_mb"] / baseline["peak_rss_mb"],
    }
    out = ROOT / "bench" / "results" / f"convert-{report['date']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
