"""The text side of a policy without its weights: the tokenizer, the chat template and the context length.
The ingress checks and tokenises requests with it, the model replicas sample the token ids it made, and
the in-process engine uses the same code, so every path counts tokens alike.
"""

from __future__ import annotations


def context_length(config, tokenizer) -> int:
    """The longest sequence a model of `config` takes: its position table, else the tokenizer's limit."""
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise ValueError(f"cannot tell the context length of a {type(config).__name__} model; set it explicitly")


class PromptCodec:
    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    @classmethod
    def load(cls, policy: str) -> "PromptCodec":
        """The codec of a policy folder or model name: reads its tokenizer and config, not its weights."""
        from transformers import AutoConfig

        from rlhf_ray.models.loading import load_tokenizer, resolve_model_path

        path = resolve_model_path(policy)
        tokenizer = load_tokenizer(path)
        return cls(tokenizer, context_length(AutoConfig.from_pretrained(path), tokenizer))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without added special tokens (as the training environment encodes)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation: the tokenizer's chat template, else `role: content` lines."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{message['role']}: {message['content']}" for message in messages]
        return "\n".join(lines + ["assistant:"])
