"""Drop-in modules built on the peftkern ops."""

from peftkern.nn.adapter import (
    HOULSBY,
    PFEIFFER,
    AdapterConfig,
    BottleneckAdapter,
    count_trainable,
    format_trainable,
)
from peftkern.nn.lora import LoRALinear
from peftkern.nn.prefix import PrefixAttention, PrefixEncoder

__all__ = [
    "HOULSBY",
    "PFEIFFER",
    "AdapterConfig",
    "BottleneckAdapter",
    "LoRALinear",
    "PrefixAttention",
    "PrefixEncoder",
    "count_trainable",
    "format_trainable",
]

from peftkern.nn.dora import DoRALinear  # noqa: E402

__all__ += ["DoRALinear"]
