"""Prune your own model with STP in your own training loop.

A plain PyTorch model (here a small torchvision-style ResNet written out below -- any model works:
a Hugging Face ``transformers`` vision model, your own CNN or ViT), a plain loop with any optimizer
and scheduler, bf16 autocast and gradient accumulation.  stp_fast adds four calls: ``convert``,
``STPStep.plan/loss/update`` per step, and ``select``/``export`` at the end.

    python examples/own_loop.py                 # scikit-learn's digits (bundled), about a minute on 2 CPU cores
    python examples/own_loop.py --epochs 30 --flops-target 0.15 --out runs/own
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import stp_fast
from stp_fast.data import load_dataset


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class MyNet(nn.Module):
    """The user's model: nothing stp_fast-specific in it."""

    def __init__(self, in_chans: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width, 1), Block(width, width, 1), Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1),
                                    Block(2 * width, 2 * width, 1))  # fmt: skip
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--flops-target", type=float, default=0.3, help="kept fraction of the MACs")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--out", default="runs/own-loop", help="where the pruned model is written")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="float32 instead of bf16 autocast")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = load_dataset("digits")
    model = MyNet(ds.in_chans, ds.num_classes).to(device)
    example = next(iter(ds.loader("train", batch_size=8, device=device)))[0]

    # 1. convert: the same model, now a supernet (in place; state-dict keys unchanged)
    net = stp_fast.convert(model, example)
    print(net.report())

    # 2. any optimizer and scheduler; STPStep knows the run's length for its schedules
    steps_per_epoch = len(ds.loader("train", batch_size=64)) // args.accumulate
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=total)
    step = stp_fast.STPStep(net, flops_target=args.flops_target, total_steps=total, pool_size=20)

    for epoch in range(args.epochs):
        net.train()
        batches = iter(ds.loader("train", batch_size=64, seed=0, epoch=epoch, device=device))
        for _ in range(steps_per_epoch):
            archs = step.plan()  # the full net + K subnets, the same for every micro-batch of this step
            for _ in range(args.accumulate):
                x, y = next(batches)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=args.amp):
                    outputs = net(x, archs=archs)  # ONE forward of every arch
                    loss = step.loss(outputs, y)  # CE of the full net + the subnets' distillation
                (loss / args.accumulate).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            values = step.update()  # pool scores, schedules
        step.end_epoch()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {values['loss']:.3f}, full-net CE {values['ce']:.3f}")

    # 3. select the best arch under the budget (BN recalibrated, re-scored; no fine-tuning), export it
    calib = ds.loader("calib", batch_size=256, device=device)
    (chosen,) = step.select(calib=calib)
    small = net.export(chosen.arch, calib=calib)  # MyNet with physically smaller layers, eval mode
    correct = total_images = 0
    with torch.no_grad():
        for x, y in ds.loader("test", batch_size=256, device=device):
            correct += int((small(x).argmax(1) == y).sum())
            total_images += len(y)
    full = net.space.macs(net.space.full())
    print(f"pruned: top-1 {100 * correct / total_images:.2f}% at {chosen.macs / full:.1%} of the MACs "
          f"({chosen.macs / 1e6:.2f}M), {chosen.params / 1e3:.1f}k params, no fine-tuning")  # fmt: skip

    # 4. save: a torch.export program (runs without stp_fast), the weights, and the shapes to rebuild MyNet
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(small, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, out / "pruned.pt2")
    torch.save(small.state_dict(), out / "pruned_state_dict.pt")
    (out / "layout.json").write_text(json.dumps(net.layout(chosen.arch), indent=2))
    rebuilt = stp_fast.apply_layout(MyNet(ds.in_chans, ds.num_classes), json.loads((out / "layout.json").read_text()))
    rebuilt.load_state_dict(torch.load(out / "pruned_state_dict.pt", weights_only=True))
    print(f"wrote {out}/pruned.pt2, pruned_state_dict.pt and layout.json (MyNet rebuilt from them: "
          f"{sum(p.numel() for p in rebuilt.parameters()) / 1e3:.1f}k params)")  # fmt: skip


if __name__ == "__main__":
    main()
