"""IEE (channels and weights) on a user's model converted by ``stp_fast.convert``: one engine for both methods."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset
from zoo import build

import stp_fast
from stp_fast import convert
from stp_fast.train.iee import IEEConfig, IEETrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 120):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = x.mean((2, 3)).argmax(1)
    return TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])


@pytest.mark.parametrize("structure", ["channel", "unstructured"])
def test_iee_runs_on_a_converted_user_model(structure):
    case = build("functional_cnn", size=16)
    net = convert(case.model, case.example, prune_residual=True)
    train, val = _data()
    kw = {"flops_target": 0.4} if structure == "channel" else {"sparsity": 0.8}
    cfg = IEEConfig(structure=structure, epochs=2, batch_size=20, cycle_steps=4, explore_steps=2, lr=0.05,
                    calib_images=40, eval_every=0, **kw)  # fmt: skip
    res = IEETrainer(net, train, val, cfg, progress="off").fit()
    small = res.pruned_model
    assert type(small) is type(case.model)
    if structure == "channel":
        macs, _ = stp_fast.count_macs(small, (3, 16, 16))
        assert macs == res.pruned["macs"] <= 0.4 * res.full["macs"]
    else:
        weights = [m.weight for m in small.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(0.8, abs=0.01)
