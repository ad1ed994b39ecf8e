"""Drop-in modules built on the peftkern ops."""

from peftkern.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
