"""Scoring (prompt, response) pairs with a Hugging Face sequence-classification reward model.

The reward model of Ouyang et al. 2022 / Stiennon et al. 2020: a transformer with a scalar head
(`AutoModelForSequenceClassification`, `num_labels=1`) read at the last token of prompt + response.
The folder is anything `save_pretrained` wrote for such a model, with its tokenizer beside it.
A folder written by the reward-model stage also holds `reward_stats.json`, the mean and standard
deviation of its scores on the training responses; with `normalize=True` scores are standardised
by them, so PPO sees rewards of unit scale whatever offset the Bradley-Terry loss left (it only
fixes differences).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ray.errors import RewardError

STATS_FILE = "reward_stats.json"  # {"mean": ..., "std": ...} of the scores on the RM's training responses


def join_prompt_response(prompt: str, response: str) -> str:
    """The text a reward model reads: the prompt, then the response, with one space between words.

    A word-level tokenizer decodes a response without a leading space ("great fun"), a BPE one with
    it (" great fun"); either way the words must not run together ("wasgreat").
    """
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return f"{prompt} {response}"


class RewardModelScorer:
    """`scores = scorer(prompts, responses)`: the reward model's scalar logit per pair, shape (n,).

    Texts longer than the model's context are cut on the left, keeping the end of the response,
    where the score is read.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, normalize: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.name = str(path)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.mean, self.std = 0.0, 1.0
        stats = self.path / STATS_FILE
        if normalize and stats.is_file():
            saved = json.loads(stats.read_text())
            self.mean, self.std = float(saved["mean"]), max(float(saved["std"]), 1e-6)
        if not (self.path / "config.json").is_file():
            raise RewardError(f"reward model folder {self.path} has no config.json; expected a folder written by "
                              "save_pretrained of an AutoModelForSequenceClassification")

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise RewardError(f"the tokenizer of reward model {self.path} has neither a pad nor an eos token; "
                                  "expected one of them to pad batches")
            tokenizer.pad_token = tokenizer.eos_token
        # right padding keeps absolute positions (GPT-2) right; the head finds each row's last real token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"  # keep the end of the response, where the score is read
        self.tokenizer = tokenizer

        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            self.path, num_labels=1, dtype=dtype, output_loading_info=True)
        missing = sorted(key for key in loading_info.get("missing_keys", ()) if "score" in key or "classifier" in key)
        if missing:
            raise RewardError(f"reward model folder {self.path} has no trained scalar head (missing {missing}); "
                              "expected a model saved from AutoModelForSequenceClassification with num_labels=1")
        if model.config.pad_token_id is None:
            # sequence-classification heads find the last real token by looking for the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = min(tokenizer.model_max_length, positions or tokenizer.model_max_length)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        texts = [join_prompt_response(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits  # (B, 1)
            scores.append(logits[:, 0].float().cpu().numpy())
        raw = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        return (raw - self.mean) / self.std

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.name!r}, batch_size={self.batch_size}, device={str(self.device)!r})"
