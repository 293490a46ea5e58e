"""The typed run configuration: one pydantic model per component, gathered into `RunConfig`.

Every model forbids unknown keys, so a typo in YAML or on the command line is an error that names
the key (see `rlhf_ray.config.loading`), never a silently ignored option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf_ray.config.loop import LoopConfig
from rlhf_ray.config.section import _Section
from rlhf_ray.config.stages import DPOStageConfig, FeedbackStageConfig, SatisfactionStageConfig, StageConfig
from rlhf_ray.data.config import DatasetConfig


class LoraSettings(_Section):
    """LoRA adapters (PEFT) on the policy: only they train; the reference is the policy with them disabled,
    and weight syncs send only them (rlhf_ray/models/lora.py). No LoRA dropout: the learner runs without
    dropout, so that its log-probs are the sampler's (PPO_DETAILS.md)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)  # the update is scaled by alpha / r
    # names of the linear layers to adapt (the last part of a module name, e.g. q_proj), or "all-linear"
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if not value:
            raise ValueError("name at least one module, or 'all-linear'")
        return value


class ModelConfig(_Section):
    policy: str = "rlhf-ray/tiny-gpt2"  # local HF folder or a known model name
    reference: str | None = None  # frozen reference for the KL penalty; None: a copy of the initial policy
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraSettings | None = None  # None: full-parameter training

    @model_validator(mode="after")
    def _lora_reference_is_the_base(self) -> "ModelConfig":
        if self.lora is not None and self.reference is not None:
            raise ValueError("with model.lora the reference is the policy with its adapters disabled: "
                             "leave model.reference unset")
        return self


class SamplingConfig(_Section):
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k filtering
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    greedy: bool = False


class WorkersConfig(_Section):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> "WorkersConfig":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class DialogueConfig(_Section):
    """Multi-turn episodes (`envs.dialogue`): after each assistant turn the task's user or tool answers, and
    `rollout.max_new_tokens` is one turn's budget."""

    task: str  # "refund", "calculator" or "module:name" of a class or object with reply(prompt, turns)
    max_turns: int = Field(3, ge=1)  # assistant turns per episode
    max_env_tokens: int = Field(24, ge=1)  # tokens appended after one turn (a message and the template's marks)


class RolloutConfig(_Section):
    batch_size: int = Field(32, ge=1)  # prompts per PPO iteration
    max_new_tokens: int = Field(16, ge=1)
    max_length: int | None = Field(None, ge=2)  # context limit; None: the longest prompt + max_new_tokens
    # episodes a worker decodes at once; when one ends, the next prompt of its chunk takes its row
    # (continuous batching). None: the whole chunk as one batch
    max_batch: int | None = Field(None, ge=1)
    # generate iteration k + 1 while the learner trains on k: rollout and update overlap, and the episodes
    # are one policy version old, which decoupled PPO corrects (ppo.behaviour_weight_cap). Off by default
    overlap: bool = False
    sampling: SamplingConfig = SamplingConfig()
    dialogue: DialogueConfig | None = None  # None: one prompt, one response
    workers: WorkersConfig = WorkersConfig()
    num_cpus: float = Field(1.0, gt=0.0)  # Ray CPUs reserved by each rollout worker
    # torch threads of each worker on CPU. None: num_cpus rounded down (at least 1). Without rollout.overlap the
    # learner waits while the workers generate, so one worker on a laptop may take every core
    torch_threads: int | None = Field(None, ge=1)
    resources: dict[str, float] = {}  # custom Ray resources per worker, e.g. {rollout_node: 1}
    use_gpu: bool = False
    # bounds: a worker that dies while starting is replaced with backoff at most max_start_failures times in
    # a row; every wait fails the run, naming the workers that did not answer, once its time is up
    max_start_failures: int = Field(3, ge=1)
    start_timeout_s: float = Field(600.0, gt=0.0)  # a new worker placed and its policy loaded
    timeout_s: float = Field(1800.0, gt=0.0)  # one iteration's episodes back from every worker
    sync_timeout_s: float = Field(300.0, gt=0.0)  # new weights loaded by every worker
    # how new weights (with LoRA, the adapters) reach the workers: "object_store", one shared copy each worker
    # reads (the default; on CPU it is as fast), or "collective", a gloo broadcast from the learner's rank 0 over
    # a process group with the workers, in buckets of sync_bucket_mb, checksummed on every worker
    sync: Literal["object_store", "collective"] = "object_store"
    sync_bucket_mb: float = Field(64.0, gt=0.0)


class DataConfig(_Section):
    prompts: list[str] | None = None  # PPO prompts written out; None with no prompt_dataset: the toy env's
    prompt_dataset: DatasetConfig | None = None  # PPO prompts from a file (chat template applied)
    eval_dataset: DatasetConfig | None = None  # held-out prompts for `rlhf-ray eval` (+ references, if any)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "DataConfig":
        if self.prompts is not None and self.prompt_dataset is not None:
            raise ValueError("set data.prompts or data.prompt_dataset, not both")
        return self


class RewardComponent(_Section):
    """One term w * r(prompt, response) of a composite reward; r is a function or a reward model."""

    function: str | None = None  # "module:function"
    model: str | None = None  # reward-model folder; "{run}" stands for the run folder (output_dir/name)
    kwargs: dict = {}  # keyword arguments bound to `function`, e.g. {target: 20} for a length score
    weight: float = 1.0  # lambda, mu, ... of R = Q + lambda*S + mu*H
    normalize: bool = True  # a reward model's score standardised by the statistics saved with it

    @model_validator(mode="after")
    def _function_or_model(self) -> "RewardComponent":
        if (self.function is None) == (self.model is None):
            raise ValueError("a reward component needs exactly one of 'function' and 'model'")
        if self.kwargs and self.function is None:
            raise ValueError("'kwargs' applies to a 'function' component only")
        return self


DEFAULT_REWARD = "envs.builtin:sentiment_reward"  # the toy sentiment task's reward (envs.builtin.SENTIMENT_REWARD)


class RewardConfig(_Section):
    """`function`: one reward; `components`: R = sum of weight * component, each logged as reward/<name>."""

    function: str | None = None  # "module:function" or a reward-model folder; default: the toy sentiment reward
    components: dict[str, RewardComponent] | None = None
    timeout_s: float = Field(300.0, gt=0.0)  # one batched reward call; longer fails the run naming the reward

    @model_validator(mode="before")
    @classmethod
    def _default_function(cls, data):
        """No reward named: the toy task's (a default on the input, not a write after validation)."""
        if isinstance(data, dict) and data.get("function") is None and data.get("components") is None:
            return {**data, "function": DEFAULT_REWARD}
        return data

    @model_validator(mode="after")
    def _function_or_components(self) -> "RewardConfig":
        if self.components is not None and not self.components:
            raise ValueError("reward.components is empty; name at least one component")
        if self.function is not None and self.components is not None:
            raise ValueError("set reward.function or reward.components, not both")
        return self


class KLConfig(_Section):
    coef: float = Field(0.05, ge=0.0)  # beta; the initial value when adaptive
    adaptive: bool = False  # Ziegler et al. 2019 controller towards `target`
    target: float = Field(6.0, gt=0.0)  # nats per sequence
    horizon: float = Field(10000.0, gt=0.0)
    # unset: the advantage estimator's paper (ESTIMATOR_DEFAULTS); k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1
    estimator: Literal["k1", "k3"] = "k1"
    in_reward: bool = True  # True: -beta*KL per token in the reward; False: a KL loss term (GRPO style)


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # advantages from a baseline over each prompt's group

# What each advantage estimator's paper uses, for the keys a config leaves unset (PPO_DETAILS.md). Batch
# whitening (a token-weighted shift and scale) stays off for the group estimators: their advantages are
# already centred per group, and the token-weighted shift would bring back the length bias Dr.GRPO removes;
# REINFORCE++ normalises over the global batch itself.
ESTIMATOR_DEFAULTS: dict[str, dict] = {
    # Ziegler et al. 2019 / InstructGPT PPO: whitened GAE advantages, per-token KL penalty in the reward
    "gae": {"whiten_advantages": True, "loss_aggregation": "token-mean", "kl": {"in_reward": True, "estimator": "k1"}},
    # GRPO (Shao et al. 2024): 1/G sum_i 1/|o_i| sum_t, k3 KL as a loss term
    "grpo": {"whiten_advantages": False, "loss_aggregation": "seq-mean-token-mean",
             "kl": {"in_reward": False, "estimator": "k3"}},
    # Dr.GRPO (Liu et al. 2025): each sequence's token sum over one constant (the generation budget)
    "dr_grpo": {"whiten_advantages": False, "loss_aggregation": "seq-mean-token-sum-norm",
                "kl": {"in_reward": False, "estimator": "k3"}},
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline of KL-penalised sequence rewards
    "rloo": {"whiten_advantages": False, "loss_aggregation": "token-mean", "kl": {"in_reward": True, "estimator": "k1"}},
    # REINFORCE++ (Hu 2025): per-token KL in the reward, returns normalised over the global batch
    "reinforce_pp": {"whiten_advantages": False, "loss_aggregation": "token-mean",
                     "kl": {"in_reward": True, "estimator": "k1"}},
}


class PPOConfig(_Section):
    # gae: a critic; grpo, dr_grpo (GRPO without the std division), rloo: a group baseline; reinforce_pp:
    # REINFORCE++, the return-to-go of the KL-penalised rewards whitened over the batch (no critic, no groups)
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    group_size: int = Field(1, ge=1)  # responses sampled per prompt (the group estimators need >= 2)
    epochs: int = Field(4, ge=1)  # PPO epochs over one rollout batch
    minibatch_size: int = Field(8, ge=1)  # episodes per optimizer step, over all learner ranks
    # ppo: token ratios clipped to [1 - clip_eps, 1 + (clip_eps_high or clip_eps)]; gspo: one ratio per sequence
    # (the geometric mean of its token ratios) clipped to the same range, which the GSPO paper sets far
    # narrower (clip_eps 3e-4, clip_eps_high 4e-4); gspo needs a group estimator
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    clip_eps: float = Field(0.2, gt=0.0)
    clip_eps_high: float | None = Field(None, gt=0.0)  # DAPO's clip-higher (0.28 in the paper); None: clip_eps
    # how the policy loss's per-token terms become one number (veRL's names; see algorithms/critic_free.py):
    # token-mean (PPO, DAPO) | seq-mean-token-mean (GRPO's paper) | seq-mean-token-sum | seq-mean-token-sum-norm
    # (Dr.GRPO: each sequence's sum divided by rollout.max_new_tokens). Over all ranks and micro-batches of a
    # minibatch. Unset: ESTIMATOR_DEFAULTS
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] = "token-mean"
    dual_clip: float | None = Field(None, gt=1.0)
    # overlapped rollouts (rollout.overlap): each token's loss is weighted by pi_learner / pi_sampler, at most this
    behaviour_weight_cap: float = Field(2.0, ge=1.0)
    value_clip_eps: float | None = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    entropy_coef: float = Field(0.0, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = True  # unset: ESTIMATOR_DEFAULTS (on for gae only)
    missing_eos_penalty: float | None = None  # score of responses cut by the budget without EOS
    # DAPO's overlong shaping: a response longer than rollout.max_new_tokens - overlong_buffer tokens loses up to
    # overlong_penalty_factor from its score, linearly over the buffer's last tokens. None: off
    overlong_buffer: int | None = Field(None, ge=1)
    overlong_penalty_factor: float = Field(1.0, ge=0.0)
    # DAPO's dynamic sampling (a group estimator): groups whose rewards are all equal carry no signal, so they are
    # dropped and more prompts sampled, at most max_sampling_rounds rollouts an iteration; a batch still short
    # then is filled with dropped groups (zero advantage). Counted as rollout/sampling_rounds, informative_frac
    dynamic_sampling: bool = False
    max_sampling_rounds: int = Field(3, ge=1)
    reward_scale: float = 1.0
    kl: KLConfig = KLConfig()

    @model_validator(mode="before")
    @classmethod
    def _estimator_defaults(cls, data):
        """Keys the config leaves unset take the estimator's paper values (ESTIMATOR_DEFAULTS), on the input,
        so the run's saved config.yaml shows what ran."""
        if not isinstance(data, dict) or data.get("advantage_estimator", "gae") not in ESTIMATOR_DEFAULTS:
            return data  # a wrong estimator name is reported by the field's own check
        defaults = ESTIMATOR_DEFAULTS[data.get("advantage_estimator", "gae")]
        data = {key: data.get(key, value) for key, value in defaults.items() if key != "kl"} | data
        kl = data.get("kl", {})
        if isinstance(kl, dict):
            data["kl"] = defaults["kl"] | kl
        return data

    @model_validator(mode="after")
    def _groups_for_critic_free(self) -> "PPOConfig":
        if self.advantage_estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(f"advantage_estimator {self.advantage_estimator!r} needs group_size >= 2")
        if self.dynamic_sampling and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ValueError(f"dynamic_sampling drops groups of equal rewards: it needs a group estimator "
                             f"({', '.join(GROUP_ESTIMATORS)}), not {self.advantage_estimator!r}")
        if self.policy_loss == "gspo" and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ValueError(f"policy_loss 'gspo' weighs whole sequences: it needs a group estimator "
                             f"({', '.join(GROUP_ESTIMATORS)}), not {self.advantage_estimator!r}")
        return self


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)  # Ray CPUs of each learner rank
    resources: dict[str, float] = {}  # custom Ray resources per rank, e.g. {learner_node: 1}: one rank a node
    # torch threads of a rank on CPU. None: the node's Ray CPUs shared among its learner ranks when the rollout
    # workers wait for the update (no rollout.overlap; the supervised stages), else cpus_per_worker
    torch_threads: int | None = Field(None, ge=1)
    zero_stage: Literal[2, 3] = 2
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default); 0 shards them all
    zero3_param_persistence_threshold: int = Field(100_000, ge=0)
    lr: float = Field(1e-5, gt=0.0)
    critic_lr: float | None = Field(None, gt=0.0)  # None: lr
    adam_eps: float = Field(1e-5, gt=0.0)  # PyTorch Adam puts eps outside the sqrt (PPO_DETAILS.md)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    bf16: bool = False  # GPU only
    gradient_checkpointing: bool = False
    fused_optimizer: bool = True  # torch's fused AdamW kernel (CPU and CUDA)
    # padded tokens (rows x (longest prompt + longest response)) per forward/backward pass of a rank:
    # a PPO minibatch runs as several micro-batches of similar lengths whose gradients add up before its
    # one optimizer step (bounds activation memory, cuts padding). None: each minibatch in one pass
    micro_batch_tokens: int | None = Field(None, ge=1)


class TrainConfig(_Section):
    iterations: int = Field(10, ge=1)
    checkpoint_every: int = Field(5, ge=1)  # iterations between checkpoints
    max_failures: int = Field(2, ge=0)  # learner restarts (from the last checkpoint) before the run fails
    # every N iterations (and after the last) the policy answers data.eval_dataset's prompts with fixed seeds,
    # and eval/reward_mean (and each reward component) is logged and shown: the held-out score, which does not
    # follow the batch's prompts as the training reward does. None: no evaluation during training
    eval_every: int | None = Field(None, ge=1)
    eval_prompts: int = Field(64, ge=1)  # at most this many prompts of data.eval_dataset


STAGE_SECTIONS = ("sft", "reward_model", "satisfaction_model", "dpo")  # RunConfig's stage sections, in order


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    sft: StageConfig | None = None  # `rlhf-ray pipeline`: supervised fine-tuning, written to {run}/sft
    reward_model: FeedbackStageConfig | None = None  # `rlhf-ray pipeline`: Bradley-Terry RM, written to {run}/reward_model
    # `rlhf-ray pipeline`: the user-satisfaction model S on ratings and likes, written to {run}/satisfaction_model
    satisfaction_model: SatisfactionStageConfig | None = None
    dpo: DPOStageConfig | None = None  # `rlhf-ray pipeline`: DPO / IPO / SimPO on pairs, written to {run}/dpo
    loop: LoopConfig | None = None  # `rlhf-ray loop`: serve, collect feedback, retrain, gate, redeploy

    @property
    def run_dir(self) -> str:
        """The run folder, `output_dir/name`: what "{run}" in a model path stands for."""
        return f"{self.output_dir.rstrip('/')}/{self.name}"

    def expand(self, path: str) -> str:
        return path.replace("{run}", self.run_dir)

    def with_absolute_paths(self) -> "RunConfig":
        """A copy whose relative file paths (output_dir, datasets, local model folders) are made absolute
        against the current directory: Ray workers run in other directories."""
        from pathlib import Path

        data = self.model_dump()

        def absolute(path: str | None, must_exist: bool = False) -> str | None:
            if path is None or path.startswith("{run}") or Path(path).is_absolute():
                return path
            if must_exist and not Path(path).exists():
                return path  # a model name (built-in or hub id), not a local folder
            return str(Path(path).resolve())

        data["output_dir"] = absolute(data["output_dir"])
        stages = [data[name] for name in STAGE_SECTIONS]
        for section in (data["data"], *stages):
            for key in ("prompt_dataset", "eval_dataset", "data"):
                if section and section.get(key):
                    section[key]["path"] = absolute(section[key]["path"])
        for stage in stages:
            if stage and stage.get("feedback_db"):
                stage["feedback_db"] = absolute(stage["feedback_db"])
        data["model"]["policy"] = absolute(data["model"]["policy"], must_exist=True)
        data["model"]["reference"] = absolute(data["model"]["reference"], must_exist=True)
        for stage in stages:
            if stage:
                stage["base"] = absolute(stage["base"], must_exist=True)
        for component in (data["reward"]["components"] or {}).values():
            component["model"] = absolute(component["model"], must_exist=True)
        if data["reward"]["function"]:
            data["reward"]["function"] = absolute(data["reward"]["function"], must_exist=True)
        return RunConfig.model_validate(data)

    @model_validator(mode="after")
    def _batch_fits_the_learner(self) -> "RunConfig":
        episodes = self.rollout.batch_size * self.ppo.group_size
        if episodes % self.ppo.minibatch_size:
            raise ValueError(f"rollout.batch_size x ppo.group_size ({episodes}) must be a multiple of "
                             f"ppo.minibatch_size ({self.ppo.minibatch_size})")
        if self.ppo.minibatch_size % self.learner.num_workers:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must be a multiple of "
                             f"learner.num_workers ({self.learner.num_workers})")
        if self.ppo.overlong_buffer is not None and self.ppo.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"ppo.overlong_buffer ({self.ppo.overlong_buffer}) must not exceed "
                             f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if self.train.eval_every and self.data.eval_dataset is None:
            raise ValueError("train.eval_every evaluates on held-out prompts: set data.eval_dataset")
        if self.ppo.policy_loss == "gspo" and self.rollout.overlap:
            raise ValueError("ppo.policy_loss 'gspo' has no correction for episodes a policy version old: "
                             "set rollout.overlap false")
        return self
