"""A pytest plugin that passes every PeftModel that peft's own tests build through
`peftkern.patch_peft`, and counts what that did (used by scripts/peer_peft.sh).

`get_peft_model` and `PeftModel.from_pretrained` are wrapped before the test modules are
imported (they import these names at import time). At the end of the session the counts are
written as JSON to $PEFTKERN_PEER_COUNTS: models patched, layers patched (in all and by kind:
plain LoRA, DoRA, LoRA with lora_bias, prefix-attention) and skipped (by reason), and calls of
the fused LoRA op, of the fused DoRA op and of the prefix attention.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

COUNTS = {
    "models": 0,
    "layers_patched": 0,
    "layers_skipped": 0,
    "patched_lora": 0,
    "patched_dora": 0,
    "patched_lora_bias": 0,
    "patched_prefix": 0,
    "fused_lora_calls": 0,
    "fused_dora_calls": 0,
    "prefix_calls": 0,
    "skipped_reasons": {},  # reason -> layers skipped for it
}


def _kind(model: Any, layer_name: str, method: str) -> str:
    """Which COUNTS key a patched layer adds to: what its active adapter is at patch time."""
    if method != "LoRA":
        return "patched_prefix"
    layer = model.get_submodule(layer_name)
    adapter = layer.active_adapters[0]
    if adapter in layer.lora_variant:  # the one variant patch_peft takes
        return "patched_dora"
    if layer.lora_bias.get(adapter, False):
        return "patched_lora_bias"
    return "patched_lora"


def _patched(build: Any) -> Any:
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import peftkern

        model = build(*args, **kwargs)
        report = peftkern.patch_peft(model)
        COUNTS["models"] += 1
        COUNTS["layers_patched"] += report.num_patched
        COUNTS["layers_skipped"] += report.num_skipped
        for name in report.patched:
            COUNTS[_kind(model, name, report.method)] += 1
        reasons = COUNTS["skipped_reasons"]
        for reason in report.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return model

    return wrapper


def _counted(function: Any, key: str) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key] += 1
        return function(*args, **kwargs)

    return wrapper


def pytest_configure(config: Any) -> None:
    import peft
    import peft.mapping_func
    from peft import PeftModel

    from peftkern.integrations import peft_patch, peft_patch_prefix

    wrapped = _patched(peft.mapping_func.get_peft_model)
    peft.get_peft_model = peft.mapping_func.get_peft_model = wrapped
    from_pretrained = PeftModel.from_pretrained.__func__
    PeftModel.from_pretrained = classmethod(_patched(from_pretrained))
    peft_patch.lora_linear = _counted(peft_patch.lora_linear, "fused_lora_calls")
    peft_patch.dora_linear = _counted(peft_patch.dora_linear, "fused_dora_calls")
    peft_patch_prefix.attend_with_prefix = _counted(peft_patch_prefix.attend_with_prefix, "prefix_calls")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("PEFTKERN_PEER_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump(COUNTS, f, indent=1)
