"""Chinese-LLaMA-Alpaca's adapter flow on tiny models: a vocabulary extended with a new language's pieces, continued
pre-training on its plain text (LoRA plus whole embeddings, modules_to_save), instruction tuning of a second LoRA on
top, and the two merged in order: for transformers, for the predictor and for llama.cpp."""

import asyncio
import itertools
import json
import random
import shutil
import tarfile

import pytest
import sentencepiece as spm
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer

import convert_weights
from alpaca_cog import convert
from alpaca_cog.archive import adapter_dir
from alpaca_cog.data import load_texts, pack, text_blocks
from alpaca_cog.finetune import loss_sum
from alpaca_cog.model import load_model, load_tokenizer
from conftest import _save_tiny_llama, metrics_of, run_finetune, tiny_llama
from meta_llama import train_tokenizer

ENGLISH = "Give three tips for staying healthy. Ünïcode 123"


def new_language(lines: int, seed: int = 0) -> list[str]:
    """Sentences (drawn with `seed`) of a made-up language: 60 words of one to three CJK characters, on each of which
    SmolLM2's byte-level BPE spends one to three tokens."""
    lexicon = random.Random(0)
    words = ["".join(chr(0x4E00 + lexicon.randrange(300)) for _ in range(lexicon.randint(1, 3))) for _ in range(60)]
    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + "。" for _ in range(lines)]


@pytest.fixture(scope="module")
def language(tmp_path_factory):
    """The new language's text (two .txt files in a folder) and a SentencePiece model trained on it."""
    root = tmp_path_factory.mktemp("language")
    lines = new_language(400)
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text("\n".join(lines[:200]) + "\n\n")  # an empty line is no text
    (root / "text" / "b.txt").write_text("\n".join(lines[200:]))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "new"), vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)  # fmt: skip
    return dict(lines=lines, text=root / "text", pieces=root / "new.model", held_out=new_language(20, seed=1))


@pytest.fixture(scope="module")
def extended(tiny_model_dir, language, tmp_path_factory):
    """SmolLM2's tokenizer (tiny_model_dir's) with the new language's pieces, as convert_weights.py writes it."""
    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    assert convert_weights.main(["--extend_vocab", str(language["pieces"]), "--model_dir", str(tiny_model_dir), "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tied_model_dir(weights_dir, tmp_path_factory):
    """tiny_model_dir with tied embeddings, as SmolLM2 has them."""
    return _save_tiny_llama(weights_dir, tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True)


def _same_ids_for_old_tokens(base, extended) -> None:
    old, new = base.get_vocab(), extended.get_vocab()
    assert all(new[piece] == i for piece, i in old.items())
    assert sorted(set(new.values()) - set(old.values())) == list(range(len(base), len(extended)))  # appended after them
    assert extended(ENGLISH)["input_ids"] == base(ENGLISH)["input_ids"]


def test_extended_bpe_vocabulary_keeps_every_id_and_takes_fewer_tokens_for_the_new_language(tiny_model_dir, extended, language, tmp_path):
    base, ext = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(extended)
    assert 250 < len(ext) - len(base) <= 300  # the model's pieces, less its control pieces and what SmolLM2 has already
    _same_ids_for_old_tokens(base, ext)
    text = "".join(language["held_out"])
    before, after = base(text)["input_ids"], ext(text)["input_ids"]
    assert len(after) < len(before) / 2, (len(before), len(after))
    assert ext.decode(after) == text and max(after) >= len(base)
    # a list of tokens, one a line, works the same way; those SmolLM2 has as one token already are not added again
    (tmp_path / "tokens.txt").write_text("小大中\n hello\n世界和平\n")
    assert convert_weights.main(["--extend_vocab", str(tmp_path / "tokens.txt"), "--model_dir", str(tiny_model_dir),
                                 "--output_dir", str(tmp_path / "listed")]) == 0  # fmt: skip
    listed = AutoTokenizer.from_pretrained(tmp_path / "listed")
    assert len(listed) == len(base) + 2 and listed("世界和平小大中", add_special_tokens=False)["input_ids"] == [len(base) + 1, len(base)]


def test_extended_sentencepiece_vocabulary_appends_its_pieces_to_the_model(language, tmp_path):
    """A LLaMA base with Meta's tokenizer.model: the new pieces become pieces of it (merge_tokenizers.py's way), so
    transformers' tokenizer and sentencepiece itself segment text alike."""
    train_tokenizer(tmp_path / "spm" / "tokenizer.model")
    base_dir = tmp_path / "llama"
    LlamaTokenizer.from_pretrained(tmp_path / "spm", add_bos_token=True, legacy=False).save_pretrained(base_dir)
    shutil.copy2(tmp_path / "spm" / "tokenizer.model", base_dir / "tokenizer.model")
    assert convert_weights.main(["--extend_vocab", str(language["pieces"]), "--model_dir", str(base_dir), "--output_dir", str(tmp_path / "out")]) == 0
    base, ext = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(tmp_path / "out")
    _same_ids_for_old_tokens(base, ext)
    text = language["held_out"][0]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert sp.get_piece_size() == len(ext) > len(base)
    assert ext(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert len(ext(text)["input_ids"]) < len(base(text)["input_ids"]) / 2


def test_vocabulary_extension_errors_name_the_file_and_leave_nothing(tiny_model_dir, extended, tmp_path, capsys):
    (tmp_path / "bad.model").write_bytes(b"\xff not a protobuf")
    (tmp_path / "known.txt").write_text("hello\n the\n")
    for source, message in [(tmp_path / "missing.model", "missing.model: no such file"),
                            (tmp_path / "bad.model", "bad.model: not a SentencePiece model"),
                            (tmp_path / "known.txt", "known.txt: the base's vocabulary has every one of its 2 tokens already")]:  # fmt: skip
        assert convert_weights.main(["--extend_vocab", str(source), "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_tokenizer_input_may_be_a_tar_of_the_folder_and_is_checked_as_weights_are(extended, tmp_path):
    """Cog's inputs are files: train.py's tokenizer may come as a tar, unpacked with the weights archives' checks."""
    from alpaca_cog.archive import tokenizer_dir

    with tarfile.open(tmp_path / "tokenizer.tar", "w") as tar:
        for f in extended.iterdir():
            tar.add(f, arcname=f.name)
    folder = tokenizer_dir(str(tmp_path / "tokenizer.tar"), tmp_path / "work")
    assert load_tokenizer(folder).get_vocab() == load_tokenizer(extended).get_vocab()
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.add(extended / "tokenizer.json", arcname="../tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer: evil.tar: member '../tokenizer.json' points outside the archive"):
        tokenizer_dir(str(tmp_path / "evil.tar"), tmp_path / "work2")


def test_plain_text_is_cut_into_blocks_with_every_token_labelled(tiny_model_dir, language, tmp_path):
    texts = load_texts(language["text"])
    assert texts == language["lines"]  # a.txt then b.txt, the empty line skipped
    tokenizer = load_tokenizer(tiny_model_dir)
    blocks = text_blocks(["one two three", "four"], tokenizer, 3)
    ids = tokenizer("one two three", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids += tokenizer("four", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [b["input_ids"] for b in blocks] == [ids[i : i + 3] for i in range(0, len(ids), 3) if len(ids) - i > 1]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in [(tmp_path / "empty", "empty: a folder without .txt files"), (tmp_path / "latin1.txt", "latin1.txt: not UTF-8")]:
        with pytest.raises(ValueError, match=message):
            load_texts(path)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_modules_to_save_train_through_the_chunked_cross_entropy(tied):
    """Trainable copies of embed_tokens and lm_head (one matrix when tied) get the gradients transformers' own loss
    gives them: the output layer's weight loss_sum uses is the trainable copy, not the frozen original."""
    lora = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=tied)
    model = get_peft_model(tiny_llama(tie_word_embeddings=tied), lora).train()
    copies = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    assert len(copies) == 2 - tied
    ids = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 13)]
    examples = [dict(input_ids=i, labels=i) for i in ids]

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in copies]

    reference = sum(model(input_ids=torch.tensor([i]), labels=torch.tensor([i])).loss * (len(i) - 1) for i in ids)
    for got, want in zip(gradients(loss_sum(model, pack(examples))), gradients(reference), strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inputs, message", [
    (dict(lora_target_modules="q_proj,lm_head"), r"lora_target_modules: a LoRA on the output layer \(lm_head\)"),
    (dict(lora_target_modules="q_proj,embed_tokens", base="tied"), r"lora_target_modules: a LoRA on the output layer \(lm_head, tied to embed_tokens\)"),
    (dict(modules_to_save="embed_tokens,lm_heads"), "modules_to_save: 'lm_heads' is no module of this model"),
    (dict(tokenizer="extended"), "modules_to_save: the tokenizer adds 2[0-9]{2} tokens, whose embedding and output rows must be trained"),
    (dict(tokenizer="extended", modules_to_save="embed_tokens"), "modules_to_save: the tokenizer adds"),
    (dict(tokenizer="llama", modules_to_save="embed_tokens,lm_head"), "tokenizer: .* does not extend the base's vocabulary: .* is id"),
    (dict(tokenizer="nothing"), "tokenizer: .* holds no tokenizer"),
    (dict(train_data="empty"), "empty: a folder without .txt files"),
])  # fmt: skip
def test_bad_adapter_flow_inputs_are_named_and_write_nothing(tiny_model_dir, tied_model_dir, extended, tmp_path, inputs, message):
    if inputs.get("tokenizer") == "llama":  # another vocabulary altogether
        train_tokenizer(tmp_path / "llama" / "tokenizer.model")
        LlamaTokenizer.from_pretrained(tmp_path / "llama").save_pretrained(tmp_path / "llama")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "empty").mkdir()
    paths = dict(extended=extended, llama=tmp_path / "llama", nothing=tmp_path / "nothing", empty=tmp_path / "empty")
    inputs = {k: paths.get(v, v) for k, v in inputs.items()}
    base = tied_model_dir if inputs.pop("base", None) == "tied" else tiny_model_dir
    with pytest.raises(ValueError, match=message):
        run_finetune(base, tmp_path, max_steps=1, **inputs)
    assert not (tmp_path / "out.tar").exists()


def test_tied_embeddings_train_as_one_matrix_resume_and_merge_tied(tied_model_dir, extended, language, tmp_path, capsys):
    """SmolLM2 ties its embeddings: modules_to_save trains the one matrix for both ends, the archive holds it under
    both names as PEFT saves it, a resumed run continues exactly, and the merged model is still tied."""
    run = dict(train_data=language["text"], tokenizer=extended, modules_to_save="lm_head", lora_target_modules="q_proj,v_proj",
               max_steps=4, checkpoint_steps=2, val_set_size=4, eval_steps=2, cutoff_len=64)  # fmt: skip
    whole = run_finetune(tied_model_dir, tmp_path / "whole", **run)
    out = capsys.readouterr().out
    assert "tied embeddings: embed_tokens and lm_head are one matrix in this model; lm_head trains it for both" in out
    assert "blocks of cutoff_len=64" in out
    resumed = run_finetune(tied_model_dir, tmp_path / "resumed", **run | dict(resume_from=tmp_path / "whole" / "ckpt"))
    a, b = metrics_of(whole), metrics_of(resumed)
    assert a["data_format"] == "text" and a["examples"] == 400 and a["val_examples"] == 4
    assert [h["step"] for h in b["history"]["train"]] == [1, 2, 3, 4]  # the checkpoint's history, then its own steps
    torch.testing.assert_close(torch.tensor([h["loss"] for h in b["history"]["train"]]),
                               torch.tensor([h["loss"] for h in a["history"]["train"]]), rtol=1e-5, atol=1e-6)  # fmt: skip
    folder = adapter_dir(str(whole), tmp_path / "unpacked")
    saved = load_file(folder / "adapter_model.safetensors")
    embed, head = saved["base_model.model.model.embed_tokens.weight"], saved["base_model.model.lm_head.weight"]
    assert torch.equal(embed, head) and embed.shape[0] == len(AutoTokenizer.from_pretrained(extended))
    merged = AutoModelForCausalLM.from_pretrained(convert.export_hf(tied_model_dir, tmp_path / "merged", adapter=str(whole)))
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and torch.equal(merged.lm_head.weight, embed)


@pytest.fixture(scope="module")
def flow(tiny_model_dir, extended, language, tmp_path_factory):
    """The whole flow: pre-training on the new language's text (A), merging A, instruction tuning on top (B), and
    merging both in order into the original base."""
    root = tmp_path_factory.mktemp("flow")
    a = run_finetune(tiny_model_dir, root / "a", train_data=language["text"], tokenizer=extended, max_steps=10, cutoff_len=64,
                     modules_to_save="embed_tokens,lm_head", val_set_size=4, eval_steps=5)  # fmt: skip
    merge = ["--to", "merged", "--model_dir", str(tiny_model_dir), "--output_dir"]
    assert convert_weights.main([*merge, str(root / "stage1"), "--adapter", str(a)]) == 0
    b = run_finetune(root / "stage1", root / "b", max_steps=4, val_set_size=0)  # Alpaca records, on top of A
    assert convert_weights.main([*merge, str(root / "final"), "--adapter", f"{a},{b}"]) == 0
    return dict(a=a, b=b, final=root / "final", base=tiny_model_dir, extended=extended)


def test_pretraining_on_plain_text_learns_and_the_archive_carries_the_tokenizer(flow):
    metrics = metrics_of(flow["a"])
    train = [h["loss"] for h in metrics["history"]["train"]]
    assert metrics["data_format"] == "text" and metrics["prompt_template"] == "none"
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 1.0, train
    assert metrics["history"]["val"][-1]["loss"] < metrics["history"]["val"][0]["loss"]
    with tarfile.open(flow["a"]) as tar:
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(tar.getnames())
        assert json.load(tar.extractfile("tokenizer.json")) == json.loads((flow["extended"] / "tokenizer.json").read_text())
    with tarfile.open(flow["b"]) as tar:  # trained on the merged model, whose own tokenizer it is
        assert "tokenizer.json" not in tar.getnames()


def test_merged_pair_equals_the_base_with_both_adapters_unmerged_in_order(flow, tmp_path):
    """PEFT itself, both adapters active at once (A's whole embeddings, both LoRAs added): the merged model's logits."""
    extended = AutoTokenizer.from_pretrained(flow["extended"])
    base = AutoModelForCausalLM.from_pretrained(flow["base"])
    base.resize_token_embeddings(len(extended))  # A's copies replace every row
    peft = PeftModel.from_pretrained(base, adapter_dir(str(flow["a"]), tmp_path / "a"), adapter_name="a")
    peft.load_adapter(adapter_dir(str(flow["b"]), tmp_path / "b"), adapter_name="b")
    peft.base_model.set_adapter(["a", "b"])
    merged = AutoModelForCausalLM.from_pretrained(flow["final"])
    assert merged.config.vocab_size == len(extended) == len(AutoTokenizer.from_pretrained(flow["final"]))
    ids = extended(flow_prompt(), return_tensors="pt")["input_ids"]
    assert ids.max() >= merged.config.vocab_size - 300  # the new language's tokens are read
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def flow_prompt() -> str:
    return "What does this say? " + new_language(1, seed=2)[0]


def _greedy_answer(monkeypatch, base, weights: str | None, merge: bool, **inputs) -> str:
    from alpaca_cog.cli import defaults
    from predict import Predictor

    monkeypatch.setenv("ALPACA_COG_BASE_WEIGHTS", str(base))
    monkeypatch.setenv("ALPACA_COG_MERGE", "1" if merge else "0")
    monkeypatch.setenv("ALPACA_COG_BACKEND", "transformers")  # the model setup() built decodes, not a GGUF export of it
    predictor = Predictor()
    predictor.setup(weights=weights)

    async def answer() -> str:
        run = defaults(Predictor.run) | dict(prompt=flow_prompt(), temperature=0.0, max_tokens=16, seed=0) | inputs
        return "".join(await predictor.run(**run))

    try:
        return asyncio.run(answer())
    finally:
        predictor.engine.close()


def test_merged_model_and_unmerged_pair_serve_the_same_greedy_answer(flow, monkeypatch):
    merged = _greedy_answer(monkeypatch, flow["final"], None, merge=True)
    pair = _greedy_answer(monkeypatch, flow["base"], f"{flow['a']},{flow['b']}", merge=False)  # A merged, B apart
    assert len(merged) > 10 and pair == merged
    # beside a running base of the old vocabulary, A cannot be served per request: it brings its own
    with pytest.raises(ValueError, match="lora_weights: .*out.tar brings its own vocabulary"):
        _greedy_answer(monkeypatch, flow["base"], None, merge=False, lora_weights=str(flow["a"]))


def test_gguf_of_the_merged_pair_continues_a_prompt_in_llama_cpp_as_transformers_does(flow, tmp_path):
    import llama_cpp

    path = convert.export_gguf(flow["base"], tmp_path / "pair.gguf", adapter=f"{flow['a']},{flow['b']}", pre_tokenizer="smollm")
    tokenizer = load_tokenizer(flow["final"])
    text = new_language(1, seed=3)[0]
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    # the added tokens are llama.cpp's user-defined tokens: read from text and printed as transformers does
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt and max(prompt) >= 49152
    assert llm.detokenize(prompt).decode() == text
    tokens = list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0), 20))
    with torch.no_grad():  # transformers' logits after each prefix of llama.cpp's answer
        logits = load_model(flow["final"], device="cpu")(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    # each token is transformers' greedy choice, up to f16 rounding (this tiny model has near ties)
    assert (logits.max(-1).values - chosen).max() < 0.02, (logits.max(-1).values - chosen).tolist()


def _adapter(model, folder, modules_to_save=None, seed=0, **lora):
    """A PEFT adapter with non-zero LoRA weights and, for modules_to_save, copies set to random values."""
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, modules_to_save=modules_to_save, **lora))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "modules_to_save" in name:
                p.normal_()
    peft.save_pretrained(folder)
    return folder


def test_later_modules_to_save_copy_wins_and_lora_deltas_add_in_any_order(tiny_model_dir, tmp_path):
    a = _adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a", ["lm_head"], seed=1, target_modules=["q_proj"])
    b = _adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "b", ["lm_head"], seed=2, target_modules=["v_proj"])
    heads = {name: load_file(folder / "adapter_model.safetensors")["base_model.model.lm_head.weight"] for name, folder in [("a", a), ("b", b)]}
    ab = AutoModelForCausalLM.from_pretrained(convert.export_hf(tiny_model_dir, tmp_path / "ab", adapter=f"{a},{b}"))
    ba = AutoModelForCausalLM.from_pretrained(convert.export_hf(tiny_model_dir, tmp_path / "ba", adapter=f"{b},{a}"))
    assert torch.equal(ab.lm_head.weight, heads["b"]) and torch.equal(ba.lm_head.weight, heads["a"])
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]:
        torch.testing.assert_close(ab.get_parameter(name), ba.get_parameter(name), rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(ab.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
