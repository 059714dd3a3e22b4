"""GPU memory per process for LoRA training of the LLaMA sizes, computed from parameter counts.

Prints docs/scaling.md's memory table (markdown) and the same numbers as JSON. An estimate, not a
measurement: weights and adapter state exactly, activations from the tensors a LLaMA layer
keeps for backward (counted on SmolLM2) (no activation checkpointing, bf16, our chunked loss that never holds full logits).

    python bench/memory.py [--micro_batch_size 4] [--cutoff_len 256] [--lora_r 8] [--gpus 8]
"""

import argparse
import json

# hidden size, layers, MLP size, vocabulary: Meta's LLaMA-1 shapes (LLaMA-2 7B/13B are the same)
SHAPES = {"7B": (4096, 32, 11008, 32000), "13B": (5120, 40, 13824, 32000), "33B": (6656, 60, 17920, 32000), "65B": (8192, 80, 22016, 32000)}
GB = 1e9


def estimate(hidden: int, layers: int, mlp: int, vocab: int, micro_batch_size: int, cutoff_len: int, lora_r: int, gpus: int) -> dict:
    layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden  # attention, MLP, two norms
    params = layers * layer + 2 * vocab * hidden + hidden  # plus embeddings, output layer, final norm
    lora = layers * 2 * lora_r * 2 * hidden  # q_proj and v_proj: A (r x h) and B (h x r) each
    adapter = lora * 16 / GB  # fp32 weights, gradients and two AdamW moments
    # Per token and layer, backward keeps about 8 hidden-sized and 4 MLP-sized bf16 vectors: counted with
    # saved_tensors_hooks on SmolLM2 (9,609 values = 6.0 h + 4 mlp; its k and v are narrow, LLaMA-1's are h wide).
    activations = micro_batch_size * cutoff_len * layers * (8 * hidden + 4 * mlp) * 2 / GB
    return {
        "params_b": params / 1e9,
        "one_gpu_bf16": 2 * params / GB + adapter + activations,
        "one_gpu_8bit": 1 * params / GB + adapter + activations,
        "one_gpu_4bit": 0.55 * params / GB + adapter + activations,  # NF4 plus double-quantised scales
        f"fsdp_{gpus}_gpus_bf16": (2 * params / gpus + 2 * 2 * layer) / GB + adapter / gpus + activations,  # shard + 2 gathered layers
        "activations": activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    table = {name: estimate(*shape, **vars(args)) for name, shape in SHAPES.items()}
    columns = list(next(iter(table.values())))
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    print(json.dumps({"bench": "memory", "settings": vars(args), "gb_per_gpu": table}))


if __name__ == "__main__":
    main()
