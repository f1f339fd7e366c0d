"""Distributed parity: 2 gloo processes, each a DDP-wrapped linear encoder on its half of the batch,
give the same averaged loss value and the same parameter gradients as one process on the
concatenated batch — for every loss of the family, over two optimizer steps (so stateful losses
are also checked for keeping the ranks' state in sync). Float64, tolerance 1e-9 relative.

Stochastic and stateful losses are exactly comparable: mochi's mixing draws come from a generator
seeded by (seed, step) and are drawn for all global anchors on every rank; swav's prototypes are
seeded and its codes use the gathered scores; isogclr's per-sample state is gathered after each
update. One spawn runs every loss in the same process group to keep the test fast.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaling import dist
from scaling.losses import LOSS_NAMES, build_loss

WORLD = 2
N, D_IN, D_OUT, STEPS = 8, 6, 5, 2
EXTRA = {"swav": {"n_prototypes": 7, "dim": D_OUT}, "mochi": {"n_hard": 6, "s": 5, "s_prime": 3, "seed": 11}}
CONFIGS = [(name, v) for name in LOSS_NAMES for v in (2, 3)]


def batch(v: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * v + step)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return torch.stack([x + 0.5 * torch.randn(N, D_IN, generator=g, dtype=torch.float64) for _ in range(v)])


def build(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    encoder = nn.Linear(D_IN, D_OUT).double()
    loss = build_loss(name, temperature=0.3, dataset_size=3 * N, **EXTRA.get(name, {})).double()
    return encoder, loss


def run(name: str, v: int, model: nn.Module, encoder: nn.Module, loss: nn.Module, rows: slice) -> list[dict]:
    """STEPS SGD steps; per step the (rank-averaged) value and every parameter's gradient."""
    params = list(encoder.parameters()) + list(loss.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    out = []
    for step in range(STEPS):
        x = batch(v, step)[:, rows]
        index = (torch.arange(N) + 4 * step)[rows]  # dataset indices; the two steps overlap partly
        value = loss(model(x), index=index)
        opt.zero_grad()
        value.backward()
        grads = {f"encoder.{k}": p.grad.clone() for k, p in encoder.named_parameters()}
        grads.update({f"loss.{k}": p.grad.clone() for k, p in loss.named_parameters()})
        opt.step()
        out.append({"value": dist.all_reduce_mean(value.detach()), "grads": grads,
                    "buffers": {k: b.clone() for k, b in loss.named_buffers()}})
    return out


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert dist.world_size() == WORLD and dist.rank() == rank
        n = N // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        results = {}
        for name, v in CONFIGS:
            encoder, loss = build(name)
            model = DistributedDataParallel(encoder)
            results[(name, v)] = run(name, v, model, encoder, loss, rows)
        torch.save(results, Path(outdir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results() -> list[dict]:
    with tempfile.TemporaryDirectory() as outdir:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("name", "v"), CONFIGS)
def test_two_processes_match_one_process(distributed_results: list[dict], name: str, v: int) -> None:
    assert dist.world_size() == 1
    encoder, loss = build(name)
    single = run(name, v, encoder, encoder, loss, slice(0, N))
    for r, ranks in enumerate(distributed_results):
        for step, (got, ref) in enumerate(zip(ranks[(name, v)], single)):
            where = f"{name} V={v} rank {r} step {step}"
            torch.testing.assert_close(got["value"], ref["value"], rtol=1e-9, atol=1e-12, msg=f"value, {where}")
            assert got["grads"].keys() == ref["grads"].keys()
            for k in ref["grads"]:
                torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=1e-9, atol=1e-12, msg=f"{k}, {where}")
            for k in ref["buffers"]:  # every rank holds the single process's loss state
                torch.testing.assert_close(got["buffers"][k], ref["buffers"][k], rtol=1e-9, atol=1e-12, msg=f"{k}, {where}")
