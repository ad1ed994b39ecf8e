"""peftkern: fused kernels for parameter-efficient fine-tuning."""

from __future__ import annotations

from typing import Any

from peftkern._loader import load_extension

_C = load_extension()

from peftkern import ops  # noqa: E402,F401  (registers fake kernels and autograd on the ops)
from peftkern.functional import bottleneck_adapter, lora_linear, prefix_attention  # noqa: E402
from peftkern.nn import BottleneckAdapter, LoRALinear, PrefixAttention, PrefixEncoder  # noqa: E402

__version__: str = _C.build_info()["version"]


def build_info() -> dict[str, Any]:
    """What this build contains: version, torch it was built with, CUDA kernels and
    architectures, and the CPU vector ISA the kernels use on this machine."""
    return dict(_C.build_info())


from peftkern.integrations import (  # noqa: E402
    AdapterFormatError,
    LoRASummary,
    PatchReport,
    inject_lora,
    load_adapter,
    merge_and_unload,
    patch_peft,
    save_adapter,
    unpatch_peft,
)

__all__ = [
    "AdapterFormatError",
    "BottleneckAdapter",
    "LoRALinear",
    "LoRASummary",
    "PatchReport",
    "PrefixAttention",
    "PrefixEncoder",
    "__version__",
    "bottleneck_adapter",
    "build_info",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "patch_peft",
    "prefix_attention",
    "save_adapter",
    "unpatch_peft",
]

from peftkern.integrations import AdapterSummary, InjectSummary, inject_adapters  # noqa: E402

__all__ += ["AdapterSummary", "InjectSummary", "inject_adapters"]

from peftkern.integrations import PrefixSummary, inject_prefix  # noqa: E402

__all__ += ["PrefixSummary", "inject_prefix"]

from peftkern.integrations import restore_attention, use_peftkern_attention  # noqa: E402

__all__ += ["restore_attention", "use_peftkern_attention"]

from peftkern.functional import linear_cross_entropy  # noqa: E402
from peftkern.integrations import restore_loss, use_peftkern_loss  # noqa: E402

__all__ += ["linear_cross_entropy", "restore_loss", "use_peftkern_loss"]

from peftkern.functional import dora_linear  # noqa: E402
from peftkern.nn import DoRALinear  # noqa: E402

__all__ += ["DoRALinear", "dora_linear"]
