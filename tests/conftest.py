"""Shared fixtures. Keep this file small: only fixtures that several test files need."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """The offline tiny Qwen2-architecture backbone + BPE tokenizer (built once per session, ~3 s)."""
    from actprm_ray.model.tiny import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_prm(tiny_backbone_dir):
    """An 8-head EnsemblePRM on the tiny backbone. Shared: tests must not modify it (load a fresh one instead)."""
    from actprm_ray.model.ensemble_prm import EnsemblePRM, PRMConfig

    model = EnsemblePRM.from_backbone(tiny_backbone_dir, PRMConfig(n_heads=8, init_seed=0))
    return model.eval()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance per session (STACK_NOTES §9), with the no-progress timeout armed."""
    import ray

    from actprm_ray.pipeline.ray_env import init_ray

    init_ray(num_cpus=2, no_progress_timeout_s=120)
    yield ray
    ray.shutdown()
