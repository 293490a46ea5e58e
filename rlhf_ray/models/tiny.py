"""Tiny causal language models and tokenizers built locally, for tests and the quickstart.

Nothing here touches a model hub: the tokenizer is a word-level `tokenizers.Tokenizer` over a
built-in vocabulary, the model a randomly initialised `GPT2Config`/`LlamaConfig` of a few layers,
and both are saved as an ordinary Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_ray.models.folders import save_hf_folder

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]

# A toy world in the spirit of Ziegler et al.'s sentiment task: prompts open a sentence about
# something, and the built-in reward (`envs.builtin.sentiment_reward`) likes positive words.
POSITIVE_WORDS = ["good", "great", "happy", "love", "nice", "fun", "wonderful", "best", "bright", "kind"]
NEGATIVE_WORDS = ["bad", "awful", "sad", "hate", "boring", "worst", "dull", "poor", "angry", "cold"]
NEUTRAL_WORDS = [
    "the", "a", "movie", "food", "day", "book", "music", "weather", "team", "city", "was", "is",
    "my", "our", "this", "and", "but", "very", "so", "it", "i", "think", "felt", "really", "today",
    "quite", "not", "of", "with", "all", ".",
]
VOCABULARY = SPECIAL_TOKENS + NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS

# The task tokenizer of multi-turn episodes (envs.dialogue): roles and an end of turn as special tokens, digits
# one token each (a number is its digits), and a chat template, which the sentiment vocabulary lacks.
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
END_OF_TURN = "<|end|>"
DIGITS = [str(d) for d in range(10)]
TASK_WORDS = [
    ".", ",", "?", "+", "-", "*", "=", "hi", "hello", "i", "want", "a", "refund", "for", "my", "order", "number",
    "is", "it", "the", "please", "thanks", "thank", "you", "sorry", "can", "help", "what", "your", "give", "me",
    "here", "done", "ok", "yes", "no", "bye", "which", "need", "get", "back", "money", "of", "call", "answer",
    "wait", "bad", "hate", "now", "how", "much", "sum", "plus", "times",
]
TASK_VOCABULARY = SPECIAL_TOKENS + ROLE_TOKENS + [END_OF_TURN] + DIGITS + TASK_WORDS
# each message is its role token, its words and the end of turn; the generation prompt is the assistant's role
TASK_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

ARCHITECTURES = ("gpt2", "llama")
# names `resolve_model_path` builds: (architecture, vocabulary)
BUILTIN_MODELS = {f"rlhf-ray/tiny-{arch}": (arch, "sentiment") for arch in ARCHITECTURES}
BUILTIN_MODELS["rlhf-ray/tiny-chat-gpt2"] = ("gpt2", "task")


def build_tiny_tokenizer(vocabulary: list[str] = VOCABULARY, chat: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace-split words, `<pad>`=0, `<eos>`=1, `<unk>`=2. `chat`: digits are
    split too, and the role and end-of-turn tokens of `vocabulary` are special tokens of a chat template."""
    if vocabulary[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ValueError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
    if len(set(vocabulary)) != len(vocabulary):
        raise ValueError("vocabulary has repeated words")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token=UNK))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if chat:  # digits split: "427" is 4 2 7, so that any number is spelled in the vocabulary
        word_level.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # batched generation left-pads prompts
        model_max_length=1024,
    )
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in vocabulary
                                                                    if t in ROLE_TOKENS or t == END_OF_TURN]})
        tokenizer.chat_template = TASK_CHAT_TEMPLATE
    return tokenizer


def build_task_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the multi-turn tasks (`envs.dialogue`): roles, `<|end|>`, digits, a template."""
    return build_tiny_tokenizer(TASK_VOCABULARY, chat=True)


def tiny_model_config(arch: str, vocab_size: int, n_layer: int = 2, hidden: int = 64,
                      n_head: int = 2, max_positions: int = 128, pad_token_id: int = 0,
                      eos_token_id: int = 1):
    """The config of a tiny causal LM; dropout is off (RLHF wants deterministic forward passes)."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=n_layer,
            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=max_positions, attention_dropout=0.0, tie_word_embeddings=True,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")


def build_tiny_model(arch: str = "gpt2", seed: int = 0, vocabulary: str = "sentiment", **config_kwargs):
    """A randomly initialised tiny causal LM (float32, eval mode) and its tokenizer. `vocabulary`: "sentiment"
    (the toy task's words) or "task" (`build_task_tokenizer`, with a context of 256 positions by default)."""
    from transformers import AutoModelForCausalLM

    if vocabulary not in ("sentiment", "task"):
        raise ValueError(f"unknown tiny vocabulary {vocabulary!r}; expected 'sentiment' or 'task'")
    tokenizer = build_tiny_tokenizer() if vocabulary == "sentiment" else build_task_tokenizer()
    if vocabulary == "task":
        config_kwargs.setdefault("max_positions", 256)
    config = tiny_model_config(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = (tokenizer.eos_token_id if vocabulary == "sentiment" else
                                            [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)])
    return model.eval(), tokenizer


def save_tiny_model(path: str | Path, arch: str = "gpt2", seed: int = 0, vocabulary: str = "sentiment",
                    **config_kwargs) -> Path:
    """Build a tiny model and save it, with its tokenizer, as a Hugging Face folder at `path` (replaced)."""
    return save_hf_folder(path, *build_tiny_model(arch, seed=seed, vocabulary=vocabulary, **config_kwargs))
