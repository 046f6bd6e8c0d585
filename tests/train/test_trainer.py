import gc
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _synthetic import synthetic

from stp_fast import models
from stp_fast.train import CheckpointError, STPConfig, STPTrainer, TrainingDiverged
from stp_fast.train import checkpoint as ckpt

TINY = dict(epochs=2, batch_size=25, pool_size=6, final_candidates=2, calib_images=50, pool_update_interval=3,
            flops_target=0.2, lr=0.05)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # small nets: threads only add overhead


def _run(out=None, *, resume=False, stop_after=None, init_seed=0, on_epoch=None, data_seed=1, **cfg):
    torch.manual_seed(init_seed)
    net = models.create("resnet20", 3, 1)
    train, val = synthetic(seed=data_seed)

    class Stop(Exception):
        pass

    def cb(record):
        if on_epoch:
            on_epoch(net, record)
        if stop_after and record["epoch"] == stop_after:
            raise Stop

    trainer = STPTrainer(net, train, val, STPConfig(**(TINY | cfg)), out_dir=out, resume=resume, progress="off",
                         on_epoch=cb)  # fmt: skip
    try:
        return net, trainer.fit()
    except Stop:
        return net, None


def test_fit_returns_a_budget_arch_its_plain_model_and_history():
    net, res = _run(epochs=1)
    assert res.chosen is not None and res.pruned["macs"] <= 0.2 * res.full["macs"]
    assert res.pruned["macs"] == net.space.macs(res.chosen, (1, 8, 8))
    assert len(res.history) == 1 and res.history[0]["steps"] == len(synthetic()[0]) * 9 // 10 // 25
    assert 0.0 <= res.pruned["top1"] <= 1.0 and len(res.candidates) == 2
    x = torch.randn(5, 1, 8, 8)
    assert res.pruned_model(x).shape == (5, 3)
    assert all(not isinstance(m, type(net)) for m in res.pruned_model.modules())


def test_resume_continues_bit_for_bit(tmp_path):
    full_run, _ = _run(tmp_path / "a", epochs=3)
    _run(tmp_path / "b", epochs=3, stop_after=1)
    assert ckpt.load(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(1234)  # resuming must not depend on the global RNG at restart
    resumed, res = _run(tmp_path / "b", epochs=3, resume=True, init_seed=99)
    a, b = full_run.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(res.history) == 3


def test_resume_refuses_a_different_config(tmp_path):
    _run(tmp_path, epochs=2, stop_after=1)
    with pytest.raises(CheckpointError, match="lr"):
        _run(tmp_path, epochs=2, resume=True, lr=0.01)


def test_resume_refuses_a_checkpoint_of_another_data_set(tmp_path):
    _run(tmp_path, epochs=2, stop_after=1)
    assert ckpt.load(tmp_path / "checkpoint.pt")["data"]["train_size"] == 200
    with pytest.raises(CheckpointError, match=r"trained on another data set \(other labels or images\)"):
        _run(tmp_path, epochs=2, resume=True, data_seed=2)  # same sizes, classes and shapes


def test_training_draws_from_torch_rng_seeded_by_config_seed(tmp_path):
    """What draws from torch's global RNG while training (dropout, a user's layers) follows config.seed,
    whatever the process drew before."""
    states = []
    for before in (1, 2):
        torch.manual_seed(0)
        net = models.create("resnet20", 3, 1)
        torch.manual_seed(before)
        trainer = STPTrainer(net, *synthetic(), STPConfig(**TINY | {"epochs": 1, "seed": 5}), progress="off",
                             on_epoch=lambda _r: states.append(torch.get_rng_state()))  # fmt: skip
        trainer.fit()
    assert torch.equal(states[0], states[1])


def test_checkpoints_are_atomic_and_weights_only(tmp_path):
    _run(tmp_path, epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary files left
    data = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert data["format"] == ckpt.FORMAT and data["model"] == "resnet20" and data["epoch"] == 1


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(net, record):
        if record["epoch"] == 1:
            with torch.no_grad():
                net.fc.weight.fill_(float("nan"))

    before = None
    with pytest.raises(TrainingDiverged, match=r"epoch 2.*last good checkpoint \(epoch 1\)"):
        _run(tmp_path, epochs=3, on_epoch=poison)
    before = ckpt.load(tmp_path / "checkpoint.pt")
    assert before["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in before["state_dict"].values() if v.is_floating_point())


def test_init_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    other = models.create("resnet56", 3, 1)
    state = {"format": ckpt.FORMAT, "version": 1, "model": "resnet56", "num_classes": 3, "in_chans": 1,
             "state_dict": other.state_dict()}  # fmt: skip
    ckpt.save_atomic(state, tmp_path / "dense.pt")
    train, val = synthetic()
    with pytest.raises(CheckpointError, match="another model"):
        STPTrainer(models.create("resnet20", 3, 1), train, val, STPConfig(**TINY), init=tmp_path / "dense.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        STPTrainer(models.create("resnet20", 3, 1), train, val, STPConfig(**TINY), init=tmp_path / "junk.pt")


def test_two_budgets_in_one_run_give_one_arch_and_model_each():
    _net, res = _run(epochs=1, flops_target=[0.3, 0.15])
    assert [b["target"] for b in res.budgets] == [0.3, 0.15]
    for b, model in zip(res.budgets, res.pruned_models):
        assert b["macs"] <= b["target"] * res.full["macs"] and 0 <= b["top1"] <= 1
        assert stp_fast_count(model) == b["macs"]
    assert res.pruned == {k: res.budgets[0][k] for k in ("top1", "macs", "params", "arch")}


def stp_fast_count(model) -> int:
    import stp_fast

    return stp_fast.count_macs(model, (1, 8, 8))[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    torch.manual_seed(rank)  # different initial weights: DDP must start every rank from rank 0's
    net = models.create("resnet20", 3, 1)
    train, val = synthetic()
    res = STPTrainer(net, train, val, STPConfig(**TINY | {"epochs": 1, "batch_size": 10}), progress="off").fit()
    flat = torch.cat([v.double().flatten() for v in net.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    queue.put((rank, bool(torch.equal(gathered[0], gathered[1])), res.chosen.to_json(), res.history[0]["steps"]))
    del res
    gc.collect()  # free the DDP reducer (its threads) before the process group goes away
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_keep_replicas_identical():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    assert [r[1] for r in results] == [True, True]
    assert results[0][2] == results[1][2]  # same pool decisions on both ranks
    assert results[0][3] == (len(synthetic()[0]) * 9 // 10) // (10 * 2)
