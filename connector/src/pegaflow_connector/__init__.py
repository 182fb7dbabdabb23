"""PegaFlow's vLLM KV connector.

Installed, it is a vLLM plugin (entry point `vllm.general_plugins` ->
plugin.register) that registers ``PegaFlowConnector`` with vLLM's
KVConnectorFactory. vLLM can also import this module
(``kv_connector_module_path``) and look up ``PegaFlowConnector`` or the old
name ``PegaKVConnector`` (the same class). The engine-facing core (client,
layout, scheduler and worker state machines) works without vLLM or torch.
"""

from .vllm_connector import PegaFlowConnector, PegaKVConnector

__all__ = ["PegaFlowConnector", "PegaKVConnector"]
__version__ = "0.1.0"
