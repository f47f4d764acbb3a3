"""A store-only vLLM KV connector that hands `extract_hidden_states` captures to SpecOps.

vLLM's `extract_hidden_states` speculative method writes each token's aux hidden states
`[L, H]` into the KV cache of a cache-only layer. When a request finishes, this connector (loaded
by vLLM from `kv_connector_module_path="specops.engines.vllm_connector"`) keeps the request's
blocks, reads its rows out of that cache on tensor-parallel rank 0 at the next step, and delivers
them through `engines.vllm_handoff` (ZeroMQ in memory, or a file), then lets vLLM free the blocks.
The copy is synchronous (`.cpu()`), so it runs on CPU-only builds too; vLLM's example connector
needs CUDA streams and pinned memory.

The scheduler half only records which requests finished and with which blocks; the worker half
does the copy. The two halves talk through `HandoffMetadata`, which vLLM ships to the workers.
This module imports vLLM and is only ever imported inside a vLLM process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from specops.engines.vllm_handoff import (
    ADDRESS_PARAM,
    DIRECTORY_PARAM,
    HANDOFF_PARAM,
    KEY_PARAM,
    Delivery,
    MemorySender,
    write_file,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class PendingHandoff:
    """A finished request whose hidden states still sit in its (kept) blocks."""

    request_id: str
    key: str
    handoff: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class HandoffMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the requests to hand off now."""

    pending: list[PendingHandoff] = field(default_factory=list)


class SpecOpsHiddenStatesConnector(KVConnectorBase_V1, SupportsHMA):
    """Producer-only connector: never loads KV, hands hidden states to the SpecOps pipeline."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._address: str | None = extra.get(ADDRESS_PARAM)
        self._directory: str | None = extra.get(DIRECTORY_PARAM)
        self._group = _hidden_state_group(kv_cache_config)
        spec = vllm_config.speculative_config
        aux = (
            getattr(spec.draft_model_config.hf_config, "eagle_aux_hidden_state_layer_ids", None)
            if spec
            else None
        )
        if not aux:
            raise ValueError(
                "specops connector: needs speculative_config method 'extract_hidden_states' with "
                "eagle_aux_hidden_state_layer_ids"
            )
        # the verifier emits aux layers sorted and de-duplicated, whatever order the config lists
        self._layer_ids = tuple(sorted({int(k) for k in aux}))
        # scheduler side
        self._finished: list[PendingHandoff] = []
        # worker side
        self._cache: torch.Tensor | None = None
        self._sender: MemorySender | None = None
        self._is_sender = True
        self._delivered: set[str] = set()
        self._seen_finished: set[str] = set()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> HandoffMetadata:
        meta = HandoffMetadata(pending=self._finished)
        self._finished = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks of our requests until the worker has handed their states off."""
        params = request.kv_transfer_params or {}
        key = params.get(KEY_PARAM)
        if key is None or not block_ids or request.prompt_token_ids is None:
            return False, None
        self._finished.append(
            PendingHandoff(
                request_id=request.request_id,
                key=str(key),
                handoff=str(params.get(HANDOFF_PARAM, "memory")),
                token_ids=list(request.prompt_token_ids),
                block_ids=list(block_ids),
            )
        )
        return True, {KEY_PARAM: key}

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if not 0 <= self._group < len(block_ids):
            return False, None
        return self.request_finished(request, block_ids[self._group])

    def get_finished_count(self) -> int:
        """Only tensor-parallel rank 0 hands off, so one report per request is all there is."""
        return 1

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

        self._is_sender = get_tensor_model_parallel_rank() == 0
        layers = get_layers_from_vllm_config(self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches))
        if len(layers) != 1:
            raise ValueError(
                f"specops connector: expected one cache-only hidden-states layer, found {len(layers)}; "
                "it needs speculative_config method 'extract_hidden_states'"
            )
        self._cache = kv_caches[next(iter(layers))]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Hand off the requests the scheduler listed this step, then report those vLLM has also
        told us finished (its rule for what may be reported). The copy is synchronous, so the
        blocks can be freed as soon as we report them."""
        if not self._is_sender:
            return None, None
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, HandoffMetadata):
                for item in meta.pending:
                    self._deliver(item)
                    self._delivered.add(item.request_id)
        self._seen_finished |= finished_req_ids
        done = self._delivered & self._seen_finished
        self._delivered -= done
        self._seen_finished -= done
        return done or None, None

    def _deliver(self, item: PendingHandoff) -> None:
        states = self._read_rows(item.block_ids, len(item.token_ids))
        delivery = Delivery(item.key, item.token_ids, states, self._layer_ids)
        if item.handoff == "file":
            if not self._directory:
                raise ValueError(f"specops connector: kv_connector_extra_config.{DIRECTORY_PARAM} is not set")
            write_file(self._directory, delivery)
            return
        if self._sender is None:
            if not self._address:
                raise ValueError(f"specops connector: kv_connector_extra_config.{ADDRESS_PARAM} is not set")
            self._sender = MemorySender(self._address)
        self._sender.send(delivery)

    def _read_rows(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """[S, L, H] on the CPU, indexed exactly as the cache-only layer wrote it."""
        cache = self._cache
        if cache is None:
            raise RuntimeError("specops connector: hidden-states cache not registered")
        block_size = cache.shape[2]
        blocks = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
        offsets = torch.arange(block_size, dtype=torch.long, device=cache.device)
        slots = (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:num_tokens]
        return cache[slots // block_size, :, slots % block_size].cpu()

    def shutdown(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


def _hidden_state_group(kv_cache_config: KVCacheConfig | None) -> int:
    """The KV cache group holding the cache-only layer (the only group for plain verifiers)."""
    if kv_cache_config is None:
        return 0
    from vllm.v1.kv_cache_interface import HiddenStateCacheSpec

    groups = kv_cache_config.kv_cache_groups
    found = [i for i, group in enumerate(groups) if isinstance(group.kv_cache_spec, HiddenStateCacheSpec)]
    if len(found) == 1:
        return found[0]
    if not found and len(groups) == 1:
        return 0
    raise ValueError(f"specops connector: cannot find the hidden-states KV cache group among {len(groups)}")
