"""PegaFlowConnector: the thin vLLM adapter over the scheduler and worker cores.

Load with (the plugin registers the name, plugin.py):
    --kv-transfer-config '{"kv_connector": "PegaFlowConnector", "kv_role": "kv_both"}'
or by module path, under either name (PegaKVConnector is the old one):
    --kv-transfer-config '{"kv_connector": "PegaKVConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "pegaflow_connector"}'

Every vLLM entry point is guarded: an unexpected error is logged and the
method answers "nothing to do" instead of raising into vLLM's loop. The one
exception is request_finished after saves were started: it keeps blocks
(True) when unsure, since freeing blocks under an in-flight copy would
store garbage.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from .client import EngineClient
from .compat import (
    LOGGER_NAME,
    CacheHitSource,
    KVConnectorBase_V1,
    KVConnectorTransferResults,
    SupportsHMA,
    backend_block_axes,
    data_parallel_rank,
    init_connector_base,
    kv_cache_num_blocks,
    kv_engine_id,
    kv_events_enabled,
    preemption_ids_arg,
    require_supported_vllm,
    role_is_scheduler,
    vllm_kv_events,
)
from .disabled import DisabledWorker
from .groups import GroupPlan, plan_groups
from .instance import (
    instance_id_for,
    kv_role,
    load_config,
    namespace_template,
    tensor_parallel_size,
    tp_rank,
)
from .layout import LayoutError
from .metadata import PegaConnectorMetadata, PegaHandshake
from .metrics import Metrics
from .rendezvous import (
    clear_disabled,
    disabled_from_handshakes,
    namespace_from_handshakes,
    publish_disabled,
)
from .scheduler import SchedulerCore
from .stats import PegaFlowPromMetrics, PegaFlowStats, StatsTap
from .worker import WorkerCore

log = logging.getLogger(LOGGER_NAME)

T = TypeVar("T")


def _guard(default: Callable[..., Any]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Never let an exception escape into vLLM: log it, answer default(...)."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(self: PegaFlowConnector, *args: Any, **kwargs: Any) -> T:
            try:
                return fn(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self._metrics.inc("internal_errors")
                log.exception("pegaflow: %s failed: %s", fn.__name__, e)
                return default(self, *args, **kwargs)

        return inner

    return wrap


class PegaFlowConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector backed by a PegaFlow engine on the same host.

    SupportsHMA: vLLM keeps its hybrid KV cache allocator on; the connector
    stores every transferable group and claims a hit only where every one
    of them can be loaded (groups.py)."""

    # Hits come from the engine's pinned host memory (vLLM's metrics label).
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None,
                 *, client: EngineClient | None = None):
        # An unsupported vLLM fails vLLM's start with one message, before
        # anything half-works (the only failure the connector raises).
        require_supported_vllm()
        init_connector_base(super().__init__, vllm_config, role, kv_cache_config)
        self._metrics = client.metrics if client is not None else Metrics()
        self._stats_tap = StatsTap(self._metrics)
        self._sched: SchedulerCore | None = None
        self._worker: WorkerCore | DisabledWorker | None = None
        self._client: EngineClient | None = client
        self._is_scheduler = role_is_scheduler(role)
        self._disabled = ""
        self._role_name = "kv_both"
        self._kv_cache_config = kv_cache_config
        self._vllm_config = vllm_config
        self._groups = GroupPlan()
        self.instance_id = ""
        self._rank = 0
        try:
            self._setup(vllm_config)
        except Exception as e:  # noqa: BLE001 - vLLM must start without us
            if self._is_scheduler:
                self._disabled = str(e)
                log.error("pegaflow: CONNECTOR DISABLED (scheduler): %s. vLLM keeps serving "
                          "without PegaFlow.", e)
            else:
                self._disable_worker(f"start-up failed: {e}")

    # ------------------------------------------------------------ setup

    def _setup(self, vc: Any) -> None:
        """Reads vLLM's config (instance.py) and builds this process's core;
        attributes are set as they are known, so that a failure part-way
        still names the instance and rank it disables."""
        ktc = vc.kv_transfer_config
        self.cfg = cfg = load_config(ktc, is_scheduler=self._is_scheduler)
        self._role_name, self._load_enabled, self._save_enabled = kv_role(ktc)
        mc, cc, pc = vc.model_config, vc.cache_config, vc.parallel_config
        self.block_size = int(cc.block_size)
        tp = tensor_parallel_size(pc)
        engine_id = kv_engine_id(ktc)
        self.instance_id = instance_id_for(cfg.instance_id, engine_id,
                                           data_parallel_rank(pc, engine_id))
        self._groups = groups = plan_groups(self._kv_cache_config, self.block_size)
        self._ns_template = namespace_template(cfg, vc, block_size=self.block_size, tp=tp,
                                               instance_id=self.instance_id, groups=groups,
                                               is_scheduler=self._is_scheduler)
        if groups.stored is None:
            self._load_enabled = self._save_enabled = False
        self._rank = tp_rank(cfg)
        role = "scheduler" if self._is_scheduler else f"worker rank {self._rank}"
        if self._client is None:
            self._client = EngineClient(
                cfg.socket_path, f"vllm-{role} pid={os.getpid()} instance={self.instance_id}",
                self._metrics, connect_timeout_s=cfg.connect_timeout_ms / 1000,
                backoff_min_s=cfg.reconnect_min_ms / 1000, backoff_max_s=cfg.reconnect_max_ms / 1000,
                socket_owner=cfg.socket_owner)
        if self._is_scheduler:
            self._sched = SchedulerCore(cfg, self._client, block_size=self.block_size,
                                        instance_id=self.instance_id,
                                        load_enabled=self._load_enabled,
                                        save_enabled=self._save_enabled, metrics=self._metrics,
                                        plan=groups)
            if kv_events_enabled(vc):
                self._sched.enable_kv_events()
        else:
            # A marker left by an earlier run of this instance is stale now.
            clear_disabled(self.instance_id, self._rank)
            self._worker = WorkerCore(cfg, self._client, rank=self._rank, tp_size=tp,
                                      instance_id=self.instance_id, namespace=self._ns_template,
                                      metrics=self._metrics, plan=groups)
        self._client.start()
        log.info("pegaflow: %s connector for %s (%s, instance %s, socket %s)", role, mc.model,
                 self._role_name, self.instance_id, cfg.socket_path)

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def client(self) -> EngineClient | None:
        return self._client

    @property
    def disabled(self) -> str:
        """Why this process's connector is disabled ("" when it is not)."""
        return self._disabled

    @property
    def worker_core(self) -> WorkerCore | DisabledWorker | None:
        return self._worker

    @property
    def scheduler_core(self) -> SchedulerCore | None:
        return self._sched

    # ------------------------------------------------------------ worker side

    def _disable_worker(self, reason: str) -> None:
        """From now on this rank runs a DisabledWorker, which settles every
        delayed free and load vLLM still hands it; the scheduler learns it
        from the handshake or the rendezvous marker."""
        self._disabled = reason
        self._worker = DisabledWorker(reason, self._rank, self._metrics)
        if self.instance_id:
            publish_disabled(self.instance_id, self._rank, reason)
        log.error("pegaflow: CONNECTOR DISABLED on worker rank %d: %s. vLLM keeps serving "
                  "without PegaFlow (requests are computed locally, nothing is saved).",
                  self._rank, reason)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Any failure, at any registration step, disables this rank (never
        raised into vLLM, never a half-registered worker)."""
        worker = self._worker
        if not isinstance(worker, WorkerCore):
            return
        try:
            num_blocks = kv_cache_num_blocks(self._kv_cache_config)
            worker.register_kv_caches(kv_caches, num_blocks, self.block_size,
                                      backend_block_axes(self._vllm_config, list(kv_caches)))
        except Exception as e:  # noqa: BLE001 - vLLM must serve without us
            self._metrics.inc("register_failures")
            try:
                worker.abandon()
            except Exception:  # noqa: BLE001 - abandon is best effort already
                pass
            what = "cannot describe the KV caches" if isinstance(e, LayoutError) \
                else f"registration failed ({type(e).__name__})"
            self._disable_worker(f"{what}: {e}")

    @_guard(lambda self, *a, **k: None)
    def handle_preemptions(self, kv_connector_metadata: Any = None, *args: Any, **kwargs: Any) -> None:
        """Before preempted requests' blocks are reused (or zeroed). vLLM
        passes this step's metadata, or (some releases) the set of
        preempted request ids."""
        if self._worker is None:
            return
        if isinstance(kv_connector_metadata, PegaConnectorMetadata):
            self._worker.start_step(kv_connector_metadata)
        elif (ids := preemption_ids_arg(kv_connector_metadata)) is not None:
            self._worker.wait_preempted(ids)

    @_guard(lambda self, *a, **k: None)
    def start_load_kv(self, forward_context: Any = None, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, PegaConnectorMetadata):
                self._worker.start_step(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous (get_finished)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves are batched per step in wait_for_save (robust under CUDA graphs)

    @_guard(lambda self, *a, **k: None)
    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, PegaConnectorMetadata):
                self._worker.end_step(meta)

    @_guard(lambda self, *a, **k: (None, None))
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return self._worker.get_finished(finished_req_ids)

    @_guard(lambda self, *a, **k: KVConnectorTransferResults())
    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.32+: completions and failed loads together; a hybrid
        model's failed loads are reported per request (failed_recving)."""
        if not isinstance(self._worker, WorkerCore):
            fs, fr = self.get_finished(finished_req_ids)
            return KVConnectorTransferResults(set(fs or ()), set(fr or ()))
        fs2, fr2, failed = self._worker.get_transfer_results(finished_req_ids)
        return KVConnectorTransferResults(fs2, fr2, failed)

    @_guard(lambda self, *a, **k: set())
    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._worker.load_errors()

    @_guard(lambda self, *a, **k: None)
    def get_handshake_metadata(self) -> PegaHandshake | None:
        return self._worker.handshake() if self._worker is not None else None

    @_guard(lambda self, *a, **k: None)
    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._sched is not None:
            self._sched.shutdown()
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------ scheduler side

    @_guard(lambda self, *a, **k: (0, False))
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._sched is None:
            return 0, False
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    @_guard(lambda self, *a, **k: None)
    def on_new_request(self, request: Any) -> None:
        """vLLM 0.22+: a request arrived; its cache query starts now."""
        if self._sched is not None:
            self._sched.on_new_request(request)

    @_guard(lambda self, *a, **k: None)
    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._sched is not None:
            self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    @_guard(lambda self, *a, **k: PegaConnectorMetadata())
    def build_connector_meta(self, scheduler_output: Any) -> PegaConnectorMetadata:
        if self._sched is None:
            return PegaConnectorMetadata()
        return self._sched.build_connector_meta(scheduler_output)

    @_guard(lambda self, *a, **k: None)
    def update_connector_output(self, connector_output: Any) -> None:
        if self._sched is not None:
            self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: Any = None) -> tuple[bool, dict[str, Any] | None]:
        if self._sched is None:
            return False, None
        try:
            return self._sched.request_finished(request, block_ids)
        except Exception as e:  # noqa: BLE001
            self._metrics.inc("internal_errors")
            log.exception("pegaflow: request_finished failed: %s", e)
            # Unsure whether saves are in flight: keep the blocks; the
            # workers report the request once its saves are done.
            return self._save_enabled, None

    def request_finished_all_groups(self, request: Any, block_ids: Any = None
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """SupportsHMA's request_finished (one block-id list per group):
        delaying the free keeps every group's blocks, which vLLM frees
        together."""
        return self.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Any) -> tuple[int, ...]:
        """A load restores every stored group (a hit is claimed only when
        every one of them holds the boundary's blocks, groups.py)."""
        return self._groups.indices

    @_guard(lambda self, *a, **k: None)
    def set_xfer_handshake_metadata(self, metadata: dict[Any, Any]) -> None:
        if self._sched is None or not metadata:
            return
        if (reason := disabled_from_handshakes(metadata.values())) is not None:
            self._sched.disable(reason)
        ns = namespace_from_handshakes(metadata.values())
        if ns is not None:
            self._sched.set_namespace(ns)

    # ------------------------------------------------------------ vLLM 0.33 hooks

    @property
    def requires_kv_delivery(self) -> bool:
        """Only a kv_producer hands KV off (vLLM's default). A kv_both
        instance is a best-effort cache (a dropped save is a later miss) and
        its P/D saves are protected by the preemption wait, so vLLM need not
        recompute its preempted requests."""
        return self._role_name == "kv_producer"

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No: the engine maps the rank's KV memory (shared file or CUDA IPC
        handle of the allocation) at registration; sleep frees and remaps
        it, and a stale mapping would copy freed memory. vLLM then refuses
        sleep mode with this connector at start-up, with its own message."""
        return False

    def unregister_kv_caches(self) -> None:
        """Never called (sleep mode is refused, see supports_sleep_mode)."""
        return

    def restore_kv_caches(self) -> None:
        """Never called (sleep mode is refused, see supports_sleep_mode)."""
        return

    def finish_forward(self) -> None:
        """Nothing to do: saves read the KV after the event recorded in
        wait_for_save, loads finish before their request is scheduled."""
        return

    @_guard(lambda self, *a, **k: False)
    def has_pending_block_frees(self) -> bool:
        return self._sched.has_pending_block_frees() if self._sched is not None else False

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        """Every external token comes from the engine's host memory."""
        return {CacheHitSource.HOST: num_external_tokens} if num_external_tokens else {}

    @_guard(lambda self, *a, **k: False)
    def reset_cache(self) -> bool | None:
        """False: see SchedulerCore.reset_cache (stops using the shared
        cache rather than serve KV of the old weights)."""
        return self._sched.reset_cache() if self._sched is not None else False

    # ------------------------------------------------------------ vLLM stats

    @_guard(lambda self, *a, **k: None)
    def get_kv_connector_stats(self) -> PegaFlowStats | None:
        """This process's counter deltas since the last call (vLLM asks
        every worker after each step, and the scheduler)."""
        data = self._stats_tap.take()
        return PegaFlowStats(data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PegaFlowStats:
        return PegaFlowStats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> PegaFlowPromMetrics:
        return PegaFlowPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @_guard(lambda self, *a, **k: [])
    def take_events(self) -> list[Any]:
        """The CPU tier's KV events since the last step (kv_events.py), as
        vLLM's classes; vLLM's scheduler publishes them with its own."""
        if self._sched is None or self._sched.events is None:
            return []
        return vllm_kv_events(self._sched.take_events(), self.block_size)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return None


# The name before the plugin (kept for configs that load it by module path).
PegaKVConnector = PegaFlowConnector
