"""Turn model weights into the Hugging Face layout in weights/, and export them to other formats.

    python convert_weights.py --from gguf                 # the embedded SmolLM2 default -> weights/
"""

import argparse
import sys

from alpaca_cog import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=["gguf"], default="gguf", help="input format")
    parser.add_argument("--input", help="input file (gguf: default is the embedded SmolLM2 file)")
    parser.add_argument("--output_dir", default="weights", help="where the Hugging Face model goes")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        source = args.input or convert.embedded_gguf()
        print(f"converting {source} -> {args.output_dir}", flush=True)
        out = convert.gguf_to_hf(source, args.output_dir, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
