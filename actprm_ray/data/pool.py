"""Where a run's trajectories come from: a Parquet/JSONL file or folder (any pyarrow filesystem URI), or the
embedded synthetic pool written once into the run directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads

from actprm_ray.config import Config


def resolve_pool(cfg: Config, run_dir: Path) -> str:
    """Return the pool path; materialise the synthetic pool (deterministic from its seed) when none is given."""
    if cfg.data.pool:
        return cfg.data.pool
    from actprm_ray.data.synthetic import generate_pool, write_pool

    path = run_dir / f"synthetic_pool_{cfg.data.synthetic_rows}_{cfg.data.synthetic_seed}.parquet"
    if not path.exists():
        write_pool(generate_pool(cfg.data.synthetic_rows, seed=cfg.data.synthetic_seed), path)
    return str(path)


def pool_format(path: str) -> str:
    p = path.rstrip("/")
    if p.endswith((".jsonl", ".json")):
        return "json"
    if p.endswith(".parquet") or Path(p).is_dir():
        return "parquet"
    raise ValueError(f"cannot tell the format of pool {path!r}: use a .parquet/.jsonl file or a folder of .parquet")


def read_pool_ids(path: str, limit: int | None = None) -> list[str]:
    """Only the id column, streamed: the accounting identity needs every id without loading the rows."""
    fmt = pool_format(path)
    if fmt == "json":
        import json

        ids = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    ids.append(str(json.loads(line)["id"]))
                if limit is not None and len(ids) >= limit:
                    break
        return ids
    table = pads.dataset(path, format="parquet").to_table(columns=["id"])
    ids = [str(x) for x in table.column("id").to_pylist()]
    return ids[:limit] if limit is not None else ids


def read_pool_dataset(path: str, *, num_cpus: float, limit: int | None = None, max_retries: int | None = None):
    """The pool as a Ray Dataset; `max_retries` bounds re-runs of a read task whose worker died (None: Ray's)."""
    import ray.data

    remote_args = {} if max_retries is None else {"ray_remote_args": {"max_retries": max_retries}}
    if pool_format(path) == "json":
        ds = ray.data.read_json(path, lines=True, num_cpus=num_cpus, **remote_args)
    else:
        ds = ray.data.read_parquet(path, num_cpus=num_cpus, **remote_args)
    return ds.limit(limit) if limit is not None else ds
