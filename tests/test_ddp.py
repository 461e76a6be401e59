import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stand_ins import TINY_ARCH

from rsseg.errors import ConfigError, DatasetError
from rsseg.models import load_checkpoint
from rsseg.synth.generate import make_tianchi
from rsseg.training.config import load_config
from rsseg.training.launch import build_datasets, fit, launch
from rsseg.training.trainer import Rank, Trainer


@pytest.fixture(scope="module")
def tianchi(tmp_path_factory):
    root = tmp_path_factory.mktemp("tianchi") / "data"
    make_tianchi(root, n_train=6, n_test=0, seed=2, progress=False)
    return root


def config(root, out, **run):
    """6 tiles: 4 train + 2 validation; a global batch of 4, so one epoch is exactly one step."""
    return {"data": {"source": "tianchi", "root": str(root), "batch_size": 4, "val_fraction": 0.34,
                     "augment": {"crop": 64, "brightness": 0.2, "saturation": 0.2}},
            "model": {"arch": TINY_ARCH},  # no batch statistics: a split batch gives the whole batch's gradients
            "optim": {"lr": 0.05, "warmup_fraction": 0.0},
            # fp32: the comparisons below are of arithmetic (auto may pick bf16 on AMX CPUs)
            "run": {"out_dir": str(out), "epochs": 1, "progress": False, "device": "cpu", "precision": "fp32",
                    **run}}


# Adam's first step is lr * g / (|g| + eps): where a gradient is near 0, the float noise of summing it in
# another order (two ranks' halves vs one batch) is amplified, up to ~1e-5 here for a step of 0.05.
ATOL = 1e-4


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(cfg_dict, env):
    cfg = load_config(cfg_dict)
    train, val = build_datasets(cfg)
    trainer = Trainer(cfg, env, torch.device("cpu"), train, val, cfg.data.batch_size // env.world)
    record = trainer.train_epoch()
    assert record["step"] == 1
    return trainer.module.state_dict()


def _rank(rank, world, port, cfg_dict, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_one_step(cfg_dict, Rank(rank, rank, world)), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes
def test_two_gloo_ranks_take_the_step_of_one_process_with_the_global_batch(tianchi, tmp_path):
    cfg = config(tianchi, tmp_path / "unused")
    mp.spawn(_rank, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _one_step(cfg, Rank())
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # DDP keeps the ranks identical
        assert torch.allclose(ranks[0][key], value, atol=ATOL), key  # and equal to one process
    assert any(not torch.equal(ranks[0][k], v) for k, v in _untrained(cfg).items())  # a step was taken


def _untrained(cfg_dict):
    cfg = load_config(cfg_dict)
    train, val = build_datasets(cfg)
    return Trainer(cfg, Rank(), torch.device("cpu"), train, val, 4).module.state_dict()


@pytest.mark.slow  # torchrun with two processes
def test_launch_with_two_processes_matches_fit_in_one(tianchi, tmp_path, stand_ins):
    best = launch(config(tianchi, tmp_path / "ddp"), nproc=2)
    single = fit(load_config(config(tianchi, tmp_path / "one")))
    a, b = load_checkpoint(best), load_checkpoint(single)
    assert a["meta"]["world_size"] == 2 and b["meta"]["world_size"] == 1
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=ATOL), key
    assert a["meta"]["val_dice"] == pytest.approx(b["meta"]["val_dice"], abs=1e-4)
    assert len(a["train_state"]["rng"]) == 2  # each rank's RNG state, for an exact resume


def test_launch_checks_input_before_starting_workers(tianchi, tmp_path):
    with pytest.raises(DatasetError, match="fewer than one batch"):
        launch(config(tianchi, tmp_path / "out"), nproc=2, overrides={"data.batch_size": "8"})
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        launch(config(tianchi, tmp_path / "out"), nproc=3)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="nproc: Input should be greater than or equal to 1"):
        launch(config(tianchi, tmp_path / "out"), nproc=0)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tianchi20(tmp_path_factory):
    root = tmp_path_factory.mktemp("tianchi20") / "data"
    make_tianchi(root, n_train=20, n_test=0, seed=4, progress=False)
    return root


def _epoch(cfg_dict, batch, accumulate):
    cfg = load_config(cfg_dict, {"data.batch_size": str(batch), "optim.accumulate": str(accumulate)})
    train, val = build_datasets(cfg)
    trainer = Trainer(cfg, Rank(), torch.device("cpu"), train, val, batch)
    record = trainer.train_epoch()
    return trainer.module.state_dict(), record


def test_accumulated_batches_step_as_one_batch(tianchi20, tmp_path):
    cfg = config(tianchi20, tmp_path / "unused")
    cfg["data"]["val_fraction"] = 0.2  # 16 training images: 2 steps of 8 (or of 4 x 2)
    whole, whole_record = _epoch(cfg, 8, 1)
    accumulated, record = _epoch(cfg, 4, 2)
    assert whole_record["step"] == record["step"] == 2
    assert record["train_loss"] == pytest.approx(whole_record["train_loss"], rel=1e-5)
    for key, value in whole.items():
        assert torch.allclose(accumulated[key], value, atol=ATOL), key
    plain, _ = _epoch(cfg, 4, 1)  # 4 steps of 4: not the same training
    assert any(not torch.allclose(plain[k], v, atol=ATOL) for k, v in whole.items())


def test_sync_batchnorm_by_default_only_under_multi_gpu_ddp_with_small_batches(tianchi, tmp_path):
    from rsseg.training.devices import sync_batchnorm

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert sync_batchnorm(None, cuda, 2, 4) and sync_batchnorm(None, cuda, 8, 7)
    assert not sync_batchnorm(None, cuda, 2, 8) and not sync_batchnorm(None, cuda, 1, 2)
    assert not sync_batchnorm(None, cpu, 2, 2)  # gloo: not unless asked
    assert not sync_batchnorm(False, cuda, 8, 2) and sync_batchnorm(True, cuda, 1, 16)
    assert sync_batchnorm(True, cpu, 1, 4)
    with pytest.raises(ConfigError, match="sync_batchnorm=true with 2 CPU processes"):
        sync_batchnorm(True, cpu, 2, 2)
    cfg = config(tianchi, tmp_path / "bn")
    cfg["model"] = {"arch": "unet", "encoder": "resnet18", "kwargs": {"encoder_depth": 3,
                                                                      "decoder_channels": [16, 8, 4]}}
    cfg["run"]["sync_batchnorm"] = True
    cfg = load_config(cfg)
    train, val = build_datasets(cfg)
    trainer = Trainer(cfg, Rank(), torch.device("cpu"), train, val, 4)
    kinds = {type(m) for m in trainer.module.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert trainer.train_epoch()["step"] == 1  # one process: SyncBatchNorm falls back to BatchNorm


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow  # two console-script `rsseg train` processes, each starting torchrun
def test_two_torchrun_nodes_train_as_one_process(tianchi, tmp_path, stand_ins):
    import subprocess
    import sys

    cfg_path = tmp_path / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(config(tianchi, tmp_path / "nodes")))
    port = _free_ports(1)[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "rsseg.cli", "train", str(cfg_path), "--nnodes", "2",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "--nproc", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, err[-2000:]
    assert outs[0][0].strip().endswith("best.pt")
    two = load_checkpoint(tmp_path / "nodes" / "best.pt")
    one = load_checkpoint(fit(load_config(config(tianchi, tmp_path / "one"))))
    assert two["meta"]["world_size"] == 2 and one["meta"]["world_size"] == 1
    for key, value in two["state_dict"].items():
        assert torch.allclose(value, one["state_dict"][key], atol=ATOL), key
    assert two["meta"]["val_dice"] == pytest.approx(one["meta"]["val_dice"], abs=1e-4)


def test_device_checks_count_this_nodes_processes_not_the_world(monkeypatch):
    from rsseg.training.devices import loader_workers
    from rsseg.training.launch import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    # 2 nodes x 4 processes: WORLD_SIZE 8 but 4 per node, each on its local rank's GPU
    assert resolve_device("auto", 3, 4) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="5 processes on this machine .* but 4 CUDA devices"):
        resolve_device("cuda", 0, 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per process (srun, CUDA_VISIBLE_DEVICES)
    assert resolve_device("cuda", 2, 4) == torch.device("cuda", 0)
    assert resolve_device("cpu", 2, 4) == torch.device("cpu")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Rank.from_env() == Rank(5, 1, 8, 4)
    gpu = torch.device("cuda", 0)
    assert loader_workers(None, gpu, 4, cores=16) == 4  # this node's cores shared by its 4 processes
    assert loader_workers(None, gpu, 1, cores=64) == 8 and loader_workers(None, gpu, 8, cores=4) == 1
    assert loader_workers(None, torch.device("cpu"), 1, cores=16) == 0 and loader_workers(3, gpu, 4) == 3


def test_node_options_are_checked():
    from rsseg.training.config import NodeOptions

    with pytest.raises(ValueError, match="node_rank=2 with nnodes=2"):
        NodeOptions(nnodes=2, node_rank=2)
    assert NodeOptions().nnodes == 1 and NodeOptions().master_port is None
