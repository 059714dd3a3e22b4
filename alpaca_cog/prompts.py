"""Prompt templates shared by training and prediction, so both see exactly the same text."""

from typing import Literal

TemplateName = Literal["alpaca", "chat", "none"]
TEMPLATE_NAMES: list[str] = ["alpaca", "chat", "none"]

# tloen/alpaca-lora's templates/alpaca.json, verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Where a template says a new turn begins: an answer ends there (a model trained briefly may go on to
# write the next "### Instruction:" itself). Chat templates end turns with EOS; raw prompts never end.
STOP_STRINGS: dict[str, list[str]] = {"alpaca": ["### Instruction:", "### Input:", "### Response:"], "chat": [], "none": []}


def build_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> str:
    """The text the model sees before its response.

    alpaca: the Stanford Alpaca template. chat: the tokenizer's own chat template
    (one user turn). none: the instruction as is, for plain completion.
    """
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("prompt_template 'chat': this tokenizer has no chat template; use 'alpaca' or 'none'")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template == "none":
        return f"{instruction}\n{input}" if input else instruction
    raise ValueError(f"prompt_template: unknown template {template!r}; choose one of {TEMPLATE_NAMES}")


def encode_prompt(tokenizer, template: str, instruction: str, input: str = "") -> list[int]:
    """Token ids of the prompt, identical in training and prediction.

    The tokenizer adds its own special tokens (LLaMA's BOS); chat templates already hold theirs.
    """
    text = build_prompt(template, instruction, input, tokenizer)
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]
