"""Connecting to Ray the same way from a laptop, a `ray start --head` cluster, and `ray job submit`."""

from __future__ import annotations

import logging
import os
import sys

# Measured on these machines (STACK_NOTES §4): without these, Ray binds a non-loopback address, writes an auth
# token that later breaks `ray job submit`, and phones home. Every Ray process needs them, so set them before
# Ray starts (a local instance inherits the driver's environment).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray kills a task worker that has been idle for this long whenever the node has more idle workers than free
    # CPUs (default 1 s). Stage actors hold fractional CPUs, so on a small node that is the normal state, and Ray
    # Data's short read/select tasks then keep starting fresh workers that spend seconds importing: the 1M-row
    # filter (B2) started 645 workers and dropped from 167 to ~131 rows/s at minute 11. benchmarks/worker_churn.py.
    "RAY_idle_worker_killing_time_threshold_ms": "60000",
}


NO_STATE_API = "http://127.0.0.1:1"  # a closed port: see init_ray


def init_ray(*, num_cpus: int | None = None, no_progress_timeout_s: float = 60.0,
             object_store_limit_mb: int | None = 100, block_size_kb: int | None = 256) -> None:
    """Attach to RAY_ADDRESS when set (job submit, a running cluster), else start a local instance."""
    attach = bool(os.environ.get("RAY_ADDRESS"))
    for k, v in RAY_ENV_DEFAULTS.items():
        # The loopback switch is for a single-machine instance only: on a multi-node cluster it would pin the
        # driver to 127.0.0.1, unreachable from the other nodes.
        if not (attach and k == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            os.environ.setdefault(k, v)
    quiet = not sys.stdout.isatty()
    if quiet:  # a log file (job logs, CI): progress bars redraw into thousands of lines; our status line stays
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also switches off transformers' bars
    import ray
    import ray.data

    if not ray.is_initialized():
        if attach:
            # A submitted job already carries its runtime env (working_dir); passing another would replace it.
            ray.init()
        else:
            env = {k: os.environ[k] for k in (*RAY_ENV_DEFAULTS, "HF_HUB_DISABLE_PROGRESS_BARS") if k in os.environ}
            # No dashboard here, so no state API. Ray Train's PlacementGroupCleaner asks the state API whether our
            # Train controller is alive; left to find one, it reaches any dashboard on this machine (a user's
            # `ray start --head`, 127.0.0.1:8265), which does not know our controller, so "dead", and it removes
            # our training's placement group: seen here killing a run while another cluster ran beside it.
            # Pointing it at a closed port makes every lookup "unavailable", on which it just keeps waiting.
            env["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
            runtime_env = {"env_vars": env, "worker_process_setup_hook": "actprm_ray.pipeline.ray_env.quiet_workers"}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    ctx = ray.data.DataContext.get_current()
    if quiet:
        ctx.enable_progress_bars = False
    # Ray 2.60's V2 file reader adds a ListFiles task that always asks for 1 whole CPU; next to a 1-CPU trainer
    # and the stage actors that deadlocks a 2-core node. The V1 reader honours our fractional num_cpus.
    ctx.use_datasource_v2 = False
    # A column Arrow cannot hold is an error, not a silent per-block pickle (slow, and a warning per stage):
    # the stages hand every column over in an Arrow-native form (stages.arrow_lists).
    ctx.enable_fallback_to_arrow_object_ext_type = False
    # A resource deadlock becomes an ExecutionTimeoutError after this long instead of a 30-minute silent hang.
    ctx.execution_no_progress_timeout_s = no_progress_timeout_s
    if block_size_kb:
        # Backpressure acts per block: with the default 128 MB blocks a whole small pool is one block and runs
        # ahead of the trainer in one piece. Small blocks make the byte budget bite at row granularity.
        ctx.target_max_block_size = block_size_kb * 1024
    if object_store_limit_mb:
        # The budget that bounds rows in flight between Score and Train (and so staleness); Train inherits it.
        opts = ctx.execution_options
        opts.resource_limits = opts.resource_limits.copy(object_store_memory=object_store_limit_mb * 2**20)


def quiet_workers() -> None:
    """Worker set-up hook of the local instance. It runs without the dashboard (its processes would compete for
    2 cores), so the state API is absent, and Ray Train's detached PlacementGroupCleaner, which polls it to
    notice a dead Train controller, warns every few seconds for the whole run. Its job (removing a dead
    controller's placement group) is done here by the driver's `ray.shutdown()`, which ends the instance."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
