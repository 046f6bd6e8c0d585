"""``STPStep`` in the user's own loop on converted models: training (loss falls), selection and export under a
30% MACs budget, bf16 autocast, gradient accumulation, checkpoint/resume, DDP, and bad input."""

from __future__ import annotations

import copy
import gc
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from zoo import HF_KINDS, LOCAL_KINDS, build

import stp_fast
from stp_fast import STPStep, convert
from stp_fast.dropin import ConversionError

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = [pytest.param(k, marks=pytest.mark.hf) if k in HF_KINDS else k for k in HF_KINDS + LOCAL_KINDS]
TINY = {"pool_size": 6, "subnets_per_step": 2, "final_candidates": 2, "calib_images": 16}


def _data(case, n: int = 16):
    """A learnable batch: the label is which colour channel is brightest."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *case.example.shape[1:], generator=g)
    y = x.mean((2, 3)).argmax(1)
    return x, y


def _flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ALL)
def test_user_loop_trains_then_selects_and_exports_under_a_30_percent_budget(name):
    if name in HF_KINDS:
        pytest.importorskip("transformers")
    case = build(name)
    original = copy.deepcopy(case.model)
    net = convert(case.model, case.example, outputs=case.outputs, prune_residual=True).train()
    x, y = _data(case)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    step = STPStep(net, flops_target=0.3, total_steps=8, **TINY)
    first = last = None
    for _ in range(8):
        archs = step.plan()
        loss = step.loss(net(x, archs=archs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ce = step.update()["ce"]
        first = ce if first is None else first
        last = ce
    assert last < first, f"full-net loss did not fall: {first:.4f} -> {last:.4f}"
    (chosen,) = step.select(calib=[x], holdout=[(x, y)])
    full = net.space.macs(net.space.full())
    assert chosen.macs <= 0.3 * full and chosen.model is not None
    small = net.export(chosen.arch)  # checks its output against net(x, arch=chosen.arch) itself
    assert type(small) is type(original) and not small.training
    assert stp_fast.count_macs(small, tuple(x.shape[1:]))[0] == chosen.macs
    # counted independently: aten conv/matmul FLOPs of the small model vs the original's
    assert _flops(small, x[:1]) <= 0.3 * _flops(original.eval(), x[:1])
    recalibrated = net.export(chosen.arch, calib=[x])
    assert not recalibrated.training


class _NoBN(nn.Module):
    """BN-free (so micro-batches and the whole batch see the same per-sample function)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


def test_gradient_accumulation_equals_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    y = torch.randint(0, 3, (8,))
    net = convert(_NoBN(), x)
    step = STPStep(net, flops_target=0.5, total_steps=4, **TINY)
    archs = step.plan()
    net.zero_grad()
    step.loss(net(x, archs=archs), y).backward()
    whole = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        (step.loss(net(xm, archs=archs), ym) / 2).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert step.update()["kd"]


def _run(net, step, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        archs = step.plan()
        loss = step.loss(net(x, archs=archs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step.update()


def test_state_dicts_resume_bit_for_bit(tmp_path):
    case = build("functional_cnn")
    x, y = _data(case)
    base = copy.deepcopy(case.model)

    def fresh():
        net = convert(copy.deepcopy(base), case.example).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        return net, opt, STPStep(net, flops_target=0.3, total_steps=8, pool_update_interval=2, **TINY)

    net, opt, step = fresh()
    _run(net, step, opt, x, y, 8)
    straight = {k: v.clone() for k, v in net.model.state_dict().items()}
    net, opt, step = fresh()
    _run(net, step, opt, x, y, 4)
    torch.save({"model": net.model.state_dict(), "opt": opt.state_dict(), "stp": step.state_dict()}, tmp_path / "c.pt")
    net, opt, step = fresh()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    net.model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    step.load_state_dict(saved["stp"])
    _run(net, step, opt, x, y, 4)
    for k, v in net.model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_exported_model_compiles_and_saves_as_a_torch_export_program(tmp_path):
    case = build("tv_resnet18")
    net = convert(case.model, case.example, prune_residual=True)
    arch = net.space.sample(3)
    small = net.export(arch)
    x = case.example[:2]
    with torch.no_grad():
        want = small(x)
        torch.testing.assert_close(torch.compile(small)(x), want, rtol=1e-4, atol=1e-5)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(small, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "small.pt2")
    torch.save({"x": case.example, "y": small(case.example).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        program = torch.export.load({str(tmp_path / "small.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = program.module()(io["x"])
        assert "stp_fast" not in sys.modules
        print(float((got - io["y"]).abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-4


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    case = build("functional_cnn")
    torch.manual_seed(rank)  # different initial weights: DDP starts every rank from rank 0's
    for p in case.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    net = convert(case.model, case.example).train()
    model = DistributedDataParallel(net)  # no find_unused_parameters: the full arch uses every weight
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    step = STPStep(net, flops_target=0.3, total_steps=6, pool_update_interval=2, **TINY)
    x, y = _data(case, 16)
    shard = slice(rank * 8, rank * 8 + 8)
    for _ in range(6):
        archs = step.plan()
        loss = step.loss(model(x[shard], archs=archs), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step.update()
    flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    pools = repr([[(e.arch.to_json(), round(e.score, 9)) for e in pool.entries] for pool in step.pools])
    queue.put((rank, bool(torch.equal(gathered[0], gathered[1])), pools))
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_wrapping_the_converted_net_keeps_replicas_and_pools_identical():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    assert [r[1] for r in results] == [True, True]
    assert results[0][2] == results[1][2]


# ---------------------------------------------------------------------------------------------- bad input
class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return (self.a(x) if x.sum() > 0 else self.b(x)).mean((2, 3))


def test_unconvertible_or_wrapped_models_and_bad_inputs_raise_clear_errors():
    case = build("functional_cnn")
    with pytest.raises(ConversionError, match="wrapped in DataParallel"):
        convert(nn.DataParallel(case.model), case.example)
    with pytest.raises(ConversionError, match="OptimizedModule"):
        convert(torch.compile(case.model), case.example)
    with pytest.raises(ConversionError, match=r"fails on example_inputs of shapes \[\(4, 5, 32, 32\)\]"):
        convert(case.model, torch.randn(4, 5, 32, 32))
    with pytest.raises(ConversionError, match="example_inputs must be"):
        convert(case.model, "not a tensor")
    with pytest.raises(ConversionError, match="data"):
        convert(_DataDependent(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ConversionError, match="ignore='nope'"):
        convert(case.model, case.example, ignore=["nope"])
    net = convert(case.model, case.example)
    with pytest.raises(ConversionError, match="already converted"):
        convert(net.model, case.example)
    smallest = net.space.macs(net.space.smallest()) / net.space.macs(net.space.full())
    with pytest.raises(ValueError, match="below the smallest subnet"):
        STPStep(net, flops_target=smallest / 2, total_steps=4)
    with pytest.raises(ValueError, match="total_steps"):
        STPStep(net, flops_target=0.5)
    with pytest.raises(TypeError, match="stp_fast supernet"):
        STPStep(case.model, flops_target=0.5, total_steps=4)
    step = STPStep(net, flops_target=0.5, total_steps=4)
    with pytest.raises(RuntimeError, match="plan"):
        step.loss([torch.zeros(2, 10)], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="arch"):
        net(case.example, arch=stp_fast.Arch.make([], {"bogus": 3}))
