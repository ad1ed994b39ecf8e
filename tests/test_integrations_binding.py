"""binding: the one way an integration replaces a module instance's forward; a bound forward
survives pickle, torch.save and deepcopy, and runs the copy it belongs to."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from lora_models import tiny_bert, tokens
from torch import nn

import peftkern
from peftkern.integrations.binding import BoundForward, bind, bound_function, unbind

PREPARED: list[str] = []


def doubled(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 2 * type(module).forward(module, x)


def prepare() -> None:
    PREPARED.append("prepared")


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickled, "torch.save": _saved_and_loaded, "deepcopy": copy.deepcopy}


def test_bind_unbind_and_the_one_marker():
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    plain = layer(x)
    assert bound_function(layer) is None and not unbind(layer)
    bind(layer, doubled)
    assert bound_function(layer) is doubled and isinstance(layer.forward, BoundForward)
    torch.testing.assert_close(layer(x), 2 * plain)
    assert "forward" not in dict(layer.named_children()) and list(layer.state_dict()) == ["weight", "bias"]
    assert unbind(layer) and bound_function(layer) is None
    torch.testing.assert_close(layer(x), plain)
    layer.forward = lambda x: x  # replaced by someone else: not ours to report or remove
    assert bound_function(layer) is None and not unbind(layer)


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_a_bound_forward_round_trips_with_its_module_and_prepares_again(trip):
    model = nn.Sequential(nn.Linear(3, 2))
    bind(model[0], doubled, prepare=prepare)
    assert PREPARED == ["prepared"]
    PREPARED.clear()
    loaded = ROUND_TRIPS[trip](model)
    assert PREPARED == ["prepared"]  # rebuilt in a process that may not have prepared yet
    assert bound_function(loaded[0]) is doubled and loaded[0].forward.module is loaded[0]
    with torch.no_grad():
        loaded[0].weight.zero_()
        loaded[0].bias.fill_(1.0)
    torch.testing.assert_close(loaded(torch.randn(4, 3)), torch.full((4, 2), 2.0))  # the copy's weights
    PREPARED.clear()


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_injected_bert_adapters_round_trip(trip):
    model = tiny_bert()
    peftkern.inject_adapters(model, "houlsby")
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(std=0.3)
    loaded = ROUND_TRIPS[trip](model)
    blocks = [m for m in loaded.modules() if bound_function(m) is not None]
    assert len(blocks) == 2 * model.config.num_hidden_layers
    assert all(m.forward.module is m for m in blocks)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state)
