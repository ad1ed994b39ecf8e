"""use_peftkern_loss: a transformers causal LM computes its training loss with
peftkern.linear_cross_entropy, so the [batch, seq, vocab] logits and their gradient never
exist.

The model's own forward runs unchanged, with one difference while `labels` are given: its
output head (``get_output_embeddings()``, an ``nn.Linear``) hands back the hidden states it
receives instead of logits. The loss is then the fused op over those hidden states and the
head's weight and bias, with the model's label shift, ``ignore_index`` of -100, Gemma 2's
``final_logit_softcapping``, and ``num_items_in_batch`` (a sum divided by it, as Trainer's
gradient accumulation asks) exactly as transformers' ``ForCausalLMLoss`` does. The output's
``logits`` is None in that case (as with Liger-Kernel); without labels the model returns
logits as usual. peft models (LoRA, prefix tuning and the other prompt-learning methods) pass
their labels through to the transformers model, which is the one patched. A call that asks for
TRL's own chunked LM head (``fused_lm_head=True``, as TRL's trainers do) goes to it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkern.functional import linear_cross_entropy
from peftkern.integrations.binding import bind, bound_function, unbind

WHO = "use_peftkern_loss"
IGNORE_INDEX = -100
# An instance-level forward the patch found (accelerate's hooks install one), kept on the
# model: the patched forward calls it, and restore_loss puts it back.
_ORIGINAL = "_peftkern_original_forward"


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, for a plain one or a peft model wrapping it."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    if getattr(base, "config", None) is None or not callable(getattr(base, "get_output_embeddings", None)):
        raise ValueError(
            f"peftkern: {WHO} needs a transformers causal LM (or a peft model of one), got {type(base).__name__}"
        )
    return base


def _output_head(base: nn.Module) -> nn.Linear:
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"peftkern: {WHO} needs the model's output head to be an nn.Linear (the fused loss "
            f"multiplies by its weight), got {type(head).__name__}; a head wrapped by an adapter "
            "is not supported"
        )
    return head


class _HiddenStatesFromHead:
    """While active, `head` returns a [..., 0] tensor instead of logits and records its input.

    The model's forward keeps working on the empty logits (a softcap, .float(), slicing)
    at no cost, while the hidden states go to the fused loss."""

    def __init__(self, head: nn.Linear) -> None:
        self.head = head
        self.hidden: Tensor | None = None

    def _capture(self, hidden: Tensor) -> Tensor:
        self.hidden = hidden
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def __enter__(self) -> _HiddenStatesFromHead:
        self.head.forward = self._capture
        return self

    def __exit__(self, *exc: object) -> None:
        del self.head.forward


def causal_lm_loss(
    hidden: Tensor,
    head: nn.Linear,
    labels: Tensor,
    *,
    softcap: float | None = None,
    num_items_in_batch: Tensor | int | None = None,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """transformers' ForCausalLMLoss on ``head(hidden)``, through the fused op: position t
    predicts labels[t + 1]; a mean over counted tokens, or a sum divided by
    ``num_items_in_batch`` when given."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden,
        head.weight,
        shift_labels,
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        softcap=softcap,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_loss_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched forward (bound with `binding.bind`, so a pickled or copied model is patched
    in its own right): the model's own forward, with the loss through the fused op."""
    original_forward = self.__dict__.get(_ORIGINAL) or type(self).forward.__get__(self)
    if kwargs.get("fused_lm_head"):
        # TRL's trainers install their own chunked LM head (trl's add_fused_lm_head, an instance
        # forward kept here as the original) and ask for it per call: it scores the labels
        # without logits already, and needs them.
        return original_forward(*args, **kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return original_forward(*args, **kwargs)
    shift_labels = kwargs.pop("shift_labels", None)
    with _HiddenStatesFromHead(_output_head(self)) as captured:
        outputs = original_forward(*args, **kwargs)
    if captured.hidden is None:
        raise RuntimeError(f"peftkern: {WHO}: the model's forward never called its output head")
    loss = causal_lm_loss(
        captured.hidden,
        captured.head,
        labels,
        softcap=getattr(self.config, "final_logit_softcapping", None),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        shift_labels=shift_labels,
    )
    if isinstance(outputs, tuple):  # return_dict=False: (logits, ...) becomes (loss, ...)
        return (loss, *outputs[1:])
    # A new output of the model's class: loss first, as the model's own would have it.
    return type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k != "logits"})


def use_peftkern_loss(model: nn.Module) -> nn.Module:
    """Makes a transformers causal LM (or a peft model of one) compute its training loss with
    peftkern's fused linear + cross-entropy: the same loss and gradients, no logits (the
    output's ``logits`` is None whenever ``labels`` are given). Undo with ``restore_loss``.
    Returns the model."""
    base = _transformers_model(model)
    _output_head(base)
    if bound_function(base) is not _fused_loss_forward:
        instance_forward = base.__dict__.pop("forward", None)
        if instance_forward is not None:
            base.__dict__[_ORIGINAL] = instance_forward
        bind(base, _fused_loss_forward)
    return model


def restore_loss(model: nn.Module) -> nn.Module:
    """Undoes ``use_peftkern_loss``: the model's own forward (and logits) again."""
    base = _transformers_model(model)
    if bound_function(base) is _fused_loss_forward:
        unbind(base)
        instance_forward = base.__dict__.pop(_ORIGINAL, None)
        if instance_forward is not None:
            base.__dict__["forward"] = instance_forward
    return model
