"""Tensor parallelism across processes: the driver (rank 0) schedules, every rank runs the forward.

The protocol, which another executor (Ray: one actor per rank) reuses as it is:

- `WorkerConfig` says what every rank loads (picklable, sent once). `Worker(config, rank)` builds a
  rank: it joins the process group (`connect`), loads its shard of the model straight from the
  checkpoint (`load_model(..., tp=...)`) and waits for messages.
- The driver sends each rank the same messages, in order; `Worker.handle(msg)` runs one and says
  whether to go on. `CacheLayout` (once, after the engine has sized its cache): allocate the same
  blocks and state slots; `Step` (every forward): the `ForwardBatch` without cache views, on the
  CPU (the worker moves it to its device and puts its own views in), after replaying the state-slot
  copies the driver's cache made since the last step; `STOP`. No reply: the collectives inside the
  forward keep the ranks in step, and every rank computes the logits rows (the vocabulary-parallel
  LM head gathers them), of which rank 0 samples.
- `Executor` is the driver's side: `send(msg)` to every worker, `check()` raises `WorkerDiedError`
  when one has gone, `close()`. `MultiprocExecutor` runs the workers as local processes
  (torch.multiprocessing, spawn); a Ray executor gives the same three methods over actors and
  calls `Worker.handle` in each.
- `TensorParallelModel` is what the engine runs on the driver: the rank-0 shard behind the engine's
  model contract (`forward`, `compute_logits`, `cache_specs`), sending each step to the workers
  before running its own part.

Failure: a worker that dies (or raises) closes its connections; the driver's next collective or
send raises, and so does every later step (`check`), so the engine fails its requests with
`WorkerDiedError` instead of waiting; the process group's timeout bounds any other wait. A step that
fails on rank 0 part-way stops the workers too (they may wait inside one of its collectives, which
no later step could pair with). Workers die with the driver (PR_SET_PDEATHSIG, and the end of their
message pipe).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwenrun.errors import QwenrunError, RequestFailedError
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.parallel import TensorParallel
from qwenrun.quant import Quantization

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(seconds=120)  # the longest a collective waits for a silent rank
READY_TIMEOUT_S = 600.0  # a worker's start: imports, its shard's load, the C++ kernels' first build


class WorkerDiedError(RequestFailedError):
    """A tensor-parallel rank has gone: the model cannot run until the engine is rebuilt."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a rank needs to build its shard; the same for every rank."""

    model: str  # the checkpoint folder (already resolved by the driver)
    dtype: torch.dtype
    device: str  # "cpu" or "cuda" (`device_of`)
    world: int
    expert_parallel: bool
    quantization: Quantization | None
    store_host: str
    store_port: int
    threads: int = 0  # torch threads per worker rank (0: leave torch's default)

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def device_of(self, rank: int) -> torch.device:
        """cuda:rank, or cuda:0 in a process that sees one GPU (a Ray actor given its own)."""
        if self.device != "cuda":
            return torch.device("cpu")
        return torch.device("cuda", rank if torch.cuda.device_count() > 1 else 0)


@dataclass(frozen=True)
class CacheLayout:
    """The driver's cache, which each rank allocates for its heads: the specs are the rank's own
    (every rank has the same), the counts the driver's plan."""

    specs: list
    num_blocks: int
    block_size: int
    num_state_slots: int


@dataclass(frozen=True)
class Step:
    batch: ForwardBatch  # caches None, tensors on the CPU
    cached: bool  # whether the step reads and writes the cache (a teacher-forced score does too)
    state_copies: list[tuple[int, int]]  # (src, dst) state-slot copies to replay first


STOP = "stop"


def connect(config: WorkerConfig, rank: int) -> TensorParallel:
    """Join the ranks' process group (rank 0 hosts the rendezvous store) and return the rank's view."""
    if config.device == "cuda":
        torch.cuda.set_device(config.device_of(rank))
    store = dist.TCPStore(config.store_host, config.store_port, config.world, rank == 0, timeout=GROUP_TIMEOUT)
    if config.backend == "nccl":
        group = dist.ProcessGroupNCCL(store, rank, config.world)
    else:
        group = dist.ProcessGroupGloo(store, rank, config.world, GROUP_TIMEOUT)
    return TensorParallel(rank, config.world, group, config.expert_parallel)


def load_shard(config: WorkerConfig, tp: TensorParallel) -> nn.Module:
    """The rank's shard, quantized and packed as `LLM` prepares a single-process model."""
    from qwenrun.quant.linear import prepare_cpu_weights
    from qwenrun.loading.loader import load_model, open_checkpoint

    device = config.device_of(tp.rank)
    model = load_model(open_checkpoint(config.model), config.dtype, device, quantization=config.quantization, tp=tp)
    return prepare_cpu_weights(model, config.dtype, device)


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside it (dataclass fields, lists, tuples, dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


class Worker:
    """One rank other than the driver: its shard, its cache, and the messages' handler."""

    def __init__(self, config: WorkerConfig, rank: int) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config, self.device = config, config.device_of(rank)
        self.tp = connect(config, rank)
        self.model = load_shard(config, self.tp)
        self.layers: list | None = None
        self.state = None

    @torch.inference_mode()
    def handle(self, msg: Any) -> bool:
        """Run one message; False after `STOP`."""
        if isinstance(msg, Step):
            for src, dst in msg.state_copies:
                self.state.copy(src, dst)  # type: ignore[union-attr]
            batch = dataclasses.replace(move(msg.batch, self.device), caches=self.layers if msg.cached else None)
            hidden = self.model(batch)
            if batch.logits_rows.numel():
                self.model.compute_logits(hidden[batch.logits_rows])  # this rank's part of the gather
            return True
        if isinstance(msg, CacheLayout):
            from qwenrun.engine.cache import CacheManager

            cache = CacheManager(msg.specs, msg.num_blocks, msg.block_size, self.device, False, msg.num_state_slots)
            self.layers, self.state = cache.layers, cache.state
            return True
        if msg == STOP:
            return False
        raise ValueError(f"unknown message {type(msg).__name__}")


class Executor(ABC):
    """The driver's side of the workers (see the module docstring). `start_tensor_parallel` makes
    one with `executor_class(config)`, which starts ranks 1..N-1 (each runs `Worker(config, rank)`,
    then `handle` on every message), then joins the group as rank 0 through `join_group` and loads
    its own shard while the workers load theirs, then calls `wait_ready`."""

    tp: TensorParallel  # rank 0's view of the group

    def join_group(self, make: Callable[[], Any]) -> Any:
        """Rank 0's side of the rendezvous (`make()`, which blocks until every rank has joined),
        run on a thread while `check_started` is polled: a worker that fails to start gives up the
        wait at once instead of at the group's timeout."""
        result: list[Any] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                result.append(make())
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                failure.append(e)

        thread = threading.Thread(target=run, daemon=True, name="qwenrun-tp-rendezvous")
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            self.check_started()
        if failure:
            raise failure[0]
        return result[0]

    def check_started(self) -> None:
        """QwenrunError naming a worker that has failed before joining the group."""

    @abstractmethod
    def wait_ready(self) -> None:
        """Return once every worker has loaded its shard; QwenrunError with its error otherwise."""

    @abstractmethod
    def send(self, msg: Any) -> None:
        """Give every worker `msg`; WorkerDiedError when one cannot take it."""

    @abstractmethod
    def check(self) -> None:
        """WorkerDiedError when a worker has gone."""

    @abstractmethod
    def close(self) -> None:
        """Stop the workers (idempotent)."""


def _die_with_parent() -> None:
    """SIGKILL this process when the process that started it exits (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(config: WorkerConfig, rank: int, conn: Connection) -> None:
    _die_with_parent()
    try:
        worker = Worker(config, rank)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ready", None))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:  # the driver has gone
            return
        if not worker.handle(msg):
            return


def _last_words(conn: Connection) -> str | None:
    """The error a worker sent before it exited, if any."""
    try:
        return conn.recv()[1] if conn.poll() else None
    except (EOFError, OSError):
        return None


class MultiprocExecutor(Executor):
    """Ranks 1..N-1 as processes on this host (torch.multiprocessing, spawn); rank 0 is the caller,
    which joins the group once they are started and loads its shard while they load theirs
    (`wait_ready`)."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.config = config
        self.procs, self.conns = [], []
        for rank in range(1, config.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(config, rank, child), daemon=True,
                               name=f"qwenrun-tp-rank{rank}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._dead: str | None = None

    def check_started(self) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if not proc.is_alive():
                detail = _last_words(conn) or f"exit code {proc.exitcode}"
                raise QwenrunError(f"tensor-parallel rank {rank} exited before joining the group: {detail}"
                                   "\n(a script that starts tensor-parallel ranks needs an "
                                   "`if __name__ == '__main__':` guard: the ranks are spawned and import it)")

    def wait_ready(self) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            if not conn.poll(READY_TIMEOUT_S):
                self.close()
                raise QwenrunError(f"tensor-parallel rank {rank} did not load its shard in {READY_TIMEOUT_S:.0f} s")
            try:
                kind, detail = conn.recv()
            except EOFError:
                kind, detail = "error", f"the process exited with code {proc.exitcode}"
            if kind != "ready":
                self.close()
                raise QwenrunError(f"tensor-parallel rank {rank} failed to start:\n{detail}")

    def send(self, msg: Any) -> None:
        self.check()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                self._dead = f"tensor-parallel rank {rank} is gone ({e})"
                raise WorkerDiedError(self._dead) from None

    def check(self) -> None:
        if self._dead is None:
            for rank, proc in enumerate(self.procs, start=1):
                if not proc.is_alive():
                    self._dead = f"tensor-parallel rank {rank} exited (code {proc.exitcode})"
                    break
        if self._dead is not None:
            raise WorkerDiedError(f"{self._dead}; the model cannot run (restart the engine)")

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(STOP))
            except OSError:
                pass
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)  # an idle worker exits at STOP; one stuck in a collective is killed
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []
        self._dead = self._dead or "the tensor-parallel workers were stopped"


class TensorParallelModel(nn.Module):
    """Rank 0's shard as the engine's model: each `forward` first goes to every worker (`Step`),
    then runs here; the logits rows are computed in the same call on every rank (the LM head's
    gather is a collective, so no rank may skip it), and `compute_logits` returns them."""

    def __init__(self, model: nn.Module, executor: Executor) -> None:
        super().__init__()
        self.model_shard = model
        self.executor = executor
        self.config = getattr(model, "config", None)
        self._logits: torch.Tensor | None = None
        self._state = None

    def cache_specs(self, dtype: torch.dtype) -> list:
        return self.model_shard.cache_specs(dtype)

    def bind_cache(self, cache: Any) -> None:
        """Workers allocate the same cache as the engine's `CacheManager`; its state-slot copies
        are recorded for them from now on."""
        self.executor.send(CacheLayout(list(cache.specs), cache.kv.num_blocks, cache.block_size,
                                       cache.state.num_slots if cache.state is not None else 0))
        if cache.state is not None:
            cache.state.copies = []
            self._state = cache.state

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        copies = []
        if self._state is not None:
            copies, self._state.copies = self._state.copies, []
        self.executor.send(Step(move(dataclasses.replace(batch, caches=None), torch.device("cpu")),
                                batch.caches is not None, copies))
        try:
            hidden = self.model_shard(batch)
            rows = batch.logits_rows
            self._logits = self.model_shard.compute_logits(hidden[rows]) if rows.numel() else None
        except BaseException as e:
            # a collective whose peer has gone, or rank 0 failing part-way: the workers may be
            # inside a collective of this step, so no later step could pair with theirs
            self.executor.check()
            self.executor.close()
            raise WorkerDiedError(f"tensor-parallel step failed on rank 0 ({type(e).__name__}: {e}); the ranks "
                                  "are out of step and were stopped (restart the engine)") from e
        return hidden

    @property
    def healthy(self) -> bool:
        """False once a rank has gone: no later step can run, so /health must stop saying ok
        (an orchestrator restarts the server) while the API still answers each request clearly."""
        try:
            self.executor.check()
        except WorkerDiedError:
            return False
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the last forward's logits rows (`hidden` is those rows' hidden states)."""
        logits, self._logits = self._logits, None
        if logits is None or logits.shape[0] != hidden.shape[0]:
            raise RuntimeError("a tensor-parallel model gives logits only for its last forward's logits rows")
        return logits


def start_tensor_parallel(path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, world: int,
                          expert_parallel: bool, quantization: Quantization | None,
                          executor_class: Callable[[WorkerConfig], Executor] = MultiprocExecutor,
                          host: str = "127.0.0.1") -> TensorParallelModel:
    """Start ranks 1..world-1 (`executor_class`: local processes by default), load rank 0's shard
    here, and return the engine's model; call `bind_cache` once the engine has its cache. `host`:
    the address of this process that the ranks reach its rendezvous store at (another host's
    ranks need this host's address)."""
    from qwenrun.loading.loader import load_model, open_checkpoint

    if executor_class is MultiprocExecutor and device.type == "cuda" and torch.cuda.device_count() < world:
        raise QwenrunError(f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} visible")
    if device.type == "cuda" and device.index not in (None, 0):
        raise QwenrunError(f"tensor-parallel rank r runs on cuda:r; rank 0 (this process) cannot use {device}")
    store = dist.TCPStore(host, 0, world, True, timeout=GROUP_TIMEOUT, wait_for_workers=False)
    threads = max(1, torch.get_num_threads() // world) if device.type == "cpu" else 0
    config = WorkerConfig(str(path), dtype, device.type, world, expert_parallel, quantization, host,
                          store.port, threads)
    if device.type == "cuda":
        device = config.device_of(0)
        torch.cuda.set_device(device)  # here, not in the rendezvous thread: the current device is per thread
    executor = executor_class(config)
    try:
        tp = TensorParallel(0, world, executor.join_group(lambda: _driver_group(store, config)), expert_parallel)
        executor.tp = tp
        model = load_model(open_checkpoint(path), dtype, device, quantization=quantization, tp=tp)
        executor.wait_ready()
    except BaseException:
        executor.close()
        raise
    from qwenrun.quant.linear import prepare_cpu_weights

    prepare_cpu_weights(model, dtype, device)
    wrapped = TensorParallelModel(model, executor)
    wrapped._store = store  # the rendezvous store lives as long as the group
    weakref.finalize(wrapped, executor.close)  # the workers go with the model (and at exit)
    return wrapped


def _driver_group(store: dist.TCPStore, config: WorkerConfig) -> Any:
    if config.backend == "nccl":
        return dist.ProcessGroupNCCL(store, 0, config.world)
    return dist.ProcessGroupGloo(store, 0, config.world, GROUP_TIMEOUT)
