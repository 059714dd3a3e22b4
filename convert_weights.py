"""Turn model weights into the Hugging Face folder in weights/, and export them to other formats.

Import (into --output_dir, default weights/):
  python convert_weights.py --input_dir unconverted-weights --model_size 7B --output_dir weights --force   # Meta's
  python convert_weights.py --gguf [FILE.gguf] --force   # a GGUF file; without FILE the embedded SmolLM2 default
  (weights/ already holds the default model after any `make` target: --force replaces it)

Export (from --model_dir, default weights/, with --adapter merged in when given; several: merged in their order):
  python convert_weights.py --to merged --adapter training_output.tar --output_dir merged   # base + LoRA, HF format
  python convert_weights.py --to merged --adapter pretrained.tar,instructed.tar --output_dir merged
  python convert_weights.py --to hf --output_dir copy [--dtype float16]
  python convert_weights.py --to meta --output_dir meta            # consolidated.00.pth + params.json
  python convert_weights.py --to gguf --output_dir model.gguf --outtype q8_0   # for llama.cpp

Vocabulary extension (the tokenizer of --model_dir with new tokens; train.py --tokenizer trains with it):
  python convert_weights.py --extend_vocab new_language.model --output_dir tokenizer-ext   # a SentencePiece model's pieces
  python convert_weights.py --extend_vocab tokens.txt --output_dir tokenizer-ext           # or a token a line
"""

import argparse
import sys

import torch

from alpaca_cog import convert, vocab
from alpaca_cog.outputs import check_replaceable

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", help="Meta checkpoint folder (tokenizer.model, <model_size>/consolidated.NN.pth)")
    parser.add_argument("--model_size", help="subfolder of --input_dir (7B, 13B, ...); omit if the shards are in --input_dir")
    parser.add_argument("--gguf", nargs="?", const="embedded", help="convert a GGUF file (default: embedded SmolLM2)")
    parser.add_argument("--to", choices=["hf", "merged", "meta", "gguf"], help="export --model_dir to this format")
    parser.add_argument("--extend_vocab", metavar="FILE", help="add a SentencePiece model's pieces (.model) or a file's tokens "
                        "(one a line) to --model_dir's tokenizer; writes the tokenizer to --output_dir")  # fmt: skip
    parser.add_argument("--model_dir", default="weights", help="Hugging Face model to export or extend")
    parser.add_argument("--adapter", help="trained weights (training_output.tar or adapter folder) to merge in; "
                        "several, comma-separated, are merged in their order (a later one's modules_to_save copies win)")  # fmt: skip
    parser.add_argument("--output_dir", help="output folder (a file for --to gguf); default weights for imports")
    parser.add_argument("--outtype", choices=["f16", "q8_0"], default="f16", help="GGUF matrix type")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of --to hf/merged")
    parser.add_argument("--pre_tokenizer", default="default", help="llama.cpp pre-tokenizer of a BPE vocabulary (SmolLM2: smollm)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.input_dir, args.gguf, args.to, args.extend_vocab)) != 1:
        parser.error("give exactly one of --input_dir (Meta), --gguf, --to (export) or --extend_vocab")
    if args.to == "merged" and not args.adapter:
        parser.error("--to merged needs --adapter")
    if (args.to or args.extend_vocab) and not args.output_dir:
        parser.error(f"--{'to ' + args.to if args.to else 'extend_vocab'} needs --output_dir")
    output = args.output_dir or "weights"
    try:
        check_replaceable(output, args.force)  # before reading a checkpoint for minutes
        if args.input_dir:
            out = convert.meta_to_hf(args.input_dir, args.model_size or "", output, force=args.force)
        elif args.gguf:
            source = convert.embedded_gguf() if args.gguf == "embedded" else args.gguf
            print(f"converting {source} -> {output}", flush=True)
            out = convert.gguf_to_hf(source, output, force=args.force)
        elif args.extend_vocab:
            out, added = vocab.extend_tokenizer(args.model_dir, args.extend_vocab, output, force=args.force)
            print(f"added {added} tokens to {args.model_dir}'s tokenizer", flush=True)
        elif args.to in ("hf", "merged"):
            out = convert.export_hf(args.model_dir, output, args.adapter, DTYPES[args.dtype], force=args.force)
        elif args.to == "meta":
            out = convert.export_meta(args.model_dir, output, args.adapter, force=args.force)
        else:
            out = convert.export_gguf(args.model_dir, output, args.adapter, args.outtype, args.pre_tokenizer, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
