"""Adapter tiers below the pool: PEFT adapters on disk (AdapterSource) and in host RAM (HostCache).

See docs/DESIGN.md "Adapter source and host tier".
"""

from slora_backend.adapters.host_cache import HostCache
from slora_backend.adapters.source import AdapterInfo, AdapterSource, HostAdapter
from slora_backend.adapters.validation import LoraSettings, check_adapter_id

__all__ = ["AdapterInfo", "AdapterSource", "HostAdapter", "HostCache", "LoraSettings",
           "check_adapter_id"]
