"""Drop-in modules built on the peftkern ops."""

from peftkern.nn.lora import LoRALinear
from peftkern.nn.prefix import PrefixAttention, PrefixEncoder

__all__ = ["LoRALinear", "PrefixAttention", "PrefixEncoder"]
