"""``stp-fast prune --model pkg.module:factory`` and ``--model hf:<type>``: users' models and Hugging Face
models go through the same engine as the built-ins, from the command line."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from stp_fast.cli import main

FAST = ["--epochs", "1", "--set", "pool_size=6", "--set", "final_candidates=2", "--set", "calib_images=200",
        "--progress", "off", "--dataset", "digits"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORY = textwrap.dedent("""
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return x + self.b(F.relu(self.bn(self.a(x))))

    class Small(nn.Module):
        def __init__(self, num_classes, in_chans, width):
            super().__init__()
            self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
            self.blocks = nn.Sequential(Block(width), Block(width), Block(width))
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))

    def make(num_classes, in_chans, width=16):
        return Small(num_classes, in_chans, width)
""")


def test_a_users_factory_prunes_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "userzoo.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["prune", "--model", "userzoo:make", "--model-arg", "width=12", "--flops-target", "0.4",
                 "--out", str(out), *FAST]) == 0  # fmt: skip
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"] == "userzoo:make" and rep["pruned"]["macs"] <= 0.4 * rep["full"]["macs"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["model"] == "userzoo:make" and ckpt["model_kwargs"]["width"] == 12


@pytest.mark.hf
def test_a_hugging_face_model_from_its_config(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "vit"
    args = ["hidden_size=32", "num_hidden_layers=2", "num_attention_heads=2", "intermediate_size=64", "patch_size=4"]
    code = main(["prune", "--model", "hf:vit", *[x for a in args for x in ("--model-arg", a)], "--flops-target", "0.5",
                 "--out", str(out), *FAST])  # fmt: skip
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["pruned"]["macs"] <= 0.5 * rep["full"]["macs"] and 0.0 <= rep["pruned"]["top1"] <= 1.0


@pytest.mark.parametrize("model,extra,message", [
    ("nosuchmodule_xyz:make", [], "cannot import 'nosuchmodule_xyz'"),
    ("json:nope", [], "has no callable 'nope'"),
    ("resnet20", ["--model-arg", "oops"], "expected KEY=VALUE"),
    ("resnet21", [], "unknown; known models"),
])  # fmt: skip
def test_bad_model_specs_exit_2_with_one_line(tmp_path, capsys, model, extra, message):
    code = main(["prune", "--model", model, *extra, "--flops-target", "0.3", "--out", str(tmp_path / "x"), *FAST])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
