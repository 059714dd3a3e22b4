"""Text embeddings from the causal LM itself: the last hidden state, mean-pooled over a text's tokens, L2-normalised."""

import torch
import torch.nn.functional as F

from .engine import BASE

BATCH = 16  # texts per forward pass: bounds the activations a long list of inputs holds at once


def embed(model, tokenizer, texts: list[str], adapter: str | None = None) -> tuple[torch.Tensor, int]:
    """(one unit-length row per text, tokens read). Texts longer than the context are cut to it.

    Each text is tokenized alone and padded here: asking the tokenizer to pad would change its shared padding
    state, which the engine's thread reads while decoding. The caller holds the engine's lock.
    """
    context = model.config.max_position_embeddings
    ids = [tokenizer(text)["input_ids"][:context] for text in texts]
    if not all(ids):
        raise ValueError("input: a text is empty after tokenization")
    peft = hasattr(model, "peft_config")  # adapters loaded beside the base: say which one each row uses
    rows = []
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        width = max(map(len, chunk))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in chunk], device=model.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=model.device)
        kwargs = {"adapter_names": [adapter or BASE] * len(chunk)} if peft else {}
        with torch.inference_mode():  # right padding: causal attention keeps real tokens from seeing it
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, **kwargs)
        hidden, weights = out.hidden_states[-1].float(), mask[..., None].float()
        rows.append(F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).cpu())
    return torch.cat(rows), sum(map(len, ids))
