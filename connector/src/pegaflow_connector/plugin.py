"""vLLM plugin entry point: registers the connector with KVConnectorFactory.

`pip install pegaflow-connector` declares it in the `vllm.general_plugins`
entry-point group; vLLM calls `register()` in every process it starts, so

    --kv-transfer-config '{"kv_connector": "PegaFlowConnector", "kv_role": "kv_both"}'

works with no `kv_connector_module_path`. The name is not `PegaKVConnector`:
the Rust PegaFlow project registers that one, and the factory's registry
wins over a module path, so a shared name would load the other project's
class. `PegaKVConnector` stays importable by module path.
"""

from __future__ import annotations

import logging

from .compat import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)

CONNECTOR_NAME = "PegaFlowConnector"


def register() -> None:
    """Idempotent (vLLM may load plugins several times per process); never
    raises, so a broken install cannot stop vLLM from starting."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import (  # type: ignore
            KVConnectorFactory,
        )
    except Exception:  # noqa: BLE001 - no vLLM: nothing to register with
        return
    registry = getattr(KVConnectorFactory, "_registry", {})
    if CONNECTOR_NAME in registry:
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "pegaflow_connector.vllm_connector",
                                              CONNECTOR_NAME)
    except Exception as e:  # noqa: BLE001
        log.error("pegaflow: cannot register %s with vLLM: %s", CONNECTOR_NAME, e)
