"""Sample calls of every torch.ops.peftkern operator, for the opcheck test.

A new op adds its samples here; test_opcheck fails for any registered op without samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _lora_linear_samples(device: str) -> list[tuple]:
    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    seed = torch.tensor([42], dtype=torch.int64, device=device)
    return [
        (t(5, 16), t(12, 16), t(12), t(4, 16), t(12, 4), 2.0, 0.0, None),
        (t(2, 3, 16), t(12, 16, grad=False), None, t(4, 16), t(12, 4), 0.5, 0.25, seed),
        (t(0, 16), t(12, 16), t(12), t(4, 16), t(12, 4), 1.0, 0.0, None),
        (
            t(3, 8, dtype=torch.bfloat16),
            t(6, 8, dtype=torch.bfloat16, grad=False),
            None,
            t(2, 8),
            t(6, 2),
            1.0,
            0.1,
            seed,
        ),
    ]


def _lora_linear_backward_samples(device: str) -> list[tuple]:
    samples = []
    for x, weight, bias, lora_A, lora_B, scaling, dropout, seed in _lora_linear_samples(device):
        y, S = torch.ops.peftkern.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)
        grad_y = torch.randn_like(y)
        for mask in (
            [True, True, True, True, True],
            [True, False, False, True, True],
            [False, False, False, True, False],
        ):
            samples.append(
                (
                    grad_y,
                    x.detach(),
                    weight.detach(),
                    lora_A.detach(),
                    lora_B.detach(),
                    S,
                    scaling,
                    dropout,
                    seed,
                    mask,
                )
            )
    return samples


def _bottleneck_adapter_samples(device: str) -> list[tuple]:
    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    return [
        (t(5, 16), t(4, 16), t(4), t(16, 4), t(16), "relu", 0.5, None, None),
        (t(2, 3, 16), t(4, 16), None, t(16, 4), None, "gelu", 1.0, t(16), t(2, 3, 16)),
        (t(0, 16), t(4, 16), t(4), t(16, 4), t(16), "silu", 1.0, None, None),
        (
            t(3, 8, dtype=torch.bfloat16),
            t(2, 8, dtype=torch.bfloat16),
            t(2, dtype=torch.bfloat16),
            t(8, 2, dtype=torch.bfloat16),
            t(8, dtype=torch.bfloat16),
            "gelu_tanh",
            2.0,
            t(8, dtype=torch.bfloat16),
            None,
        ),
    ]


def _bottleneck_adapter_backward_samples(device: str) -> list[tuple]:
    samples = []
    for (
        h,
        w_down,
        b_down,
        w_up,
        b_up,
        activation,
        scaling,
        scaling_vector,
        residual,
    ) in _bottleneck_adapter_samples(device):
        out, Z = torch.ops.peftkern.bottleneck_adapter(
            h, w_down, b_down, w_up, b_up, activation, scaling, scaling_vector, residual
        )
        grad_out = torch.randn_like(out)
        s = scaling_vector.detach() if scaling_vector is not None else None
        b = b_up.detach() if b_up is not None else None
        for mask in (
            [True] * 6,
            [True, False, False, True, True, False],
            [False, False, False, False, True, True],
        ):
            samples.append(
                (
                    grad_out,
                    h.detach(),
                    w_down.detach(),
                    w_up.detach(),
                    b,
                    Z,
                    activation,
                    scaling,
                    s,
                    residual is None,
                    mask,
                )
            )
    return samples


def _prefix_attention_samples(device: str) -> list[tuple]:
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    mask = torch.tensor([[True, True, False, True, True], [False] * 5], device=device)
    return [
        (t(2, 4, 5, 8), t(2, 2, 5, 8), t(2, 2, 5, 8), t(2, 3, 8), t(2, 3, 8), mask, True, 0.35),
        (t(2, 2, 5, 8), t(2, 2, 5, 8), t(2, 2, 5, 8), t(2, 2, 1, 8), t(2, 2, 1, 8), None, False, 0.5),
        (t(1, 2, 3, 8), t(1, 1, 3, 8), t(1, 1, 3, 8), t(1, 0, 8), t(1, 0, 8), None, True, 0.35),
        # q, k, v in the [B, n, H, d] memory of projections: out and grads keep that layout.
        (
            *(x.transpose(1, 2) for x in (t(2, 5, 4, 8), t(2, 5, 2, 8), t(2, 5, 2, 8))),
            t(2, 3, 8),
            t(2, 3, 8),
            mask,
            True,
            0.35,
        ),
        (
            t(1, 2, 4, 16, dtype=torch.bfloat16),
            t(1, 2, 4, 16, dtype=torch.bfloat16),
            t(1, 2, 4, 16, dtype=torch.bfloat16),
            t(2, 2, 16, dtype=torch.bfloat16),
            t(2, 2, 16, dtype=torch.bfloat16),
            None,
            True,
            0.25,
        ),
        # Half precision, GQA, projection layout, no mask: the FlashAttention path on a GPU.
        (
            *(
                x.transpose(1, 2)
                for x in (
                    t(2, 5, 4, 16, dtype=torch.bfloat16),
                    t(2, 5, 2, 16, dtype=torch.bfloat16),
                    t(2, 5, 2, 16, dtype=torch.bfloat16),
                )
            ),
            t(2, 3, 16, dtype=torch.bfloat16),
            t(2, 3, 16, dtype=torch.bfloat16),
            None,
            False,
            0.25,
        ),
    ]


def _prefix_attention_backward_samples(device: str) -> list[tuple]:
    samples = []
    for q, k, v, prefix_k, prefix_v, mask, causal, scale in _prefix_attention_samples(device):
        out, lse = torch.ops.peftkern.prefix_attention(q, k, v, prefix_k, prefix_v, mask, causal, scale)
        inputs = [t.detach() for t in (q, k, v, prefix_k, prefix_v)]
        for output_mask in ([True] * 5, [False, False, False, True, True]):
            samples.append(
                (torch.randn_like(out), *inputs, mask, out.detach(), lse, causal, scale, output_mask)
            )
    return samples


SAMPLES: dict[str, Callable[[str], list[tuple]]] = {
    "lora_linear": _lora_linear_samples,
    "lora_linear_backward": _lora_linear_backward_samples,
    "bottleneck_adapter": _bottleneck_adapter_samples,
    "bottleneck_adapter_backward": _bottleneck_adapter_backward_samples,
    "prefix_attention": _prefix_attention_samples,
    "prefix_attention_backward": _prefix_attention_backward_samples,
}


def _linear_cross_entropy_samples(device: str) -> list[tuple]:
    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    labels = torch.tensor([3, -100, 0, 10, 7], device=device)
    return [
        (t(5, 16), t(11, 16), t(11), labels, -100, "mean", 0.0, None, [True, True, True]),
        (t(5, 16), t(11, 16, grad=False), None, labels, -100, "sum", 0.1, 30.0, [True, False, False]),
        (t(5, 16), t(11, 16), None, labels.view(5, 1), -100, "none", 0.0, None, [True, True, False]),
        (t(0, 16), t(11, 16), None, labels[:0], -100, "sum", 0.0, None, [True, True, False]),
        (
            t(5, 8, dtype=torch.bfloat16),
            t(11, 8, dtype=torch.bfloat16),
            None,
            labels,
            -100,
            "mean",
            0.0,
            None,
            [True, True, False],
        ),
    ]


def _linear_cross_entropy_backward_samples(device: str) -> list[tuple]:
    samples = []
    for hidden, weight, bias, labels, ignore, reduction, eps, cap, _ in _linear_cross_entropy_samples(device):
        loss, *_ = torch.ops.peftkern.linear_cross_entropy(
            hidden, weight, bias, labels, ignore, reduction, eps, cap, [False] * 3
        )
        inputs = (hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels)
        for mask in ([True, True, True], [True, False, False]):
            samples.append((torch.randn_like(loss), *inputs, ignore, reduction, eps, cap, mask))
    return samples


SAMPLES["linear_cross_entropy"] = _linear_cross_entropy_samples
SAMPLES["linear_cross_entropy_backward"] = _linear_cross_entropy_backward_samples


def _dora_linear_samples(device: str) -> list[tuple]:
    samples = []
    for x, weight, bias, lora_A, lora_B, scaling, dropout, seed in _lora_linear_samples(device):
        norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        norm_sq = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=norm_dtype).square()
        magnitude = (norm_sq.sqrt() * 1.5).to(lora_A.dtype).requires_grad_()
        samples.append((x, weight, bias, lora_A, lora_B, magnitude, norm_sq, scaling, dropout, seed))
    return samples


def _dora_linear_backward_samples(device: str) -> list[tuple]:
    samples = []
    for args in _dora_linear_samples(device):
        x, weight, bias, lora_A, lora_B, magnitude, norm_sq, scaling, dropout, seed = args
        y, S, z, norm = torch.ops.peftkern.dora_linear(*args)
        inputs = [t.detach() for t in (x, weight, lora_A, lora_B, magnitude)]
        for mask in (
            [True] * 6,
            [True, False, False, True, True, True],
            [False, True, False, False, False, True],
        ):
            samples.append((torch.randn_like(y), *inputs, S, z, norm, scaling, dropout, seed, mask))
    return samples


SAMPLES["dora_linear"] = _dora_linear_samples
SAMPLES["dora_linear_backward"] = _dora_linear_backward_samples
