"""fxlra.distributed with 2 gloo processes on the CPU: after several steps the parameters and
error synapses are identical on both ranks and equal a one-process run on the concatenated batch
(float64); updates travel in several buckets."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxlra
import fxlra.distributed as fdist

STEPS, PER_RANK = 4, 6


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(),
                         nn.Linear(7, 4)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * PER_RANK, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (2 * PER_RANK,), generator=g)) for _ in range(STEPS)]


def train(prog, data, rank=None):
    opt = torch.optim.Adam(prog.parameters(), lr=1e-2)
    for x, y in data:
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        prog.step(x, y)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in prog.named_parameters()}


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    got_rank, world, device = fdist.init()
    assert (got_rank, world, device.type) == (rank, 2, "cpu")
    # different seeds: data_parallel must give both ranks rank 0's start
    prog = fdist.data_parallel(fxlra.compile(make_model(seed=rank), wiring="pairwise"),
                               bucket_mb=0.0005)
    state = train(prog, batches(), rank)
    state["buckets"] = torch.tensor(prog.reducer.buckets_launched)
    state["sum"] = torch.tensor(fdist.all_reduce_sum([rank + 1.0])[0])
    torch.save(state, f"{out}.{rank}")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{k}", weights_only=True) for k in (0, 1))
    assert int(r0.pop("buckets")) > STEPS and int(r1.pop("buckets")) > STEPS   # several buckets
    assert float(r0.pop("sum")) == float(r1.pop("sum")) == 3.0
    single = train(fxlra.compile(make_model(seed=0), wiring="pairwise"), batches())
    assert r0.keys() == r1.keys() == single.keys()
    assert any(n.startswith("synapses.") for n in single)
    for n in single:
        assert torch.equal(r0[n], r1[n]), f"{n} differs between ranks"
        torch.testing.assert_close(r0[n], single[n], rtol=1e-12, atol=1e-12, msg=n)
    start = dict(make_model(seed=0).named_parameters())
    assert not torch.equal(single["model.0.weight"], start["0.weight"])       # it trained


def test_data_parallel_needs_an_initialised_process_group():
    with pytest.raises(fxlra.FxlraError, match="fxlra.distributed.init()"):
        fdist.data_parallel(fxlra.compile(make_model(0)))


def test_a_single_process_is_rank_0_of_1():
    assert (fdist.rank(), fdist.world_size(), fdist.is_main()) == (0, 1, True)
    assert fdist.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
