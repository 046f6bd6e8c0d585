"""Converted models under ``torch.autocast``: bf16 STP steps on the CPU (fp32 master weights and gradients)."""

from __future__ import annotations

import pytest
import torch
from zoo import HF_KINDS, build

from stp_fast import STPStep, convert

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"pool_size": 6, "subnets_per_step": 2, "final_candidates": 2, "calib_images": 16}


def _data(case, n: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *case.example.shape[1:], generator=g)
    return x, x.mean((2, 3)).argmax(1)


@pytest.mark.parametrize("name", ["tv_resnet18", "functional_cnn", pytest.param("vit", marks=pytest.mark.hf)])
def test_bf16_autocast_steps_run(name):
    if name in HF_KINDS:
        pytest.importorskip("transformers")
    case = build(name)
    net = convert(case.model, case.example, outputs=case.outputs, prune_residual=True).train()
    x, y = _data(case)
    step = STPStep(net, flops_target=0.5, total_steps=2, **TINY)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        archs = step.plan()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = net(x, archs=archs)
            loss = step.loss(outs, y)
        assert all(o.dtype == torch.bfloat16 for o in outs)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
        opt.step()
        assert all(v == v for v in [step.update()["loss"]])
