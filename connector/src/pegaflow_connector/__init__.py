"""PegaFlow's vLLM KV connector.

vLLM imports this module (``kv_connector_module_path``) and looks up
``PegaKVConnector`` by name. The engine-facing core (client, layout,
scheduler and worker state machines) works without vLLM or torch.
"""

from .vllm_connector import PegaKVConnector

__all__ = ["PegaKVConnector"]
__version__ = "0.1.0"
