"""LoRA finetuning of the model in weights/ on Alpaca-format data.

As a Cog training job (POST /trainings, what Replicate trainings call) and as a script:

    python train.py --train_data data.json [--output_path training_output.tar]   # cog exec python train.py ...
    torchrun --nproc_per_node 8 train.py --config configs/fsdp.yaml --train_data data.json   # several GPUs
"""

import os
import sys
import tempfile

from cog import BaseModel, Input, Path

from alpaca_cog import distributed
from alpaca_cog.env import env_path
from alpaca_cog.finetune import Interrupted, finetune
from alpaca_cog.prompts import TEMPLATE_NAMES

BASE_WEIGHTS = env_path("ALPACA_COG_BASE_WEIGHTS", "weights")
CHECKPOINT_DIR = env_path("ALPACA_COG_CHECKPOINTS", "checkpoints")


class TrainingOutput(BaseModel):
    weights: Path


def train(
    train_data: Path = Input(description="Alpaca-format data: a JSON list or JSONL of {instruction, input, output} records; or plain "
                             "text for continued pre-training: a .txt file (one text a line) or a folder of them, cut into "
                             "cutoff_len-token blocks, every token learned."),
    num_train_epochs: int = Input(description="Passes over the training data.", default=3, ge=1, le=100),
    max_steps: int = Input(description="Stop after this many optimizer steps; -1 trains num_train_epochs.", default=-1, ge=-1),
    learning_rate: float = Input(description="Peak AdamW learning rate.", default=3e-4, ge=1e-7, le=1.0),
    batch_size: int = Input(description="Examples per optimizer step (gradient accumulation over micro-batches).", default=128, ge=1, le=4096),
    micro_batch_size: int = Input(description="Examples per forward pass, packed without padding; memory grows with their tokens: lower it to save memory.", default=4, ge=1, le=512),
    cutoff_len: int = Input(description="Tokens per example; longer ones are truncated.", default=256, ge=8, le=32768),
    val_set_size: int = Input(description="Examples (of plain text: blocks) held out for validation loss.", default=2000, ge=0),
    lora_r: int = Input(description="LoRA rank.", default=8, ge=1, le=1024),
    lora_alpha: int = Input(description="LoRA scaling numerator (scale = alpha / r).", default=16, ge=1, le=4096),
    lora_dropout: float = Input(description="Dropout on the LoRA path.", default=0.05, ge=0.0, le=0.9),
    lora_target_modules: str = Input(description="Comma-separated module names that get LoRA adapters.", default="q_proj,v_proj"),
    modules_to_save: str = Input(description="Comma-separated modules trained whole beside the LoRA and saved in the archive "
                                 "(PEFT's modules_to_save), e.g. embed_tokens,lm_head for a new language; with tied embeddings "
                                 "(SmolLM2) either name trains the one shared matrix.", default=""),
    tokenizer: Path | None = Input(description="A tokenizer extending the base's vocabulary (convert_weights.py --extend_vocab; a folder "
                                   "or a tar of one): the embeddings grow to it, every old id kept, and the archive carries it. "
                                   "Needs modules_to_save=embed_tokens,lm_head.", default=None),
    train_on_inputs: bool = Input(description="Also learn the prompt tokens (false: only the response).", default=True),
    prompt_template: str = Input(description="Prompt template, as in predict.py.", default="alpaca", choices=TEMPLATE_NAMES),
    quantization: str = Input(description="Load the base model in 8-bit or 4-bit (QLoRA) via bitsandbytes.", default="none", choices=["none", "8bit", "4bit"]),
    precision: str = Input(description="Base weights in training: bf16 halves their memory and runs about 1.5x faster where the "
                           "hardware multiplies bf16 natively (GPUs; CPUs with AVX512-BF16 or AMX); auto picks it there (on a CPU "
                           "not with modules_to_save), fp32 elsewhere. LoRA weights and optimizer state stay fp32.", default="auto", choices=["auto", "fp32", "bf16"]),
    fsdp: bool = Input(description="With several GPUs, shard the model across them (FSDP) instead of copying it to each: for models one GPU cannot hold.", default=False),
    seed: int = Input(description="Random seed for data order, split and initialisation.", default=42, ge=0),
    resume_from: Path | None = Input(description="A checkpoint folder, or an earlier training output to continue from.", default=None),
    checkpoint_steps: int = Input(description="Write a resumable checkpoint every this many steps; 0 never.", default=200, ge=0),
    logging_steps: int = Input(description="Report training loss every this many steps.", default=10, ge=1),
    eval_steps: int = Input(description="Report validation loss every this many steps.", default=200, ge=1),
    eval_at_end: bool = Input(description="After training, score the model on up to 64 validation examples (response perplexity, "
                              "ROUGE-L and exact match of greedy answers) into metrics.json and eval.png; adds minutes.", default=False),
) -> TrainingOutput:
    inputs = dict(locals())
    output_path = Path(tempfile.mkdtemp(prefix="alpaca-cog-training-")) / "training_output.tar"
    count = distributed.process_count()
    if count > 1 and not distributed.launched():  # `cog train` on a machine with several GPUs: use them all
        return TrainingOutput(weights=Path(distributed.launch(__file__, inputs, output_path, count)))
    output = finetune(**inputs, base_weights=BASE_WEIGHTS, output_path=output_path, checkpoint_dir=CHECKPOINT_DIR)
    return TrainingOutput(weights=Path(output))


if __name__ == "__main__":
    from alpaca_cog.cli import parse_inputs, parser_for

    parser = parser_for(train, __doc__.splitlines()[0])
    parser.add_argument("--output_path", default="training_output.tar", help="where the weights archive goes")
    inputs = parse_inputs(train, parser)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun: say things once, not once per process
    try:
        output = finetune(**inputs, base_weights=BASE_WEIGHTS, output_path=parser.parse_args().output_path, checkpoint_dir=CHECKPOINT_DIR)
        status = 0
        if main_process:
            print(output)
    except (ValueError, OSError) as e:  # bad input, or a disk that filled up while writing
        status = 1
        if main_process:
            print(f"error: {e}", file=sys.stderr)
    except Interrupted as e:
        status = 128 + e.signal  # the shell's convention for "ended by signal N"
        if main_process:
            print(f"interrupted: {e}", file=sys.stderr)
    if distributed.launched():
        # Everything is written and the process group destroyed; torch's own teardown of gloo's threads
        # at interpreter exit sometimes aborts (SIGABRT, about 1 run in 70 here), so skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
