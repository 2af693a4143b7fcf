"""The adapter tiers, disk -> host RAM -> pool (docs/DESIGN.md "Adapter tiers"):

1. disk: PEFT folders, validated and read by AdapterSource (source.py, validation.py);
2. host RAM: HostCache (host_cache.py), LRU by bytes, loads in the background;
3. the pool: AdapterManager (adapter_manager.py), adapters' rows in pages of the unified pool
   next to the KV cache, their slots in the slot tables; the engine's only way to the tiers.
"""

from slora_backend.adapters.adapter_manager import AdapterManager
from slora_backend.adapters.host_cache import HostCache
from slora_backend.adapters.source import AdapterInfo, AdapterSource, HostAdapter
from slora_backend.adapters.validation import LoraSettings, check_adapter_id

__all__ = ["AdapterInfo", "AdapterManager", "AdapterSource", "HostAdapter", "HostCache",
           "LoraSettings", "check_adapter_id"]
