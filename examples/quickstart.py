"""peftkern in one minute: wrap the linears of a small model with LoRALinear, fine-tune only
the adapters on a toy regression task, then merge them for zero-overhead inference.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import peftkern


def main() -> None:
    torch.manual_seed(0)
    info = peftkern.build_info()
    print(
        f"peftkern {info['version']}: CPU kernels {info['cpu_isa']}, CUDA kernels {'yes' if info['cuda'] else 'no'}"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # A "pretrained" base model, and a target that differs from it by a low-rank update:
    # the situation LoRA is made for.
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(device)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(device)
    teacher.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            out_f, in_f = layer.weight.shape
            layer.weight += (
                0.1 * torch.randn(out_f, 4, device=device) @ torch.randn(4, in_f, device=device) / 4
            )

    # One line per layer: the base weights are shared and frozen, only A and B train.
    model[0] = peftkern.LoRALinear.from_linear(model[0], r=8, lora_alpha=16, lora_dropout=0.05)
    model[2] = peftkern.LoRALinear.from_linear(model[2], r=8, lora_alpha=16, lora_dropout=0.05)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.1f} %)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x_val = torch.randn(512, 64, device=device)
    for step in range(301):
        x = torch.randn(256, 64, device=device)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                model.eval()
                val = nn.functional.mse_loss(model(x_val), teacher(x_val)).item()
                model.train()
            print(f"step {step:3d}  train loss {loss.item():.5f}  validation loss {val:.5f}")

    model.eval()
    with torch.no_grad():
        before = model(x_val)
        for layer in (model[0], model[2]):
            layer.merge()  # W += s·B·A: inference now costs exactly a plain nn.Linear
        print(f"merged: max change of outputs {(model(x_val) - before).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
