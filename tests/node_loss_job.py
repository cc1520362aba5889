"""Run by tests/test_faults.py in its own process: the active loop on a three-raylet `ray.cluster_utils.Cluster`.

The labeler actors need a (logical) GPU, and only one node has one, so they all run there. Once the run has
labelled a few batches, that node is removed (its raylet and every process on it die, as on a lost machine),
and a new node with a GPU is added. Usage: python tests/node_loss_job.py OUT_JSON OVERRIDE [OVERRIDE ...]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from actprm_ray.pipeline.ray_env import RAY_ENV_DEFAULTS


def main(out_json: str, overrides: list[str]) -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray
    from ray.cluster_utils import Cluster

    from actprm_ray.config import load_config
    from actprm_ray.pipeline.active import run_active
    from actprm_ray.pipeline.coordinator import get_coordinator

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1)
    labeler_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": dict(RAY_ENV_DEFAULTS)})
    cfg = load_config(None, overrides)
    events: dict = {}

    def remove_labeler_node() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                s = ray.get(get_coordinator(cfg.run.name).snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 -- not created yet, or restarting
                time.sleep(0.5)
                continue
            if s.get("labelled", 0) >= 16:
                events["labelled_at_removal"] = s.get("labelled", 0)
                cluster.remove_node(labeler_node, allow_graceful=False)
                events["removed_at"] = time.time()
                time.sleep(2)
                cluster.add_node(num_cpus=1, num_gpus=1)
                events["added_at"] = time.time()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=remove_labeler_node, daemon=True)
    killer.start()
    summary = run_active(cfg)
    killer.join(timeout=1)
    with open(out_json, "w") as f:
        json.dump({"summary": summary, "events": events}, f, default=str)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
