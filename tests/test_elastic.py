"""Elastic rollout workers: the pool follows the cluster's nodes and `rlhf-ray scale` while a run goes on."""

import json
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from rlhf_ray.config import load_config
from rlhf_ray.pipeline.scale import scale
from rlhf_ray.pipeline.train import train
from rlhf_ray.rollout.elastic import desired_workers


def test_desired_workers_grows_by_the_free_room_within_min_and_max():
    demand = {"CPU": 1.0, "rollout_node": 1.0}
    # room for min(3 // 1, 1 // 1) = 1 more worker
    assert desired_workers(1, 1, 4, None, {"CPU": 3.0, "rollout_node": 1.0}, demand) == 2
    # room for 5, capped at max 4
    assert desired_workers(1, 1, 4, None, {"CPU": 5.0, "rollout_node": 5.0}, demand) == 4
    # no room: stay, but never below min
    assert desired_workers(1, 2, 4, None, {"CPU": 0.5}, demand) == 2
    # an explicit target from `rlhf-ray scale` wins over both
    assert desired_workers(3, 1, 4, 6, {}, demand) == 6


def pool_sizes(path):
    if not path.exists():
        return []
    return [json.loads(line)["pool/workers"] for line in path.read_text().splitlines()]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def train_in_thread(config, cluster) -> tuple[threading.Thread, dict]:
    """`rlhf-ray train` on `cluster` in a thread; the dict gets its "run_dir", or the "error" it raised."""
    outcome = {}

    def run():
        try:
            outcome["run_dir"] = train(config, address=cluster.address, progress=False)
        except BaseException as err:  # reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_removing_and_adding_a_rollout_node_changes_the_pool_and_the_run_finishes(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    rollout_nodes = [cluster.add_node(num_cpus=1, resources={"rollout_node": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    config = load_config("experiments/quickstart.yaml", [
        f"output_dir={tmp_path}", "name=elastic", "train.iterations=400", "train.checkpoint_every=400",
        "rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=1", "rollout.workers.min=1",
        "rollout.workers.max=2", "rollout.resources={rollout_node: 1}"])
    metrics = tmp_path / "elastic" / "metrics.jsonl"
    thread, outcome = train_in_thread(config, cluster)
    try:
        wait_for(lambda: 2 in pool_sizes(metrics) or "error" in outcome, 300, "the pool to grow to 2 workers")
        assert "error" not in outcome, outcome.get("error")
        seen = len(pool_sizes(metrics))
        cluster.remove_node(rollout_nodes[0])
        wait_for(lambda: 1 in pool_sizes(metrics)[seen:], 120, "the pool to shrink to 1 worker")
        seen = len(pool_sizes(metrics))
        cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
        wait_for(lambda: 2 in pool_sizes(metrics)[seen:], 180, "the pool to grow back to 2 workers")
        status = scale("elastic", 1)  # what `rlhf-ray scale elastic --rollout-workers 1` does
        assert status["target"] == 1
        seen = len(pool_sizes(metrics))
        wait_for(lambda: pool_sizes(metrics)[seen:][-1:] == [1], 60, "the pool to follow the scale target")
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(1, 401))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_scale_of_an_unknown_run_is_a_clear_error():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        with pytest.raises(ValueError, match="no running run named 'nope'"):
            scale("nope", 2)
    finally:
        ray.shutdown()


@pytest.mark.timeout(420)
def test_a_run_over_five_nodes_with_collective_sync_loses_a_rollout_node_and_gets_it_back(tmp_path):
    """A head and four nodes on this machine: two learner ranks (ZeRO-3, partitioned as they load) on the two
    learner nodes and rollout workers on the two rollout nodes, placed by custom resources; weights travel by
    the collective sync. One rollout node goes away during the run (its chunks go to the other) and comes
    back; every iteration trains on its whole batch, and the run finishes."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    [cluster.add_node(num_cpus=1, resources={"learner_node": 1}) for _ in range(2)]
    rollout_nodes = [cluster.add_node(num_cpus=1, resources={"rollout_node": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    iterations = 60
    config = load_config("experiments/quickstart.yaml", [
        f"output_dir={tmp_path}", "name=nodes", f"train.iterations={iterations}", f"train.checkpoint_every={iterations}",
        "rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=1",
        "learner.num_workers=2", "learner.resources={learner_node: 1}", "learner.zero_stage=3",
        "learner.zero3_param_persistence_threshold=0", "rollout.sync=collective", "rollout.sync_timeout_s=60",
        "rollout.workers.min=1", "rollout.workers.max=2", "rollout.resources={rollout_node: 1}"])
    metrics = tmp_path / "nodes" / "metrics.jsonl"
    thread, outcome = train_in_thread(config, cluster)
    try:
        wait_for(lambda: 2 in pool_sizes(metrics) or "error" in outcome, 180, "the pool to grow to 2 workers")
        assert "error" not in outcome, outcome.get("error")
        # placed by the custom resources: both learner nodes hold a rank, both rollout nodes a worker
        free = ray.available_resources()
        assert free.get("learner_node", 0) == 0 and free.get("rollout_node", 0) == 0, free
        seen = len(pool_sizes(metrics))
        cluster.remove_node(rollout_nodes[0])
        wait_for(lambda: 1 in pool_sizes(metrics)[seen:] or "error" in outcome, 120, "the pool to shrink to 1 worker")
        seen = len(pool_sizes(metrics))
        cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
        wait_for(lambda: 2 in pool_sizes(metrics)[seen:] or "error" in outcome, 120, "the pool to grow back to 2")
        thread.join(timeout=240)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
        assert all(r["rollout/episodes"] == 8 for r in rows)  # no sample lost
        assert max(r["perf/sync_s"] for r in rows) < 60
    finally:
        ray.shutdown()
        cluster.shutdown()
