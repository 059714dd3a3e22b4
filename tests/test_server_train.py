"""train.py through Cog's real server in train mode (POST /trainings, what Replicate trainings call),
then predict.py served with the weights it returned."""

import base64
import json
import tarfile

import pytest

from alpaca_cog.archive import adapter_dir
from alpaca_cog.generate import GenerationParams, complete
from alpaca_cog.model import apply_adapter, load_model, load_tokenizer
from alpaca_cog.prompts import encode_prompt
from conftest import FIXTURES, cog_server, data_uri, submit

PROMPT = "What is 7 times 6?"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainings")
    env = {"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "ALPACA_COG_CHECKPOINTS": str(tmp / "ckpt")}
    records = json.loads((FIXTURES / "gsm8k_64.json").read_text())[:16]
    with cog_server(tmp, train=True, env=env) as url:
        good = submit(f"{url}/trainings", timeout=600, inputs={
            "train_data": data_uri(records), "max_steps": 3, "batch_size": 4, "val_set_size": 4,
            "learning_rate": 1e-2, "lora_target_modules": "q_proj,k_proj,v_proj,o_proj", "logging_steps": 1})  # fmt: skip
        bad = submit(f"{url}/trainings", {"train_data": data_uri([{"instruction": "x"}])}, timeout=600)
        missing = submit(f"{url}/trainings", {"max_steps": 2}, timeout=60)
    return tmp, good, bad, missing


def test_training_returns_the_weights_archive(trained):
    tmp, good, _, _ = trained
    assert good.status_code == 200
    body = good.json()
    assert body["status"] == "succeeded", body.get("error")
    assert "step 3/3" in body["logs"] and "validation loss" in body["logs"]
    header, payload = body["output"]["weights"].split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64")
    (tmp / "weights.tar").write_bytes(base64.b64decode(payload))
    with tarfile.open(tmp / "weights.tar") as tar:
        assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "loss.png"} <= set(tar.getnames())


def test_bad_training_data_fails_naming_the_problem(trained):
    _, _, bad, missing = trained
    assert bad.json()["status"] == "failed"
    assert "record 0: missing field 'output'" in bad.json()["error"]
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "input", "train_data"]


def test_predictions_use_the_trained_adapter(trained, tiny_model_dir):
    tmp, _, _, _ = trained
    weights = tmp / "weights.tar"
    tokenizer = load_tokenizer(tiny_model_dir)
    greedy = GenerationParams(temperature=0, max_tokens=8)
    prompt_ids = encode_prompt(tokenizer, "alpaca", PROMPT)
    base = complete(load_model(tiny_model_dir, device="cpu"), tokenizer, prompt_ids, greedy)
    adapted = apply_adapter(load_model(tiny_model_dir, device="cpu"), adapter_dir(str(weights), tmp / "unpacked"))
    expected = complete(adapted, tokenizer, prompt_ids, greedy)
    assert expected != base  # precondition: the adapter changes the greedy answer
    env = {"ALPACA_COG_BASE_WEIGHTS": str(tiny_model_dir), "COG_WEIGHTS": str(weights)}
    with cog_server(tmp, env=env) as url:
        body = submit(f"{url}/predictions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 8}, timeout=120).json()
    assert body["status"] == "succeeded", body
    assert "".join(body["output"]) == expected
    # Training and predicting with weights import peft, hence bitsandbytes: its notice about the `kernels`
    # package (AVX512-BF16 CPUs) is filtered out by alpaca_cog.model.
    assert not any("kernels-community" in log.read_text() for log in tmp.glob("cog-server-*.log"))
