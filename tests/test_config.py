"""The run configuration: YAML + dotted overrides, and errors that name the key."""

import subprocess
import sys

import pytest

from rlhf_ray.config import ConfigError, dump_config, load_config


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "name: demo\nrollout:\n  batch_size: 8\n  sampling: {temperature: 0.7}\n")
    config = load_config(path, ["rollout.batch_size=64", "rollout.sampling.top_k=5", "data.prompts=[a b, c]"])
    assert config.name == "demo"
    assert config.rollout.batch_size == 64
    assert config.rollout.sampling.temperature == 0.7
    assert config.rollout.sampling.top_k == 5
    assert config.data.prompts == ["a b", "c"]


def test_unknown_key_is_named_with_the_near_miss(tmp_path):
    path = write(tmp_path, "rollout:\n  bach_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.bach_size'; did you mean 'rollout.batch_size'"):
        load_config(path)


def test_unknown_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.sampling.temprature'.*'rollout.sampling.temperature'"):
        load_config(None, ["rollout.sampling.temprature=0.5"])


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"'rollout.batch_size': .*integer.*'many'"):
        load_config(None, ["rollout.batch_size=many"])


def test_out_of_range_value_names_the_key():
    with pytest.raises(ConfigError, match=r"'rollout.sampling.temperature': .*greater than 0"):
        load_config(None, ["rollout.sampling.temperature=0"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match=r"override 'rollout.batch_size' is not of the form"):
        load_config(None, ["rollout.batch_size"])


def test_override_into_a_value_is_rejected(tmp_path):
    path = write(tmp_path, "seed: 3\n")
    with pytest.raises(ConfigError, match=r"'seed' is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_dumped_config_loads_back_equal(tmp_path):
    config = load_config(None, ["name=x", "rollout.workers.max=4"])
    path = write(tmp_path, dump_config(config))
    assert load_config(path) == config


def test_cli_config_error_exits_2_naming_the_key(tmp_path):
    path = write(tmp_path, "rollout:\n  batch_size: 8\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "config", str(path), "rollout.batch_sise=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key 'rollout.batch_sise'" in proc.stderr
    assert "did you mean 'rollout.batch_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_critic_free_choices_are_checked_together(tmp_path):
    path = write(tmp_path, "name: x\n")
    config = load_config(path, ["ppo.advantage_estimator=dr_grpo", "ppo.group_size=4", "rollout.batch_size=8",
                                "ppo.loss_aggregation=seq-mean-token-sum-norm", "ppo.clip_eps_high=0.28"])
    assert config.ppo.advantage_estimator == "dr_grpo" and config.ppo.clip_eps_high == 0.28
    with pytest.raises(ConfigError, match="needs group_size >= 2"):
        load_config(path, ["ppo.advantage_estimator=dr_grpo"])
    with pytest.raises(ConfigError, match="gspo.*needs a group estimator"):
        load_config(path, ["ppo.policy_loss=gspo"])
    with pytest.raises(ConfigError, match="rollout.overlap false"):
        load_config(path, ["ppo.policy_loss=gspo", "ppo.advantage_estimator=rloo", "ppo.group_size=2",
                           "rollout.overlap=true"])
    with pytest.raises(ConfigError, match="loss_aggregation"):
        load_config(path, ["ppo.loss_aggregation=sum"])
    with pytest.raises(ConfigError, match="dynamic_sampling.*needs a group estimator"):
        load_config(path, ["ppo.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match=r"ppo.overlong_buffer \(20\) must not exceed rollout.max_new_tokens \(16\)"):
        load_config(path, ["ppo.overlong_buffer=20"])


def test_each_estimator_takes_its_papers_defaults_unless_the_config_sets_them(tmp_path):
    path = write(tmp_path, "name: x\nrollout:\n  batch_size: 8\nppo:\n  group_size: 4\n")
    ppo = load_config(path).ppo  # gae: Ziegler et al.'s whitened advantages, KL in the reward
    assert (ppo.whiten_advantages, ppo.loss_aggregation, ppo.kl.in_reward, ppo.kl.estimator) == (
        True, "token-mean", True, "k1")
    ppo = load_config(path, ["ppo.advantage_estimator=grpo"]).ppo  # GRPO: k3 KL as a loss, 1/G sum 1/|o| sum_t
    assert (ppo.whiten_advantages, ppo.loss_aggregation, ppo.kl.in_reward, ppo.kl.estimator) == (
        False, "seq-mean-token-mean", False, "k3")
    assert load_config(path, ["ppo.advantage_estimator=dr_grpo"]).ppo.loss_aggregation == "seq-mean-token-sum-norm"
    assert not load_config(path, ["ppo.advantage_estimator=reinforce_pp"]).ppo.whiten_advantages
    ppo = load_config(path, ["ppo.advantage_estimator=grpo", "ppo.whiten_advantages=true", "ppo.kl.in_reward=true",
                             "ppo.loss_aggregation=token-mean"]).ppo  # what the config sets stays
    assert (ppo.whiten_advantages, ppo.loss_aggregation, ppo.kl.in_reward, ppo.kl.estimator) == (
        True, "token-mean", True, "k3")


def test_evaluating_during_training_needs_held_out_prompts(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match="train.eval_every.*set data.eval_dataset"):
        load_config(path, ["train.eval_every=5"])
