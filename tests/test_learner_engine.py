"""DeepSpeed engines sharded over two Ray Train CPU workers (gloo) take the same step as plain torch.

Every Ray test here runs a real `TorchTrainer` with two workers, real DeepSpeed ZeRO engines and no
mocks; one trainer run per ZeRO stage is shared by the tests of that stage.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.learner import (
    EngineConfig,
    build_deepspeed_config,
    create_engine,
    deepspeed_worker_env,
    disable_dropout,
    make_optimizer,
)
from rlhf_ray.learner.engine import partitioned_load
from rlhf_ray.models import build_tiny_model

MODEL_SEED = 0
# Token ids of the tiny vocabulary (0 = <pad>, 1 = <eos>). Rank 0 takes the first two rows (7 + 2 predicted
# tokens), rank 1 the last two (3 + 5): unequal counts, so a per-rank mean would not be the batch's token mean.
SEQUENCES = [
    [5, 9, 12, 40, 33, 7, 21, 1],
    [14, 44, 1],
    [3, 30, 17, 1],
    [8, 8, 25, 46, 11, 1],
]
NUM_WORKERS = 2
# lr and eps large enough that the update depends on the gradient's size, not only its sign; the
# gradient norm of the tiny model (~4) is above max_grad_norm, so clipping is part of the step.
ENGINE_SETTINGS = dict(lr=1e-2, adam_eps=1e-2, weight_decay=0.1, betas=(0.9, 0.95), max_grad_norm=1.0,
                       micro_batch_size=len(SEQUENCES) // NUM_WORKERS, stage3_param_persistence_threshold=0)


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of SEQUENCES."""
    width = max(len(s) for s in SEQUENCES)
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in SEQUENCES])  # (B, T)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQUENCES])  # (B, T)
    return input_ids, attention_mask


def next_token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per-token negative log-likelihood of each next token, and the mask of the tokens that count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
    return nll, attention_mask[:, 1:].to(nll.dtype)


def one_deepspeed_step_per_worker(config: dict) -> dict:
    """Ray Train worker: this rank's half of the batch, one engine step, the gathered state dict to a file."""
    import ray.train

    from rlhf_ray.learner import (
        create_reference_engine,
        gather_full_state_dict,
        global_token_mean_loss,
    )

    from transformers import AutoModelForCausalLM

    rank = ray.train.get_context().get_world_rank()
    cfg = EngineConfig(**config["engine"])
    with partitioned_load(cfg, train_batch_size=len(SEQUENCES)):  # ZeRO-3: partitioned as it loads
        model = AutoModelForCausalLM.from_pretrained(config["model_path"])
    # what this rank holds once the model is loaded, before DeepSpeed's engine exists
    loaded_numel = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.data.numel() for p in model.parameters())
    engine = create_engine(model, cfg, train_batch_size=len(SEQUENCES))

    input_ids, attention_mask = token_batch()
    rows = slice(rank * cfg.micro_batch_size, (rank + 1) * cfg.micro_batch_size)
    nll, mask = next_token_nll(engine, input_ids[rows], attention_mask[rows])
    engine.backward(global_token_mean_loss(nll, mask))
    engine.step()

    params = list(engine.module.parameters())
    local_numel = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full_numel = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    state = gather_full_state_dict(engine)
    if rank == 0:
        # tensors cannot be a train function's return value in Ray Train V2: hand them over in a file
        torch.save(state, config["state_dict_path"])
    else:
        assert state is None, "gather_full_state_dict must return None off rank 0"

    # the frozen reference (sharded under ZeRO-3) must give the full model's logits
    reference_model, _ = build_tiny_model("gpt2", seed=MODEL_SEED)
    with torch.no_grad():
        expected_logits = reference_model(input_ids=input_ids, attention_mask=attention_mask).logits
        reference = create_reference_engine(reference_model, cfg)
        reference_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits

    return {
        "grad_norm": float(engine.get_global_grad_norm()),
        "optimizer": type(engine.optimizer).__name__,
        "gradient_checkpointing_active": engine.module.is_gradient_checkpointing and engine.module.training,
        "local_numel": local_numel,
        "loaded_numel": loaded_numel,
        "full_numel": full_numel,
        "reference_logits_max_diff": (reference_logits - expected_logits).abs().max().item(),
    }


def plain_torch_step(cfg: EngineConfig) -> tuple[dict[str, torch.Tensor], float]:
    """The same step in one process: loss averaged over all tokens of the full batch."""
    model, _ = build_tiny_model("gpt2", seed=MODEL_SEED)
    optimizer = make_optimizer(model, cfg)
    nll, mask = next_token_nll(model, *token_batch())
    ((nll * mask).sum() / mask.sum()).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return model.state_dict(), grad_norm.item()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=NUM_WORKERS, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def run_stage(ray_cluster, tmp_path_factory):
    """Runs (once per ZeRO stage, cached) the two-worker step: (engine settings, rank 0's report, state dict)."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # the worker function lives in this test module, which Ray workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs = {}
    model_path = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny_model("gpt2", seed=MODEL_SEED)[0].save_pretrained(model_path)

    def run(zero_stage: int):
        if zero_stage not in runs:
            # ZeRO-3 also recomputes activations: checkpointing must not change the step
            cfg = EngineConfig(zero_stage=zero_stage, gradient_checkpointing=zero_stage == 3, **ENGINE_SETTINGS)
            run_dir = tmp_path_factory.mktemp(f"zero{zero_stage}")
            trainer = TorchTrainer(
                one_deepspeed_step_per_worker,
                train_loop_config={"engine": cfg.model_dump(), "state_dict_path": str(run_dir / "state_dict.pt"),
                                   "model_path": str(model_path)},
                scaling_config=ScalingConfig(num_workers=NUM_WORKERS, use_gpu=False),
                torch_config=TorchConfig(backend="gloo"),
                run_config=RunConfig(name="engine", storage_path=str(run_dir / "ray_results"),
                                     worker_runtime_env={"env_vars": deepspeed_worker_env(use_gpu=False)}),
            )
            # a worker's exception arrives as ray.train.WorkerGroupError, whose message holds its traceback
            result = trainer.fit()
            runs[zero_stage] = (cfg, result.return_value, torch.load(run_dir / "state_dict.pt"))
        return runs[zero_stage]

    return run


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def trained(request, run_stage):
    return run_stage(request.param)


@pytest.fixture
def trained_zero3(run_stage):
    return run_stage(3)


def test_one_sharded_step_matches_one_plain_torch_step(trained):
    cfg, report, state = trained
    expected_state, expected_grad_norm = plain_torch_step(cfg)
    assert report["optimizer"] == ("DeepSpeedZeroOptimizer" if cfg.zero_stage == 2 else "DeepSpeedZeroOptimizer_Stage3")
    assert report["gradient_checkpointing_active"] == cfg.gradient_checkpointing
    # the gradient norm before clipping pins the loss normalisation across ranks
    assert report["grad_norm"] == pytest.approx(expected_grad_norm, rel=1e-5)
    assert expected_grad_norm > cfg.max_grad_norm, "the step should clip"
    assert set(state) == set(expected_state)
    for name, expected in expected_state.items():
        torch.testing.assert_close(state[name], expected, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    untouched, _ = build_tiny_model("gpt2", seed=MODEL_SEED)
    moved = (state["transformer.wte.weight"] - untouched.state_dict()["transformer.wte.weight"]).abs().max()
    assert moved > 1e-3, "the step should have changed the weights"


def test_frozen_reference_gives_the_full_models_logits(trained):
    _, report, _ = trained
    assert report["reference_logits_max_diff"] < 1e-5


def test_zero3_partitions_every_parameter_across_the_ranks(trained_zero3):
    _, report, _ = trained_zero3
    # each rank holds its 1/NUM_WORKERS of every parameter (partitions are padded to equal sizes), from the
    # moment the model is loaded (`partitioned_load`): no rank ever holds the whole model
    assert report["local_numel"] <= 0.55 * report["full_numel"]
    assert report["loaded_numel"] <= 0.55 * report["full_numel"]


def test_zero2_loads_the_whole_model_on_every_rank(run_stage):
    _, report, _ = run_stage(2)
    assert report["loaded_numel"] == report["full_numel"]


def test_zero3_gathered_state_dict_loads_strictly_into_a_fresh_hf_model(trained_zero3, tmp_path):
    _, _, state = trained_zero3
    assert all(t.device.type == "cpu" for t in state.values())
    assert state["lm_head.weight"] is state["transformer.wte.weight"], "tied weights stay one tensor"
    fresh, tokenizer = build_tiny_model("gpt2", seed=MODEL_SEED + 1)
    fresh.load_state_dict(state, strict=True)
    fresh.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], atol=0, rtol=0)


def test_deepspeed_config_derives_accumulation_from_the_train_batch_size():
    config = build_deepspeed_config(EngineConfig(micro_batch_size=2, zero_stage=3), world_size=4, train_batch_size=32)
    assert config["train_batch_size"] == 32
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_allow_untested_optimizer"] is True


def test_deepspeed_config_rejects_a_batch_that_does_not_split_over_ranks():
    with pytest.raises(ValueError, match="multiple of micro_batch_size 2 x world_size 4"):
        build_deepspeed_config(EngineConfig(micro_batch_size=2), world_size=4, train_batch_size=12)


def test_engine_config_rejects_unknown_fields_and_stages():
    with pytest.raises(ValueError, match="learning_rate"):
        EngineConfig(learning_rate=1e-5)
    with pytest.raises(ValueError, match="zero_stage"):
        EngineConfig(zero_stage=1)


def test_create_engine_outside_a_process_group_says_where_to_run():
    model, _ = build_tiny_model("gpt2", seed=MODEL_SEED)
    with pytest.raises(RuntimeError, match="Ray Train worker"):
        create_engine(model, EngineConfig())


def test_disable_dropout_makes_train_mode_forward_passes_deterministic():
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    input_ids, attention_mask = token_batch()
    for config in (GPT2Config(vocab_size=54, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5,
                              attn_pdrop=0.5),
                   LlamaConfig(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)):
        model = disable_dropout(AutoModelForCausalLM.from_config(config)).train()
        first, second = (model(input_ids=input_ids, attention_mask=attention_mask).logits for _ in range(2))
        torch.testing.assert_close(first, second, atol=0, rtol=0, msg=f"{config.model_type} still drops out")
