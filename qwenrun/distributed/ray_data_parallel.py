"""Data parallelism: N whole engine replicas as Ray actors behind one API (`--data-parallel-size N`).

`RayDataParallelEngine` has `AsyncEngine`'s interface (`generate`, `stats`, `alive`,
`max_waiting`, `shutdown`), so `create_app(llm, engine=...)` serves it as it serves one engine:
the front end renders prompts, validates and builds each `Request` with its own `LLM` (the
tokenizer, chat template, defaults and context window), `PrefixAffinityRouter` picks a replica, and
the replica's deltas are applied to the front end's request, which the endpoints read as always.

Placement: one placement group per replica, one bundle each (`num_cpus` CPUs, plus a GPU on CUDA),
so the replicas never share cores and each sets torch's threads to its bundle's CPUs. Without a
cluster address Ray starts a local cluster (`ray.init()`); `ray_address` joins one (every node
needs qwenrun and the checkpoint at the same path, or a hub id).

Failures: a replica that dies (`ray.kill`, a crashed node) is dropped from routing. A request it
held that had streamed nothing yet is sent to another live replica; one that had streamed tokens
fails with a `RequestFailedError` saying so (a 500 with OpenAI's error body; in-band when
streaming), since its client already holds part of an answer the retry would not reproduce under
sampling. The server stays up while one replica lives. A client that goes away aborts its request
on the replica, which frees its blocks at its next step.

The front end's `LLM` is built on the meta device (`_frontend`): it validates and builds requests
with the engine's own code but holds neither weights nor a KV cache.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwenrun.distributed.ray_cluster import PLACEMENT_TIMEOUT_S, ray_module as _ray, init_ray
from qwenrun.distributed.ray_replica import EngineReplica, ReplicaDelta, ReplicaFailure, ReplicaInfo
from qwenrun.distributed.router import PrefixAffinityRouter
from qwenrun.engine.async_engine import EngineStats
from qwenrun.engine.request import Request, Status, StepDelta
from qwenrun.errors import QwenrunError, RequestFailedError

if TYPE_CHECKING:
    from qwenrun.engine.engine import LLMEngine
    from qwenrun.llm import LLM

logger = logging.getLogger(__name__)

STATS_WAIT_S = 0.5  # the longest `stats` holds the event loop waiting for the replicas' answers


class RayDataParallelEngine:
    """AsyncEngine's interface over replicas (see the module docstring); `launch` builds one."""

    def __init__(self, frontend: LLM, replicas: list[Any], placement_groups: list[Any],
                 infos: list[ReplicaInfo], *, max_waiting_per_replica: int = 256,
                 balance_abs_threshold: int = 32) -> None:
        self.frontend = frontend
        self.replicas = replicas
        self.placement_groups = placement_groups
        self.infos = infos
        self.max_waiting_per_replica = max_waiting_per_replica
        self.router = PrefixAffinityRouter(len(replicas), infos[0].block_size,
                                           balance_abs_threshold=balance_abs_threshold)
        self.retries = 0  # requests sent again after their replica died before streaming
        self._stopped = False
        self._on_replica: dict[str, int] = {}  # request id -> replica serving it now
        self._last_stats: dict[int, EngineStats] = {}  # each replica's latest answer to `stats`

    @classmethod
    def launch(cls, model: str, data_parallel_size: int, *, ray_address: str | None = None,
               num_cpus_per_replica: int | None = None, max_waiting_per_replica: int = 256,
               balance_abs_threshold: int = 32, **llm_kwargs: Any) -> RayDataParallelEngine:
        """Start `data_parallel_size` replicas of `LLM(model, **llm_kwargs)` and the front end.

        Args:
            ray_address: a Ray cluster to join; None starts (or reuses) a local one.
            num_cpus_per_replica: CPUs in each replica's bundle; default the cluster's CPUs
                divided evenly (at least 1). A CUDA replica also takes one GPU.

        Raises:
            QwenrunError: Ray is missing, or the cluster cannot place the replicas.
        """
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from qwenrun.llm import resolve_device
        from qwenrun.loading.loader import open_checkpoint

        open_checkpoint(model, llm_kwargs.get("revision"))  # a bad path or id: its one-line error, before Ray
        init_ray(ray_address)
        total = int(ray.cluster_resources().get("CPU", 1))
        cpus = num_cpus_per_replica or max(1, total // data_parallel_size)
        cuda = resolve_device(llm_kwargs.get("device", "auto")).type == "cuda"  # as this node sees it
        bundle = {"CPU": cpus, **({"GPU": 1} if cuda else {})}
        run = uuid.uuid4().hex[:12]  # placement group names are cluster-wide: one per launch
        groups = [placement_group([bundle], strategy="STRICT_PACK", name=f"qwenrun-replica-{run}-{i}")
                  for i in range(data_parallel_size)]
        try:
            ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups),
                                timeout=PLACEMENT_TIMEOUT_S)
            if len(ready) < len(groups):
                raise QwenrunError(
                    f"the Ray cluster could not place {data_parallel_size} replicas of {bundle} in "
                    f"{PLACEMENT_TIMEOUT_S:.0f} s (it has {ray.cluster_resources()}); lower "
                    "--data-parallel-size or the CPUs per replica, or add nodes")
            actor = ray.remote(EngineReplica)
            replicas = [actor.options(
                num_cpus=cpus, num_gpus=1 if cuda else 0, max_concurrency=1000,
                scheduling_strategy=PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=0),
            ).remote(i, model, llm_kwargs, max_waiting_per_replica, cpus) for i, g in enumerate(groups)]
            try:
                infos: list[ReplicaInfo] = ray.get([r.info.remote() for r in replicas])
            except ray.exceptions.RayError as e:
                for r in replicas:
                    ray.kill(r)
                raise QwenrunError(f"a data-parallel replica failed to start: {e}") from None
        except BaseException:
            for g in groups:
                remove_placement_group(g)
            raise
        frontend = _frontend(model, llm_kwargs, infos[0].max_model_len)
        logger.info("data parallelism: %d replicas of %s, %d CPUs%s each", data_parallel_size, model, cpus,
                    " and a GPU" if cuda else "")
        return cls(frontend, replicas, groups, infos, max_waiting_per_replica=max_waiting_per_replica,
                   balance_abs_threshold=balance_abs_threshold)

    # ------------------------------------------------------------------ AsyncEngine's interface
    @property
    def engine(self) -> LLMEngine:
        """The front end's engine (what `Metrics` asks about; it never steps)."""
        return self.frontend.engine

    @property
    def max_waiting(self) -> int:
        return self.max_waiting_per_replica * max(1, len(self.router.live_replicas))

    @property
    def alive(self) -> bool:
        return not self._stopped and bool(self.router.live_replicas)

    def replica_of(self, request_id: str) -> int | None:
        """The replica serving a running request now (None once it finished)."""
        return self._on_replica.get(request_id)

    async def generate(self, req: Request) -> AsyncIterator[StepDelta]:
        """Yields the request's deltas from its replica until it finishes; leaving early aborts it there.

        Raises:
            RequestFailedError: its replica died after streaming part of it, or every replica died.
            QwenrunError: what the replica's engine raised for it (429, 400, ...).
        """
        ray = _ray()
        died = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)
        while True:
            try:
                i = self.router.route(req.prompt_token_ids, req.mm_items)
            except RuntimeError:
                raise RequestFailedError("every data-parallel replica has died; the request was not run") from None
            self.router.start(i)
            self._on_replica[req.request_id] = i
            streamed = finished = lost = False
            stream = self.replicas[i].generate.options(num_returns="streaming").remote(
                req.request_id, req.prompt_token_ids, req.params, req.mm_items)
            try:
                async for ref in stream:
                    item = await ref
                    if isinstance(item, ReplicaFailure):
                        finished = True  # the replica already dropped it
                        raise item.error()
                    delta = _apply(req, item)
                    streamed, finished = True, item.finished
                    yield delta
                    if finished:
                        return
                finished = True  # a stream that ends without a last delta: the replica aborted it
                raise RequestFailedError(f"data-parallel replica {i} ended this request without finishing it")
            except died as e:
                lost = True
                self._lose(i, e)
                if streamed:
                    raise RequestFailedError(
                        f"data-parallel replica {i} died while serving this request, after "
                        f"{req.num_output_tokens} tokens had been sent; the server carries on with "
                        f"{len(self.router.live_replicas)} replica(s): retry the request") from None
                self.retries += 1
                logger.warning("replica %d died before request %s streamed anything: sending it to another",
                               i, req.request_id)
            except ray.exceptions.RayError as e:
                finished = True
                raise RequestFailedError(f"data-parallel replica {i} failed this request: {e}") from None
            finally:
                self.router.finish(i)
                self._on_replica.pop(req.request_id, None)
                if not finished and not lost:
                    self.replicas[i].abort.remote(req.request_id)  # fire and forget: the client left

    def _lose(self, i: int, exc: BaseException) -> None:
        if self.router.alive[i]:
            logger.error("data-parallel replica %d died (%s); %d replica(s) left", i, type(exc).__name__,
                         len(self.router.live_replicas) - 1)
            self.router.remove(i)

    def stats(self) -> EngineStats:
        """The live replicas' stats summed. It is called on the event loop (every request's queue
        check, every scrape), so it waits at most `STATS_WAIT_S` in all: a replica that has not
        answered by then counts with its last answer."""
        ray = _ray()
        live = self.router.live_replicas
        refs = {self.replicas[i].stats.remote(): i for i in live}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=STATS_WAIT_S) if refs else ([], [])
        for ref in done:
            try:
                self._last_stats[refs[ref]] = ray.get(ref)
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as e:
                self._lose(refs[ref], e)
        total = EngineStats(0, 0, 0, 0, 0, 0, 0)
        for i in self.router.live_replicas:
            if i in self._last_stats:
                total = EngineStats(*(a + b for a, b in zip(dataclasses.astuple(total),
                                                            dataclasses.astuple(self._last_stats[i]))))
        return total

    def collector(self) -> Collector:
        """Per-replica Prometheus metrics, for the app's registry beside the summed ones
        (`app.state.qwenrun.metrics.registry.register(engine.collector())`)."""
        return _ReplicaCollector(self)

    def cache_reports(self) -> dict[int, dict[str, Any]]:
        """Each live replica's `EngineReplica.cache_report` (blocks, live handles, integrity)."""
        ray = _ray()
        live = self.router.live_replicas
        return dict(zip(live, ray.get([self.replicas[i].cache_report.remote() for i in live])))

    def shutdown(self) -> None:
        """Stop every replica and free its placement group (Ray itself stays up)."""
        if self._stopped:
            return
        self._stopped = True
        ray = _ray()
        if not ray.is_initialized():  # Ray already shut down: the replicas went with it (a call would restart it)
            return
        from ray.util.placement_group import remove_placement_group

        for r in self.replicas:
            try:
                ray.kill(r)
            except ray.exceptions.RayError as e:  # a cluster already gone (its head stopped first)
                logger.warning("could not stop a data-parallel replica: %s", e)
        for g in self.placement_groups:
            try:
                remove_placement_group(g)
            except ray.exceptions.RayError as e:
                logger.warning("could not remove a replica's placement group: %s", e)


class _ReplicaCollector(Collector):
    """Each replica's gauges, labelled `replica`, from its latest `stats` answer (the summed
    collector, registered first, has just asked), plus the router's counters."""

    def __init__(self, engine: RayDataParallelEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e, labels = self.engine, ["replica"]
        up = GaugeMetricFamily("qwenrun_replica_up", "1 while a data-parallel replica is alive.", labels=labels)
        in_flight = GaugeMetricFamily("qwenrun_replica_requests_in_flight",
                                      "Requests the router has on a replica.", labels=labels)
        running = GaugeMetricFamily("qwenrun_replica_num_requests_running", "Requests a replica decodes.",
                                    labels=labels)
        waiting = GaugeMetricFamily("qwenrun_replica_num_requests_waiting", "Requests a replica has queued.",
                                    labels=labels)
        usage = GaugeMetricFamily("qwenrun_replica_kv_cache_usage_perc",
                                  "Fraction of a replica's KV cache blocks in use (0 to 1).", labels=labels)
        hit = GaugeMetricFamily("qwenrun_replica_prefix_cache_hit_rate",
                                "Fraction of a replica's prompt tokens served from its prefix cache.", labels=labels)
        for i, alive in enumerate(e.router.alive):
            name = [str(i)]
            up.add_metric(name, float(alive))
            in_flight.add_metric(name, e.router.load[i])
            s = e._last_stats.get(i)
            if alive and s is not None:
                running.add_metric(name, s.running)
                waiting.add_metric(name, s.waiting)
                usage.add_metric(name, s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
                hit.add_metric(name, s.prefix_cache_hit_rate)
        yield from (up, in_flight, running, waiting, usage, hit)
        yield CounterMetricFamily("qwenrun_router_affinity_hits", "Requests sent to the replica of their prefix.",
                                  value=e.router.affinity_hits)
        yield CounterMetricFamily("qwenrun_router_retries",
                                  "Requests sent again after their replica died before streaming.", value=e.retries)


def _frontend(model: str, llm_kwargs: dict[str, Any], max_model_len: int) -> LLM:
    """The front end's `LLM`: the replicas' tokenizer, template, defaults and context window, and an
    engine that validates and builds requests but never runs one, so it is built on the meta device
    (no weights, no KV cache in memory: the budget only has to admit one whole context) and
    unquantized, unsplit and without a drafter. Its requests' seeded generators are made on the CPU
    (a meta device has none), and are never drawn from: each replica makes its own."""
    import torch

    from qwenrun.llm import LLM

    kwargs = {**llm_kwargs, "device": "meta", "max_num_seqs": 1, "max_model_len": max_model_len,
              "kv_cache_memory": 1 << 50, "speculative_config": None, "quantization": None}
    if llm_kwargs.get("tensor_parallel_size", 1) > 1:
        kwargs |= {"tensor_parallel_size": 1, "enable_expert_parallel": False}
    if "kv_cache_dtype" in llm_kwargs:
        kwargs["kv_cache_dtype"] = "auto"
    frontend = LLM(model, **kwargs)
    frontend.engine.device = torch.device("cpu")
    return frontend


def _apply(req: Request, item: ReplicaDelta) -> StepDelta:
    """Advance the front end's copy of `req` by a replica's delta (what the endpoints read)."""
    req.token_ids.extend(item.new_token_ids)
    if req.logprobs is not None and item.logprobs:
        req.logprobs.extend(item.logprobs)
    req.text += item.text_delta
    if item.finished:
        req.text = item.text if item.text is not None else req.text
        req.finish_reason, req.stop_reason = item.finish_reason, item.stop_reason
        req.status = Status.FINISHED
    return StepDelta(req, item.new_token_ids, item.text_delta, item.finished)

