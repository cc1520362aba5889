"""Process fault injection shared by tests/test_faults.py and benchmarks/soak.py: SIGKILL this Ray cluster's actor
processes by title, once the run's coordinator says the run got far enough (`kill_when`)."""

from __future__ import annotations

import os
import signal
import time


def actor_processes(title: str, root_pid: int | None = None) -> list:
    """This cluster's actor processes whose Ray title contains `title`.

    Ray titles an actor's process after the actor's repr (`ray::MapWorker(MapBatches(ScoreStage))`,
    `ray::RayTrainWorker`). A local cluster's processes descend from its driver, so searching below root_pid
    (default: this process) leaves other clusters on the same machine alone."""
    import psutil

    found = []
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") and title in cmd:
            found.append(p)
    return found


def kill_actor_processes(title: str, root_pid: int | None = None) -> list[int]:
    """SIGKILL (a real crash, no clean-up) every matching actor process; returns their pids."""
    killed = []
    for p in actor_processes(title, root_pid):
        try:
            os.kill(p.pid, signal.SIGKILL)
            killed.append(p.pid)
        except ProcessLookupError:
            pass
    return killed


def kill_when(coordinator_name: str, ready, title: str, killed: list, timeout_s: float = 600.0) -> None:
    """Poll the run's coordinator; once ready(snapshot) holds, kill the actors titled `title` (into `killed`)."""
    import ray

    deadline = time.time() + timeout_s
    pending = None  # one snapshot call at a time: on a loaded machine timed-out calls would pile up in its queue
    while time.time() < deadline:
        try:
            if pending is None:
                pending = ray.get_actor(coordinator_name, namespace="actprm").snapshot.remote()
            done, _ = ray.wait([pending], timeout=5)
            if not done:
                continue
            snapshot, pending = ray.get(pending), None
        except Exception:  # noqa: BLE001 -- the run has not created its coordinator yet (or it restarted)
            pending = None
            time.sleep(0.5)
            continue
        if ready(snapshot):
            killed.extend(kill_actor_processes(title))
            if killed:
                return
        time.sleep(0.2)
