"""Drop-in integrations with Hugging Face `transformers` and `peft`.

`inject_lora` turns a plain model into a LoRA model, `patch_peft` speeds up a model built by
`peft` (LoRA or prefix tuning) in place, `save_adapter`/`load_adapter` speak peft's file format, `merge_and_unload`
returns to plain nn.Linear layers, `use_peftkern_attention` runs a model's self-attention through
peftkern's CPU flash kernel. `peft` itself is only imported by `patch_peft`.
"""

from peftkern.integrations.inject import LoRASummary, inject_lora
from peftkern.integrations.merge import merge_and_unload
from peftkern.integrations.peft_format import AdapterFormatError, load_adapter, save_adapter
from peftkern.integrations.peft_patch import PatchReport, patch_peft, unpatch_peft

__all__ = [
    "AdapterFormatError",
    "LoRASummary",
    "PatchReport",
    "inject_lora",
    "load_adapter",
    "merge_and_unload",
    "patch_peft",
    "save_adapter",
    "unpatch_peft",
]

from peftkern.integrations.adapters import AdapterSummary, inject_adapters  # noqa: E402
from peftkern.integrations.summary import InjectSummary  # noqa: E402

__all__ += ["AdapterSummary", "InjectSummary", "inject_adapters"]

from peftkern.integrations.prefix import PrefixSummary, inject_prefix  # noqa: E402

__all__ += ["PrefixSummary", "inject_prefix"]

from peftkern.integrations.attention import restore_attention, use_peftkern_attention  # noqa: E402

__all__ += ["restore_attention", "use_peftkern_attention"]

from peftkern.integrations.loss import restore_loss, use_peftkern_loss  # noqa: E402

__all__ += ["restore_loss", "use_peftkern_loss"]
