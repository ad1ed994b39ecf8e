"""Two CPU processes (gloo) with DDP and FSDP2 train a model with each peftkern method injected
(LoRA, bottleneck adapters, prefix with and without the MLP reparameterisation), and DDP a
patched peft model, to the same trainable weights as one process on the same global batch:
peftkern must not break data parallelism."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lora_models import common_key, lora_factors, tiny_llama, tiny_llama_with, tokens

import peftkern

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4
# Pfeiffer is Houlsby's mechanism at fewer positions; "prefix-mlp" keeps a module tree of
# parameters outside the transformer layers, which FSDP2 shards with the root.
METHODS = ("lora", "houlsby", "prefix", "prefix-mlp")
MODES = ("ddp", "fsdp2")
CASES = [(mode, method) for mode in MODES for method in METHODS] + [("ddp-patched-peft", "lora")]

Weights = dict[str, torch.Tensor]


def build_patched_peft_model() -> torch.nn.Module:
    """The `peft` equivalent of tiny_llama_with("lora") (same weights), patched by peftkern."""
    from peft import LoraConfig, get_peft_model

    source = lora_factors(tiny_llama_with("lora"))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
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
        batch = tokens(batch=GLOBAL_BATCH, seq=12, seed=100 + step)[rank * per_rank : (rank + 1) * per_rank]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trainable_weights(model: torch.nn.Module) -> Weights:
    """Every trainable parameter, whole (FSDP2 keeps them as sharded DTensors between steps),
    keyed alike for a peft and an injected model."""
    return {
        common_key(name): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def train_ddp(rank: int, build: Callable[[], torch.nn.Module]) -> Weights:
    model = build()
    train(torch.nn.parallel.DistributedDataParallel(model), rank, WORLD)
    return trainable_weights(model)


def train_fsdp2(rank: int, build: Callable[[], torch.nn.Module]) -> Weights:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    # The root takes what no layer holds: embeddings, head and the prefix encoder, whose rows
    # a pre-hook computes inside the root's forward, after the root has gathered them.
    fully_shard(model, mesh=mesh)
    train(model, rank, WORLD)
    return trainable_weights(model)


def worker(rank: int, port: int, out: str) -> None:
    # Every case in one pair of processes: starting a process (importing transformers) costs
    # more than the training itself.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    trainers = {"ddp": train_ddp, "fsdp2": train_fsdp2, "ddp-patched-peft": train_ddp}
    try:
        results = {}
        for mode, method in CASES:
            if mode == "fsdp2" and not fsdp2_available():
                continue
            build = (
                build_patched_peft_model if mode == "ddp-patched-peft" else lambda: tiny_llama_with(method)
            )
            results[mode, method] = trainers[mode](rank, build)
        if rank == 0:
            torch.save(results, out)
        # Both ranks reach this point before either tears its process group down: a rank that
        # destroyed it while the other's gloo threads were still winding down its last
        # collectives aborted now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_weights(tmp_path_factory) -> dict[tuple[str, str], Weights]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("dist") / "weights.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def single_process_weights() -> dict[str, Weights]:
    weights = {}
    for method in METHODS:
        model = tiny_llama_with(method)
        train(model)
        weights[method] = trainable_weights(model)
    return weights


@pytest.mark.parametrize("mode, method", CASES)
def test_two_processes_match_one(mode, method, two_process_weights, single_process_weights):
    if mode == "fsdp2" and not fsdp2_available():
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch")
    weights, expected = two_process_weights[mode, method], single_process_weights[method]
    initial = trainable_weights(tiny_llama_with(method))
    assert weights.keys() == expected.keys() == initial.keys() and weights
    for key, value in expected.items():
        assert not torch.allclose(value, initial[key], rtol=0, atol=1e-3), (
            key
        )  # the steps did move the weights
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
