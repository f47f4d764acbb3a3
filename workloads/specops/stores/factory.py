"""Open the sink a DataGenConfig names; store modules are imported only when chosen."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from specops.config import ConfigError

if TYPE_CHECKING:
    from specops.config import DataGenConfig
    from specops.stores.base import DataSink, StoreMeta

SINKS: dict[str, tuple[str, str]] = {
    "disk": ("specops.stores.disk", "DiskStore"),
    "mpqueue": ("specops.stores.mpqueue", "MPQueueStore"),
    "zmq": ("specops.stores.zmq", "ZmqStore"),
}
"""`sync.kind` -> (module, class); each class offers `from_config(sync, run, meta)`."""


@runtime_checkable
class FinalizingSink(Protocol):
    """A sink that can mark its producer's slice complete (disk: the merged manifest)."""

    def finalize(self) -> bool: ...


def open_sink(config: DataGenConfig, meta: StoreMeta) -> DataSink:
    """The sink for this process's slice (`config.run`), checked against `meta`."""
    kind = config.sync.kind
    module_name, class_name = SINKS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(
            f"sync.kind: {kind!r} is not available in this build ({module_name} is missing)"
        ) from None
    sink: DataSink = getattr(module, class_name).from_config(config.sync, config.run, meta)
    return sink
