"""The command lines of the README's `stp-fast prune` section run as written: on small stand-ins for
the data files they name (`npz:fashion_mnist.npz`, `cifar10:~/data`), with quick flags appended to the
training commands (one epoch, a small pool), the `torchrun` line as one process."""

import json
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest

from stp_fast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK = ["--epochs", "1", "--set", "pool_size=6", "--set", "final_candidates=2", "--set", "calib_images=64",
         "--train-limit", "256", "--progress", "off"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_commands() -> list[list[str]]:
    """The command lines of the section's first bash block (comments dropped, ``\\`` continuations joined)."""
    section = README.read_text().split("## Pruning a model: `stp-fast prune`", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#", 1)[0].strip()]


def _stand_in_data(root: Path) -> None:
    """fashion_mnist.npz in the working folder (28x28 grey, 10 classes) and a CIFAR-10 layout in ~/data."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(360, 28, 28), dtype=np.uint8)
    np.savez(root / "fashion_mnist.npz", x_train=x[:300], y_train=np.arange(300) % 10, x_test=x[300:],
             y_test=np.arange(60) % 10)  # fmt: skip
    folder = root / "home" / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(30, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(30)]}, f, protocol=2)


def test_the_readme_command_lines_run_as_written(tmp_path, monkeypatch, capsys):
    _stand_in_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # cifar10:~/data
    commands = readme_commands()
    assert len(commands) >= 7 and {c[0] for c in commands} == {"stp-fast", "torchrun"}
    printed = {}
    for argv in commands:
        args = argv[argv.index("stp_fast") + 1 :] if argv[0] == "torchrun" else argv[1:]
        assert argv[0] == "stp-fast" or argv[1:4] == ["--nproc-per-node", "2", "-m"], argv
        extra = QUICK if args[0] in ("prune", "train") else []
        capsys.readouterr()
        assert main([*args, *extra]) == 0, shlex.join(argv)
        printed[shlex.join(argv)] = capsys.readouterr().out
    assert (tmp_path / "runs" / "prune-resnet20-digits" / "pruned.pt2").is_file()
    assert (tmp_path / "runs" / "c10" / "report.json").is_file() and (tmp_path / "runs" / "ddp").is_dir()
    # the eval lines reproduce what prune and train reported
    for model, key in (("runs/fm/pruned.pt2", "pruned"), ("runs/dense/dense.pt", "full")):
        line = next(out for cmd, out in printed.items() if cmd.startswith(f"stp-fast eval --model {model}"))
        top1 = json.loads((tmp_path / Path(model).parent / "report.json").read_text())[key]["top1"]
        assert f"top-1 {100 * top1:.2f}%" in line, line
    init_run = json.loads((tmp_path / "runs" / "c10" / "report.json").read_text())
    assert init_run["init"] == "runs/dense/dense.pt" and init_run["model"] == "resnet20"
