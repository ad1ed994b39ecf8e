"""save_adapter / load_adapter: peftkern LoRA weights in `peft`'s on-disk format.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and
``.lora_magnitude_vector`` for DoRA, ``use_dora: true``), exactly what
``PeftModel.save_pretrained`` writes for the default adapter, so either library loads the
other's files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkern.integrations.inject import replace_with_lora
from peftkern.integrations.targets import is_plain_linear, name_matches
from peftkern.nn import DoRALinear, LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B")
# DoRA's magnitude: peft's key (no ".weight"), and the DoRALinear parameter it fills.
_MAGNITUDE_KEY = "lora_magnitude_vector"

# Config fields that mean something peftkern's LoRALinear does not compute; a file that sets
# any of them is refused rather than loaded into a model that would then be silently wrong.
_UNSUPPORTED = (
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "target_parameters",
)


class AdapterFormatError(ValueError):
    """An adapter directory that is corrupt, not LoRA, or does not fit the model."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError("peftkern: save_adapter/load_adapter need the `safetensors` package") from exc
    return safetensors.torch


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Writes through `write(tmp_path)` to a temporary file in path's directory, then renames
    it over `path`: a crash leaves the old file whole, never a half-written one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _shared_setting(layers: dict[str, LoRALinear], attr: str) -> Any:
    values = {getattr(layer, attr) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(
            f"peftkern: save_adapter needs one {attr} for all LoRA layers, found {sorted(values)}"
        )
    return values.pop()


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The short suffixes (q_proj, v_proj) when they select exactly the LoRA layers, as peft
    users write them; the full module paths otherwise."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = [n for n, m in model.named_modules() if n and name_matches(n, suffixes)]
    return suffixes if selected == names else names


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the LoRA weights of `model` (injected with peftkern) as a `peft` adapter
    directory at `path`, loadable with ``PeftModel.from_pretrained(base_model, path)``."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"peftkern: save_adapter: model {type(model).__name__} has no LoRALinear layers (call inject_lora first)"
        )
    if any(layer.merged for layer in layers.values()):
        raise ValueError("peftkern: save_adapter: some LoRA layers are merged; unmerge them first")
    names = list(layers)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": _shared_setting(layers, "r"),
        "lora_alpha": _shared_setting(layers, "lora_alpha"),
        "lora_dropout": _shared_setting(layers, "lora_dropout"),
        "use_rslora": _shared_setting(layers, "use_rslora"),
        "target_modules": _target_modules(model, names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": _shared_setting(layers, "use_dora"),
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {
        f"{_PREFIX}{name}.{factor}.weight": getattr(layer, factor).detach().contiguous().cpu()
        for name, layer in layers.items()
        for factor in _FACTORS
    }
    tensors.update(
        {
            f"{_PREFIX}{name}.{_MAGNITUDE_KEY}": layer.magnitude.detach().contiguous().cpu()
            for name, layer in layers.items()
            if isinstance(layer, DoRALinear)
        }
    )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    st = _safetensors()
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: st.save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(
        directory / CONFIG_NAME,
        lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)),
    )


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"peftkern: load_adapter: {file} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"peftkern: load_adapter: {file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(
            f"peftkern: load_adapter: {file} holds a {type(config).__name__}, not a JSON object"
        )
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(
            f"peftkern: load_adapter: {file} has peft_type={config.get('peft_type')!r}; only 'LORA' is supported"
        )
    unsupported = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise AdapterFormatError(
            f"peftkern: load_adapter: {file} uses settings peftkern's LoRA does not support: {', '.join(unsupported)}"
        )
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise AdapterFormatError(
                f"peftkern: load_adapter: {file} has {key}={value!r}; expected a positive number"
            )
    return config


def _read_weights(directory: Path, use_dora: bool) -> dict[str, dict[str, Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B(, "magnitude": m)}} from the safetensors file,
    or an error."""
    file = directory / WEIGHTS_NAME
    if not file.exists():
        raise AdapterFormatError(f"peftkern: load_adapter: {file} does not exist")
    try:
        tensors = _safetensors().load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise AdapterFormatError(
            f"peftkern: load_adapter: {file} is not a readable safetensors file: {exc}"
        ) from exc
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if use_dora and key.startswith(_PREFIX) and key.endswith(f".{_MAGNITUDE_KEY}"):
            layers.setdefault(key[len(_PREFIX) : -len(_MAGNITUDE_KEY) - 1], {})["magnitude"] = tensor
            continue
        stem, _, suffix = key.rpartition(".")
        module_path, _, factor = stem.rpartition(".")
        if not key.startswith(_PREFIX) or suffix != "weight" or factor not in _FACTORS:
            raise AdapterFormatError(
                f"peftkern: load_adapter: {file} has key {key!r}, "
                f"not of the form {_PREFIX}<module>.lora_A|lora_B.weight"
            )
        layers.setdefault(module_path[len(_PREFIX) :], {})[factor] = tensor
    expected = {*_FACTORS, "magnitude"} if use_dora else set(_FACTORS)
    incomplete = [name for name, factors in layers.items() if set(factors) != expected]
    if incomplete or not layers:
        what = f"lora_A, lora_B or {_MAGNITUDE_KEY} (use_dora=true)" if use_dora else "lora_A or lora_B"
        raise AdapterFormatError(
            f"peftkern: load_adapter: {file} lacks {what} for: {incomplete or '(every layer)'}"
        )
    return layers


def _check_fits(
    model: nn.Module, weights: dict[str, dict[str, Tensor]], config: dict[str, Any], where: Path
) -> None:
    """Every tensor has a module of the right shape to go to, and the scaling agrees."""
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    for name, factors in weights.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterFormatError(
                f"peftkern: load_adapter: {where} has weights for {name!r}, which {type(model).__name__} lacks"
            ) from None
        if not (isinstance(module, LoRALinear) or is_plain_linear(module)):
            raise AdapterFormatError(
                f"peftkern: load_adapter: {where} has weights for {name!r}, a {type(module).__name__}, not nn.Linear"
            )
        expected = {
            "lora_A": (r, module.in_features),
            "lora_B": (module.out_features, r),
            "magnitude": (module.out_features,),
        }
        use_dora = bool(config.get("use_dora"))
        if isinstance(module, LoRALinear) and isinstance(module, DoRALinear) != use_dora:
            raise AdapterFormatError(
                f"peftkern: load_adapter: {name} is a {type(module).__name__} but {where} has "
                f"use_dora={use_dora}"
            )
        for factor, tensor in factors.items():
            if tuple(tensor.shape) != expected[factor] or not tensor.is_floating_point():
                raise AdapterFormatError(
                    f"peftkern: load_adapter: {where}: {name}.{factor} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"expected {expected[factor]} floating point (r={r})"
                )
        if isinstance(module, LoRALinear) and not math.isclose(module.scaling, scaling, rel_tol=1e-6):
            raise AdapterFormatError(
                f"peftkern: load_adapter: {name} has scaling {module.scaling} but {where} has {scaling} "
                f"(lora_alpha={config['lora_alpha']}, r={r}, use_rslora={config.get('use_rslora', False)})"
            )
    injected = set(_lora_layers(model))
    if injected and injected != set(weights):
        raise AdapterFormatError(
            f"peftkern: load_adapter: the model's LoRA layers and {where} differ: "
            f"only in model {sorted(injected - set(weights))[:5]}, only in file {sorted(set(weights) - injected)[:5]}"
        )


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Loads a `peft` LoRA adapter directory into `model` and returns the module paths loaded.

    A model already injected must have exactly the file's LoRA layers with the same scaling;
    a plain model gets LoRALinear layers injected where the file has weights (frozen base,
    trainable adapters). Everything is validated before anything changes: on any error the
    model is left as it was."""
    directory = Path(path)
    config = _read_config(directory)
    weights = _read_weights(directory, bool(config.get("use_dora")))
    _check_fits(model, weights, config, directory)
    to_inject = [n for n in weights if not isinstance(model.get_submodule(n), LoRALinear)]
    if to_inject:
        replace_with_lora(
            model,
            to_inject,
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
        )
    for name, factors in weights.items():
        layer = model.get_submodule(name)
        layer.lora_A.copy_(factors["lora_A"])
        layer.lora_B.copy_(factors["lora_B"])
        if "magnitude" in factors:
            layer.magnitude.copy_(factors["magnitude"])
    return list(weights)
