"""Two CPU processes (gloo) with DDP and FSDP2 train an injected model (and DDP a patched peft
model) to the same adapter weights as one process on the same global batch: peftkern must not
break data parallelism."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import peftkern
from lora_models import lora_factors, tiny_llama, tokens

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4


def build_model() -> torch.nn.Module:
    model = tiny_llama()
    peftkern.inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    return model.train()


def build_patched_peft_model() -> torch.nn.Module:
    """The `peft` equivalent of build_model (same weights), patched by peftkern."""
    from peft import LoraConfig, get_peft_model

    injected = build_model()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    source = lora_factors(injected)
    with torch.no_grad():
        for key, p in lora_factors(model).items():
            p.copy_(source[key])
    assert peftkern.patch_peft(model).num_patched == 4
    return model.train()


def train(model: torch.nn.Module, rank: int = 0, world: int = 1) -> None:
    """STEPS AdamW steps; each rank takes its equal slice of every global batch, so the mean
    of the ranks' losses (what DDP/FSDP average the grads of) is the global-batch loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = tokens(batch=GLOBAL_BATCH, seq=12, seed=100 + step)[rank * per_rank:(rank + 1) * per_rank]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def full_lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # FSDP2 keeps parameters as sharded DTensors between steps: gather them whole.
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in lora_factors(model).items()}


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def train_ddp(rank: int, build=build_model) -> dict[str, torch.Tensor]:
    model = build()
    train(torch.nn.parallel.DistributedDataParallel(model), rank, WORLD)
    return full_lora_factors(model)


def train_fsdp2(rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, rank, WORLD)
    return full_lora_factors(model)


def worker(rank: int, port: int, out: str) -> None:
    # Both modes in one pair of processes: starting a process (importing transformers) costs
    # more than the training itself.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {"ddp": train_ddp(rank), "ddp-patched-peft": train_ddp(rank, build_patched_peft_model)}
        if fsdp2_available():
            results["fsdp2"] = train_fsdp2(rank)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_factors(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("dist") / "factors.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def single_process_factors() -> dict[str, torch.Tensor]:
    model = build_model()
    train(model)
    return full_lora_factors(model)


@pytest.mark.parametrize("mode", ["ddp", "ddp-patched-peft", "fsdp2"])
def test_two_processes_match_one(mode, two_process_factors, single_process_factors):
    if mode == "fsdp2" and not fsdp2_available():
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch")
    factors = two_process_factors[mode]
    assert factors.keys() == single_process_factors.keys() and len(factors) == 8
    initial = lora_factors(build_model())
    for key, expected in single_process_factors.items():
        assert not torch.equal(expected, initial[key])  # the steps did move the weights
        torch.testing.assert_close(factors[key], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
