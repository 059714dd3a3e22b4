"""The package's shape: cog.yaml is valid for Cog, every dependency is pinned, weights/ is the GGUF model."""

import ast
import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from alpaca_cog.convert import embedded_gguf, load_gguf
from alpaca_cog.model import load_model
from conftest import ROOT

COG_SCHEMA = ROOT.parent / "shared" / "cog" / "config_schema_v1.0.json"


def requirements(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            package, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned with =="
            pins[package.lower()] = version
    return pins


def test_cog_yaml_is_valid_for_cogs_schema_and_targets_current_cog():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads(COG_SCHEMA.read_text()))
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert build["cuda"] and build["sdk_version"] == requirements("requirements-dev.txt")["cog"]
    assert build["python_requirements"] == "requirements.txt"
    assert config["run"] == "predict.py:Predictor" and "predict" not in config
    assert config["train"] == "train.py:train"
    assert requirements("requirements.txt")["torch"] == "2.13.0"


def _imports(file: Path) -> tuple[set[str], set[Path]]:
    """(third-party top-level modules, this project's files) that `file` imports, at any depth of its code."""
    third_party, local = set(), set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "alpaca_cog." if node.level else ""
            modules = [base + (node.module or "")] + [f"{base}{node.module or ''}.{a.name}".replace("..", ".") for a in node.names]
        else:
            continue
        for module in modules:
            path = ROOT / (module.replace(".", "/") + ".py")
            if path.is_file():
                local.add(path)
            elif module.split(".")[0] not in {"alpaca_cog", *sys.stdlib_module_names} and not (ROOT / f"{module.split('.')[0]}.py").exists():
                third_party.add(module.split(".")[0])
    return third_party, local


def _third_party_imports(entry_points: list[str]) -> set[str]:
    """Everything the entry points import, following this project's modules (lazy imports included)."""
    todo, seen, names = [ROOT / e for e in entry_points], set(), set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        third_party, local = _imports(file)
        names |= third_party
        todo += local
    return names


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("entry_points, files", [
    (["predict.py", "train.py", "convert_weights.py"], ["requirements.txt"]),  # the image (cog.yaml)
    (["serve.py", "generate_data.py", "evaluate.py"], ["requirements.txt", "requirements-dev.txt"]),  # local tools
])  # fmt: skip
def test_every_third_party_import_is_a_pinned_requirement(entry_points, files):
    # Cog's own SDK is pinned in cog.yaml (sdk_version) and installed by Cog in the image.
    pins = {_normalized(k): v for f in files for k, v in requirements(f).items()}
    pinned = set(pins) | {"cog", "coglet"}
    distributions = importlib.metadata.packages_distributions()
    for module in _third_party_imports(entry_points):
        dists = {_normalized(d) for d in distributions.get(module, [module])}
        assert dists & pinned, f"import {module} ({dists}) is not pinned in {' or '.join(files)}"
        for dist in dists & pinned - {"cog", "coglet"}:
            assert importlib.metadata.version(dist).split("+")[0] == pins[dist]


def test_weights_are_the_embedded_gguf_model_with_equal_logits(weights_dir):
    gguf_model, gguf_tokenizer = load_gguf(embedded_gguf())
    converted = load_model(weights_dir, device="cpu")
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008  # tied embeddings counted once
    ids = gguf_tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, actual = gguf_model(ids).logits, converted(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    for name in ["model.safetensors", "tokenizer.json", "generation_config.json", "config.json"]:
        assert (weights_dir / name).is_file()
    assert json.loads((weights_dir / "config.json").read_text()).get("quantization_config") is None


def test_command_line_checks_the_bounds_cog_checks(capsys):
    from alpaca_cog.cli import parse_inputs, parser_for
    from predict import Predictor

    parser = parser_for(Predictor.run)
    assert parse_inputs(Predictor.run, parser, ["--prompt", "hi"])["max_tokens"] == 128
    for argv, message in [(["--prompt", "  "], "--prompt: '  ' does not match"), (["--prompt", "hi", "--top_p", "2"], "--top_p: 2.0 is greater"),
                          (["--prompt", "hi", "--prompt_template", "x"], "invalid choice: 'x'")]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_inputs(Predictor.run, parser, argv)
        assert message in capsys.readouterr().err


def test_config_file_supplies_inputs_and_flags_override_it(tmp_path, capsys):
    from alpaca_cog.cli import parse_inputs, parser_for
    from train import train

    config = tmp_path / "inputs.yaml"
    config.write_text("train_data: data.json\nfsdp: true\nlearning_rate: 1\nbatch_size: 64\n")
    inputs = parse_inputs(train, parser_for(train), ["--config", str(config), "--batch_size", "32"])
    assert inputs["train_data"] == Path("data.json") and inputs["fsdp"] is True
    assert inputs["learning_rate"] == 1.0 and inputs["batch_size"] == 32 and inputs["micro_batch_size"] == 4
    for text, message in [("train_data: d.json\nlr: 0.1\n", "unknown input 'lr'"),
                          ("train_data: d.json\nbatch_size: many\n", "batch_size: expected int, got 'many'"),
                          ("train_data: d.json\nquantization: 2bit\n", "--quantization: '2bit' is not one of"),
                          ("train_data: d.json\nlearning_rate: 5\n", "--learning_rate: 5.0 is greater than the maximum of 1.0"),
                          ("- a\n", "must hold a mapping"), ("lora_r: 8\n", "--train_data is required")]:  # fmt: skip
        config.write_text(text)
        with pytest.raises(SystemExit):
            parse_inputs(train, parser_for(train), ["--config", str(config)])
        assert message in capsys.readouterr().err, text


def test_alpaca_cog_environment_variables_share_one_meaning_of_yes_and_no(monkeypatch):
    from alpaca_cog.env import env_flag, env_int

    for value, expected in [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("false", False), ("NO", False), ("", True)]:
        monkeypatch.setenv("ALPACA_COG_COMPILE", value)
        assert env_flag("ALPACA_COG_COMPILE", True) is expected, value
    monkeypatch.setenv("ALPACA_COG_COMPILE", "maybe")
    with pytest.raises(ValueError, match="ALPACA_COG_COMPILE='maybe': expected one of 1/0, true/false"):
        env_flag("ALPACA_COG_COMPILE", False)
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="COG_MAX_CONCURRENCY='0'"):
        env_int("COG_MAX_CONCURRENCY", 8)


def test_an_import_into_a_full_weights_folder_is_refused_before_reading_the_checkpoint(tmp_path, capsys):
    import convert_weights

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    # The input does not exist: a refusal that names the output proves the output was checked first.
    assert convert_weights.main(["--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]) == 1
    assert "out is not empty (config.json, ...); pass --force to replace it" in capsys.readouterr().err


def test_make_predict_falls_back_to_alpaca_for_a_base_without_a_chat_template(tiny_model_dir, tmp_path):
    import shutil
    import subprocess

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))

    def planned(base) -> str:
        return subprocess.run(["make", "-n", "predict", f"ALPACA_COG_BASE_WEIGHTS={base}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert "--prompt_template chat" in planned(tiny_model_dir)
    assert "--prompt_template alpaca" in planned(plain)
    # and predict.py itself answers a bad request with the message, not a traceback
    env = {**os.environ, "ALPACA_COG_BASE_WEIGHTS": str(plain)}
    run = subprocess.run([sys.executable, "predict.py", "--prompt", "Hi", "--prompt_template", "chat", "--max_tokens", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1 and run.stderr.strip().endswith("error: prompt_template 'chat': this tokenizer has no chat template; use 'alpaca' or 'none'")
    assert "Traceback" not in run.stderr
