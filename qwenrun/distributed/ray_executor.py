"""Tensor-parallel ranks as Ray actors (`--distributed-executor-backend ray`), across hosts.

The protocol is `qwenrun.distributed.executor`'s, unchanged: the driver (this process, rank 0)
schedules and runs its own shard; ranks 1..N-1 are `RayRankWorker` actors, each holding an
`executor.Worker` and taking the driver's messages in order (Ray runs one caller's tasks on an
actor with one thread in submission order), without replies; the collectives inside each forward keep
the ranks in step (gloo on CPU, NCCL on CUDA, rendezvous at the driver's node address).

Placement: one placement group for the workers, a bundle per rank (`num_cpus` CPUs each, plus a
GPU on CUDA: Ray shows the actor that one GPU, its cuda:0), PACK so a small model stays on one
node when it fits and spreads when it must; a CPU rank's torch threads are its bundle's CPUs, an
even share of the cluster's. NCCL over Ray is not run here (no GPU pair).

Failure: `check` looks at the answers of the messages sent so far: a rank whose actor died or whose
`handle` raised fails every later step with `WorkerDiedError` (the engine fails the requests; the
model cannot run again until it is rebuilt), as a dead process does under `MultiprocExecutor`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import torch

from qwenrun.distributed.executor import (
    READY_TIMEOUT_S,
    Executor,
    TensorParallelModel,
    Worker,
    WorkerConfig,
    WorkerDiedError,
    start_tensor_parallel,
)
from qwenrun.distributed.ray_cluster import PLACEMENT_TIMEOUT_S, init_ray, ray_module as _ray
from qwenrun.errors import QwenrunError
from qwenrun.quant import Quantization


class RayRankWorker:
    """The actor's class: one rank's `Worker` (built in the constructor: joins the group, loads
    its shard)."""

    def __init__(self, config: WorkerConfig, rank: int) -> None:
        self.worker = Worker(config, rank)

    def ready(self) -> bool:
        return True

    def handle(self, msg: Any) -> bool:
        return self.worker.handle(msg)


class RayExecutor(Executor):
    """Ranks 1..world-1 as `RayRankWorker` actors in one placement group (module docstring)."""

    def __init__(self, config: WorkerConfig) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cuda = config.device == "cuda"
        num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // config.world)  # an even share each
        if not cuda:
            config = dataclasses.replace(config, threads=num_cpus)  # torch's threads: the bundle's CPUs
        bundle = {"CPU": num_cpus, **({"GPU": 1} if cuda else {})}
        self.group = placement_group([bundle] * (config.world - 1), strategy="PACK",
                                     name=f"qwenrun-tp-{uuid.uuid4().hex[:12]}")
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise QwenrunError(f"the Ray cluster could not place {config.world - 1} tensor-parallel ranks of "
                               f"{bundle} in {PLACEMENT_TIMEOUT_S:.0f} s (it has {ray.cluster_resources()})")
        actor = ray.remote(RayRankWorker)
        self.workers = [actor.options(
            num_cpus=num_cpus, num_gpus=1 if cuda else 0, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank - 1),
        ).remote(config, rank) for rank in range(1, config.world)]
        self._ready = [w.ready.remote() for w in self.workers]
        self._pending: list[tuple[int, Any]] = []  # (rank, answer of a message not yet looked at)
        self._dead: str | None = None

    def check_started(self) -> None:
        ray = _ray()
        done, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
        for rank, ref in enumerate(self._ready, start=1):
            if ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise QwenrunError(f"tensor-parallel rank {rank} failed to start: {e}") from None

    def wait_ready(self) -> None:
        ray = _ray()
        try:
            ray.get(self._ready, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise QwenrunError(f"the tensor-parallel ranks did not load their shards in "
                               f"{READY_TIMEOUT_S:.0f} s") from None
        except ray.exceptions.RayError as e:
            raise QwenrunError(f"a tensor-parallel rank failed to start: {e}") from None

    def send(self, msg: Any) -> None:
        self.check()
        ray = _ray()
        ref = ray.put(msg)  # pickled once for every rank
        self._pending += [(rank, w.handle.remote(ref)) for rank, w in enumerate(self.workers, start=1)]

    def check(self) -> None:
        ray = _ray()
        if self._dead is None and self._pending:
            refs = [ref for _, ref in self._pending]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            finished = set(done)
            for rank, ref in self._pending:
                if ref in finished:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        self._dead = f"tensor-parallel rank {rank} failed ({type(e).__name__}: {e})"
                        break
            self._pending = [(rank, ref) for rank, ref in self._pending if ref not in finished]
        if self._dead is not None:
            raise WorkerDiedError(f"{self._dead}; the model cannot run (restart the engine)")

    def close(self) -> None:
        ray = _ray()
        # with Ray already shut down (at exit) its actors went with it, and a call would start a new cluster
        if self.workers and ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            for w in self.workers:
                try:
                    ray.kill(w)
                except ray.exceptions.RayError:
                    pass  # the cluster went first
            try:
                remove_placement_group(self.group)
            except ray.exceptions.RayError:
                pass
        self.workers, self._pending = [], []
        self._dead = self._dead or "the tensor-parallel workers were stopped"


def start_tensor_parallel_ray(path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, world: int,
                              expert_parallel: bool, quantization: Quantization | None,
                              ray_address: str | None = None) -> TensorParallelModel:
    """`executor.start_tensor_parallel` with ranks 1..world-1 as Ray actors (joining `ray_address`,
    else a local cluster), reaching the rendezvous at this node's address."""
    ray = _ray()
    init_ray(ray_address)
    return start_tensor_parallel(path, dtype, device, world, expert_parallel, quantization,
                                 executor_class=RayExecutor, host=ray.util.get_node_ip_address())
