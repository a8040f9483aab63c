"""FSDP2 (`fully_shard`) with shared tensor-network cores, 2 CPU processes on gloo.

Decoder layers are their own FSDP units; the shared store lives in the root unit, so every
shared core is in one unit, and adapters look shared tensors up at call time, so they see
FSDP's sharded/unsharded parameters. Training must equal one process on the same batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.inject import inject_adapter

SETTINGS = {"trac": {"r": 4}, "vera": {"r": 16}, "tera": {"outdim": 4}}


def _train(model_path: str, kind: str, steps: int, fsdp: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    inject_adapter(model, REGISTRY[kind].config_class(target_modules=["q_proj", "v_proj"], **SETTINGS[kind]))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return state


def _worker(rank: int, world: int, rendezvous: str, model_path: str, kind: str, out: str) -> None:
    # A file rendezvous: no TCP port to race for with other tests.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        state = _train(model_path, kind, 3, fsdp=True)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_fsdp2_with_shared_cores_matches_one_process(tiny_models, tmp_path, kind):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 not in this torch")
    out = tmp_path / "fsdp.safetensors"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tiny_models["llama"]), kind, str(out)), nprocs=2)
    sharded = load_file(str(out))
    single = _train(str(tiny_models["llama"]), kind, 3, fsdp=False)
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    if kind == "trac":  # its trainable shared cores (zero-started for B) were trained under FSDP
        assert any(name.startswith("tnlora_shared") and single[name].abs().sum() > 0 for name in single)
