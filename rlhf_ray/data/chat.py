"""Chat templates: a prompt as a chat model expects it, a user turn and the opening of its reply.

An instruct model (SmolLM2-135M-Instruct: `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`)
was tuned on text in its chat template; a raw prompt makes it continue the user's text instead of
answering. A base model (the tiny toy models) has no template and reads the prompt as it is.

A formatted prompt ends with the template's generation prompt, usually a newline, so
`rlhf_ray.rewards.reward_model.join_prompt_response` puts the response right after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from rlhf_ray.data.records import DataError, PreferenceRecord, PromptRecord, RatingRecord, SFTRecord


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether to apply the chat template: `None` means when the tokenizer has one."""
    if chat_template is None:
        return has_chat_template(tokenizer)
    if chat_template and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"chat_template is true, but the tokenizer of {name!r} has no chat template; "
                        "set chat_template to null (auto) or false for a base model")
    return chat_template


_TURN_ENDS: dict[tuple, str] = {}  # (template, bos, eos) -> its turn end: rendered once, not once per prompt


def _turn_end(tokenizer) -> str:
    """What the template puts after a user message's text: the end of the turn and the generation prompt
    (ChatML: "<|im_end|>\\n<|im_start|>assistant\\n")."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _TURN_ENDS:
        marker = "\x00user-text\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
        _TURN_ENDS[key] = text[text.index(marker) + len(marker):]
    return _TURN_ENDS[key]


def format_prompt(tokenizer, prompt_text: str, chat: bool) -> str:
    """`prompt_text` as one user turn followed by the assistant's generation prompt when `chat`, else as is.
    A prompt that already ends with the template's end of a user turn and generation prompt is a rendered
    conversation (a served chat's prompt in an exported feedback file, say) and is left as it is: wrapping
    it again would train on text the model never read."""
    if not chat:
        return prompt_text
    if not has_chat_template(tokenizer):
        raise DataError("format_prompt(chat=True) needs a tokenizer with a chat template")
    end = _turn_end(tokenizer)
    if end.strip() and prompt_text.endswith(end):
        return prompt_text
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}],
                                         add_generation_prompt=True, tokenize=False)


def format_records(records: Iterable[PromptRecord | SFTRecord | PreferenceRecord | RatingRecord], tokenizer,
                   chat_template: bool | None = None) -> list:
    """The records with each prompt formatted by `format_prompt`; responses are left as they are.

    The response that ends an assistant turn needs the turn's closing token, which the SFT and reward
    stages append with the tokenizer's EOS, as they do for a base model.
    """
    chat = use_chat_template(tokenizer, chat_template)
    records = list(records)
    if not chat:
        return records
    return [dataclasses.replace(record, prompt=format_prompt(tokenizer, record.prompt, chat=True))
            for record in records]
