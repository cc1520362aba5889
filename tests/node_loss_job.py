"""Run by tests/test_faults.py in its own process: the active loop on a three-raylet `ray.cluster_utils.Cluster`.

The labeler actors need a (logical) GPU, and only one node has one, so they all run there. That node has no CPU,
so nothing else that needs one (the trainer worker, scorers, tasks) shares it; zero-CPU actors may (the run
coordinator, which then restarts from the ledger). Once the run has labelled a few batches, that node is removed (its raylet and every process on it are SIGKILLed, as on a lost
machine), and a new node with a GPU is added. The loop runs in a thread: `Cluster.add_node` installs a SIGTERM
handler, which Python allows only on the main thread (done from a helper thread it raised, no node came back,
and the run stalled waiting for a GPU). Usage: python tests/node_loss_job.py OUT_JSON OVERRIDE [OVERRIDE ...]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS

LABELLED_BEFORE_REMOVAL = 16
LABELER = "MapWorker(MapBatches(LabelStage))"  # Ray Data's actor class name for the label stage


def actors_by_node() -> dict[str, list[str]]:
    """Live actors per node id (GCS actor table): what the removal takes down with the labeler."""
    from ray._private.state import actors

    out: dict[str, list[str]] = {}
    for a in actors().values():
        if a["State"] == "ALIVE":
            out.setdefault(a["Address"]["NodeID"], []).append(a["ActorClassName"])
    return out


def main(out_json: str, overrides: list[str]) -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray
    from ray.cluster_utils import Cluster

    from actprm_ray.config import load_config
    from actprm_ray.drivers.active import run_active

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1)
    labeler_node = cluster.add_node(num_cpus=0, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": dict(RAY_ENV_DEFAULTS)})
    cfg = load_config(None, overrides)
    events: dict = {"started_at": time.time()}
    result: dict = {}

    def loop() -> None:
        try:
            result["summary"] = run_active(cfg)
        except BaseException as e:  # noqa: BLE001 -- reported by the main thread
            result["error"] = e

    runner = threading.Thread(target=loop, daemon=True)
    runner.start()
    try:
        watch(cluster, labeler_node, cfg.run.name, runner, events)
        runner.join()
    finally:
        events["finished_at"] = time.time()
        if "summary" in result:
            with open(out_json, "w") as f:
                json.dump({"summary": result["summary"], "events": events}, f, default=str)
        ray.shutdown()
        cluster.shutdown()  # every raylet this job started, also when the run failed
    if "error" in result:
        raise result["error"]


def watch(cluster, labeler_node, run_name: str, runner: threading.Thread, events: dict) -> None:
    """On the main thread: remove the labeler's node once enough rows are labelled, add a new one, and note when
    the restarted labeler is alive there."""
    import ray

    from actprm_ray.pipeline.coordinator import get_coordinator

    deadline = time.time() + 600
    while runner.is_alive() and time.time() < deadline:
        try:
            s = ray.get(get_coordinator(run_name).snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 -- not created yet, or restarting
            time.sleep(0.5)
            continue
        if s.get("labelled", 0) >= LABELLED_BEFORE_REMOVAL:
            events["labelled_at_removal"] = s.get("labelled", 0)
            events["removed_node"] = labeler_node.node_id
            events["actors_on_removed_node"] = sorted(actors_by_node().get(labeler_node.node_id, []))
            cluster.remove_node(labeler_node, allow_graceful=False)
            events["removed_at"] = time.time()
            time.sleep(2)
            new = cluster.add_node(num_cpus=0, num_gpus=1)
            events["added_at"] = time.time()
            events["added_node"] = new.node_id
            break
        time.sleep(0.2)
    while runner.is_alive() and "added_node" in events and "labeler_back_at" not in events:
        if LABELER in actors_by_node().get(events["added_node"], []):
            events["labeler_back_at"] = time.time()  # the restarted labeler is alive on the new node
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
