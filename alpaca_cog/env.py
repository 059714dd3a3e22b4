"""The ALPACA_COG_* environment variables, read in one place with one meaning of yes and no.

| variable | read by | values | default |
| --- | --- | --- | --- |
| ALPACA_COG_BASE_WEIGHTS | predict.py, train.py, serve.py, evaluate.py | a Hugging Face model folder | weights |
| ALPACA_COG_CHECKPOINTS | train.py | a folder | checkpoints |
| ALPACA_COG_MERGE | predict.py | yes/no: merge setup(weights)'s adapter into the base | yes |
| ALPACA_COG_COMPILE | predict.py, serve.py | yes/no: compiled one-at-a-time decoding instead of batching | no |
| ALPACA_COG_BACKEND | predict.py, serve.py | auto, transformers, llama.cpp (engine.serving_engine) | auto |
| ALPACA_COG_GGUF_CACHE | predict.py, serve.py | where llama.cpp's GGUF exports are kept | ~/.cache/alpaca-cog/gguf |
| ALPACA_COG_ADAPTER_CACHE | predict.py, serve.py | per-request adapters kept loaded | 10 |
| ALPACA_COG_PROCESSES | train.py (Cog training) | training processes on this machine | one per GPU |
| ALPACA_COG_API_KEY | serve.py | the key clients must send (`Authorization: Bearer KEY`) | none: open |
| COG_MAX_CONCURRENCY | predict.py (Cog's own) | requests decoded together | 8 |
"""

import os

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of 1/0, true/false, yes/no, on/off")


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least {minimum}")
    return number


def env_choice(name: str, default: str, choices: list[str]) -> str:
    value = os.environ.get(name, "").strip() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_path(name: str, default: str) -> str:
    return os.environ.get(name) or default
