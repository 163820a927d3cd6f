"""Ray itself, for the replicas and the tensor-parallel ranks: a module of its own so the Ray
executor (which `qwenrun.llm` loads) does not import the data-parallel front end (which loads `qwenrun.llm`)."""

from __future__ import annotations

from typing import Any

from qwenrun.errors import QwenrunError

PLACEMENT_TIMEOUT_S = 120.0  # a cluster without the CPUs (or GPUs) asked for never places the bundles


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise QwenrunError("data-parallel replicas and Ray tensor-parallel ranks run on Ray, which is not installed: "
                           "pip install 'qwenrun[distributed]' (ray==2.60.0)") from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (a Ray cluster, "auto" for the one this node is in), or start a local
    cluster; nothing when Ray is already initialised in this process."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 include_dashboard=False, log_to_driver=True)
