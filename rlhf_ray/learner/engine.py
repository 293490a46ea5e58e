"""DeepSpeed engines of the learner: ZeRO-2/3 on CPU (gloo) or GPU (NCCL, bf16) inside Ray Train workers.

`create_engine` wraps a policy (or critic) with torch AdamW, `create_reference_engine` a frozen reference,
`gather_full_state_dict` reassembles the full weights on rank 0 for weight sync and `save_pretrained`.

What Ray Train V2 (Ray 2.60) needs (checked in tests/test_learner_engine.py):
- `TorchTrainer(..., torch_config=TorchConfig(backend="gloo"))` creates the default process group (env://)
  before the train function runs, and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT: `deepspeed.initialize(..., dist_init_required=False)` adopts it; no DeepSpeed launcher.
- `Result.metrics` holds only the metrics of the last report *with a checkpoint*: `ray.train.report(metrics)`
  alone leaves it None. `Result.return_value` is rank 0's return value, which must not contain torch
  tensors (the worker fails with a ValueError): return numbers or numpy, or hand tensors over in a file or
  checkpoint. `RunConfig(storage_path=...)` defaults to ~/ray_results; set it.
- A worker's exception makes `fit()` raise `ray.train.WorkerGroupError` (a `TrainingFailedError`; the default
  `FailureConfig(max_failures=0)` does not retry); its message holds each failed rank's traceback and
  `.worker_failures` maps rank -> original exception. A function defined in a module the workers cannot
  import (a test file) must be shipped with `ray.cloudpickle.register_pickle_by_value(module)`.

What DeepSpeed 0.19.8 needs on CPU:
- The accelerator is chosen once, at the first `import deepspeed`: CPU when torch sees no CUDA. CPU workers on
  a GPU machine need DS_ACCELERATOR=cpu in their environment (`distributed.deepspeed_worker_env`).
- Adopting the process group on the CPU accelerator JIT-compiles `deepspeed_shm_comm` (ninja + C++ compiler,
  ~100 s on 2 cores, cached in ~/.cache/torch_extensions); it serves only tensor-parallel inference, so
  `_skip_cpu_shm_comm_build` marks it incompatible. No other compiled op is needed: the optimizer is
  `torch.optim.AdamW` passed as client optimizer, which ZeRO accepts only with
  `zero_allow_untested_optimizer: true`.
- ZeRO-3 runs on CPU/gloo in float32, but parameters below `stage3_param_persistence_threshold` (1e5 by
  default) stay whole on every rank: a tiny model is not sharded at all unless it is 0.
- DeepSpeed averages gradients over ranks and `engine.backward` divides by the accumulation steps: a loss
  that is a mean over all tokens of the step needs `distributed.global_token_mean_loss`.
  `engine.get_global_grad_norm()` is the norm before clipping, like `clip_grad_norm_`'s return value.
- Under ZeRO-3 `engine.module.state_dict()` returns empty partitioned tensors: use `gather_full_state_dict`,
  a collective that every rank must call. A model built outside `deepspeed.zero.Init` is partitioned by
  `deepspeed.initialize`, so every rank first holds the whole model: load models inside `partitioned_load`.
  Parameters created outside it (PEFT's adapters, a value head) are partitioned by `deepspeed.initialize`.
- HF gradient checkpointing acts only in train mode; `create_engine` turns dropout off for good and leaves
  the module in train mode. Each process's first `deepspeed.initialize` spends ~4 s importing torch inductor.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhf_ray.learner.distributed import get_rank, get_world_size, require_process_group


class EngineConfig(BaseModel):
    """How a learner model is trained: ZeRO stage, AdamW, clipping, precision, batch split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zero_stage: Literal[2, 3] = 2  # 2: optimizer state + grads sharded; 3: parameters sharded too
    lr: float = Field(1e-5, gt=0)
    # exposed because PyTorch's and TF1's Adam place epsilon differently (PPO_DETAILS); 1e-5 as in CleanRL's PPO
    adam_eps: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)  # not applied to biases and norm weights (1-d parameters)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    bf16: bool = False  # GPU only: bf16 parameters and activations, fp32 master weights in the optimizer
    micro_batch_size: int = Field(8, ge=1)  # sequences per rank per forward/backward
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per rank per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in backward (non-reentrant)
    # torch's fused AdamW kernel (one kernel for all parameters; CPU and CUDA): ~7x faster steps than the
    # foreach implementation on CPU, same update up to float rounding
    fused_optimizer: bool = True
    # dropout off for good (PPO_DETAILS: deterministic forward passes); the engine's module is then put in
    # train mode, which HF gradient checkpointing needs (it is skipped in eval mode)
    disable_dropout: bool = True
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default 1e5);
    # 0 partitions every parameter, which tiny test models need to be sharded at all
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "EngineConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


def build_deepspeed_config(cfg: EngineConfig, world_size: int, train_batch_size: int | None = None,
                           zero_stage: int | None = None) -> dict:
    """The DeepSpeed config dict of `cfg` for `world_size` data-parallel ranks.

    DeepSpeed insists on `train_batch_size = micro_batch_size * gradient_accumulation_steps * world_size`.
    Given `train_batch_size` (sequences per optimizer step, all ranks), the accumulation steps follow from
    it; otherwise `cfg.gradient_accumulation_steps` is used. `zero_stage` overrides `cfg.zero_stage`
    (the frozen reference uses 0 or 3).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_step = cfg.micro_batch_size * world_size
    if train_batch_size is None:
        accumulation = cfg.gradient_accumulation_steps
    else:
        if train_batch_size <= 0 or train_batch_size % per_step:
            raise ValueError(
                f"train_batch_size {train_batch_size} must be a positive multiple of micro_batch_size "
                f"{cfg.micro_batch_size} x world_size {world_size} = {per_step}"
            )
        accumulation = train_batch_size // per_step
    stage = cfg.zero_stage if zero_stage is None else zero_stage
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.stage3_param_persistence_threshold
    elif stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_batch_size": per_step * accumulation,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # without DeepSpeed's own accumulation, `step()` is the boundary and `backward()` only adds gradients
        # up: a step may then take any number of micro-batches (PPO's token-budget micro-batches)
        "managed_gradient_accumulation": accumulation > 1,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        # the optimizer is a plain torch.optim.AdamW (no compiled ops needed), which ZeRO calls untested
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _check_accelerator(cfg: EngineConfig) -> str:
    """The device type DeepSpeed will use; an error when it cannot match the process group or bf16."""
    backend = require_process_group()
    device = get_accelerator().device_name()
    expected = "cuda" if backend == "nccl" else "cpu"
    if device != expected:
        raise RuntimeError(
            f"DeepSpeed accelerator is {device!r} but the process group backend is {backend!r} "
            f"(expected accelerator {expected!r}): set DS_ACCELERATOR={expected} in the workers' environment "
            "before deepspeed is imported (see rlhf_ray.learner.distributed.deepspeed_worker_env)"
        )
    if cfg.bf16 and device != "cuda":
        raise ValueError("bf16=True needs a GPU (NCCL) learner; on CPU train in float32")
    if device == "cpu":
        _skip_cpu_shm_comm_build()
    return device


def _skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed's comm backend builds `deepspeed_shm_comm` with ninja and a C++
    compiler when it adopts the process group (~100 s on 2 cores the first time, an error where no
    compiler is installed). The op serves only `inference_all_reduce` (tensor-parallel inference), which
    falls back to the process group's all-reduce without it. DeepSpeed keeps op compatibility in one
    module-level dict that it consults before building; marking the op incompatible skips the build.
    """
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops

    if ds_comm.cdb is None:  # the backend, once made, already has (or lacks) the op
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (the 1-d tensors). A parameter
    already partitioned by ZeRO-3 (`partitioned_load`) is empty here: its full shape is `ds_shape`."""
    decay, no_decay = [], []
    for param in model.parameters():  # tied parameters appear once
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
    """The torch AdamW a `create_engine` learner uses (also the one-process reference in tests)."""
    return torch.optim.AdamW(optimizer_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.adam_eps, fused=cfg.fused_optimizer or None)



def learner_engine_config(learner, lr: float, micro_batch_size: int, weight_decay: float | None = None) -> EngineConfig:
    """The `EngineConfig` of one learner model from the run's `learner` section (`LearnerConfig`): the one
    place PPO's actor and critic and the SFT and reward-model stages get their optimizer and ZeRO settings.
    `lr`, the per-rank `micro_batch_size` and (for a stage) `weight_decay` are the caller's."""
    return EngineConfig(zero_stage=learner.zero_stage, lr=lr, adam_eps=learner.adam_eps,
                        weight_decay=learner.weight_decay if weight_decay is None else weight_decay,
                        max_grad_norm=learner.max_grad_norm, bf16=learner.bf16, micro_batch_size=micro_batch_size,
                        gradient_checkpointing=learner.gradient_checkpointing, fused_optimizer=learner.fused_optimizer,
                        stage3_param_persistence_threshold=learner.zero3_param_persistence_threshold)


@contextlib.contextmanager
def partitioned_load(cfg: EngineConfig, train_batch_size: int | None = None) -> Iterator[None]:
    """Under ZeRO-3, Hugging Face models loaded inside (`from_pretrained`) are partitioned as they are built,
    so that no rank ever holds the whole model: transformers builds them in `deepspeed.zero.Init` (through
    its `HfDeepSpeedConfig`), only rank 0 reads the checkpoint's values (memory-mapped; the other ranks map
    only its shapes), and each layer is gathered, filled on rank 0 and scattered again as it loads. Under
    ZeRO-2 every rank holds the whole model anyway, and this does nothing. Call on every rank."""
    if cfg.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    backend = _check_accelerator(cfg) and require_process_group()
    _quiet_deepspeed()
    # DeepSpeed adopts the process group first: its config reads the world size from it
    deepspeed.comm.init_distributed(dist_backend=backend, dist_init_required=False, verbose=False)
    # transformers holds it by a weak reference: alive for the block only, so that nothing else in the
    # process (the sampler's `generate`, a later stage) thinks ZeRO-3 is on
    active = HfDeepSpeedConfig(build_deepspeed_config(cfg, get_world_size(), train_batch_size))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del active


def create_engine(model: torch.nn.Module, cfg: EngineConfig, train_batch_size: int | None = None):
    """A DeepSpeed training engine around `model` (HF causal LM or any module) with AdamW.

    Call on every rank of an existing process group (a Ray Train worker) with the same full model
    (same weights on every rank, e.g. same seed or same checkpoint). Train with
    `loss = ...engine(...)...; engine.backward(loss); engine.step()`; `engine.module` is the model.
    """
    _check_accelerator(cfg)
    if cfg.disable_dropout:
        disable_dropout(model)
        model.train()
    if cfg.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(f"gradient_checkpointing=True needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
        # non-reentrant checkpointing works with ZeRO-3's parameter hooks; the KV cache is useless in training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    config = build_deepspeed_config(cfg, get_world_size(), train_batch_size)
    optimizer = make_optimizer(model, cfg)
    _quiet_deepspeed()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0: `nn.Dropout` modules and float `*dropout` attributes.

    The attributes cover models that call `F.dropout(p=self.attention_dropout)` in their attention
    (Llama and most HF decoders) instead of holding an `nn.Dropout`.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def create_reference_engine(model: torch.nn.Module, cfg: EngineConfig):
    """A frozen, eval-mode DeepSpeed engine (no optimizer) for reference log-probs.

    Under ZeRO-3 the reference is sharded like the policy (DeepSpeed's ZeRO-3 inference: parameters
    gathered layer by layer in the forward pass), so a model too large for one device still fits;
    under ZeRO-2, which shards only optimizer state and gradients that a frozen model does not have,
    every rank keeps a full copy (stage 0: no gathering cost). Use it as `engine(input_ids=..., ...)`
    under `torch.no_grad()`.
    """
    _check_accelerator(cfg)
    model.requires_grad_(False).eval()
    stage = 3 if cfg.zero_stage == 3 else 0
    config = build_deepspeed_config(cfg.model_copy(update={"gradient_accumulation_steps": 1}), get_world_size(),
                                    zero_stage=stage)
    config["gradient_clipping"] = 0.0
    _quiet_deepspeed()
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine


class AdaptersDisabled:
    """The policy's engine with its LoRA adapters switched off: the frozen base model, used as the reference
    without a second copy in memory. Call it under `torch.no_grad()`, like a reference engine."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module

    def __call__(self, *args, **kwargs):
        with self.module.disable_adapter():
            return self.engine(*args, **kwargs)


def gather_full_state_dict(engine, dtype: torch.dtype | None = None,
                           only: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (CPU tensors, HF names), None on the other ranks.

    A collective: call it on every rank. Under ZeRO-3 the parameters of one module at a time are gathered
    (`deepspeed.zero.GatheredParameters`), so rank 0 never holds more than the CPU copy and one layer on
    the device. Under ZeRO-2 every rank already holds the full (updated) parameters. Tied parameters (GPT-2's
    `lm_head.weight` and `transformer.wte.weight`) appear under every name, as the same CPU tensor, like
    `model.state_dict()`, so `load_state_dict(strict=True)` and `save_pretrained(state_dict=...)` accept it.
    Non-persistent buffers are left out, as `state_dict()` does. `dtype` casts floating tensors. `only`: the
    names to gather (e.g. LoRA adapters), the others are neither gathered nor returned.
    """
    module = engine.module if hasattr(engine, "module") else engine
    is_rank0 = get_rank() == 0
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    copies: dict[int, torch.Tensor] = {}  # id of the parameter -> its CPU copy (tied weights share it)

    def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to("cpu", copy=True)
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out

    for prefix, submodule in module.named_modules(remove_duplicate=False):
        prefix = f"{prefix}." if prefix else ""
        named = [(name, p) for name, p in submodule.named_parameters(recurse=False)
                 if p is not None and (only is None or only(prefix + name))]
        params = [p for _, p in named]
        # GatheredParameters ignores parameters without ds_id (ZeRO-2, persistent ZeRO-3 parameters)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if is_rank0:
                for name, param in named:
                    if id(param) not in copies:
                        copies[id(param)] = to_cpu(param)
                    state[prefix + name] = copies[id(param)]
        if is_rank0 and only is None:
            for name, buffer in submodule.named_buffers(recurse=False):
                if buffer is not None and name not in submodule._non_persistent_buffers_set:
                    state[prefix + name] = to_cpu(buffer)
    return state if is_rank0 else None


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every step at INFO; keep warnings only."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
