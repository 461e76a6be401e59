import csv
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from stand_ins import TINY_ARCH

from rsseg.cli import main
from rsseg.errors import ConfigError
from rsseg.metrics import mean_image_dice
from rsseg.models import load_checkpoint, model_from_checkpoint
from rsseg.synth.generate import make_tianchi
from rsseg.training.config import load_config
from rsseg.training.launch import WarmupCosine, fit
from rsseg.training.report import ThresholdDice


def tiny_config(root, out, **run):
    return {"data": {"source": "tianchi", "root": str(root), "batch_size": 4, "val_fraction": 0.2,
                     "augment": {"crop": 64, "brightness": 0.1, "saturation": 0.1}},
            "model": {"arch": TINY_ARCH},
            "optim": {"lr": 0.01, "warmup_fraction": 0.25},
            "run": {"out_dir": str(out), "epochs": 2, "progress": False, "thresholds": [0.3, 0.5, 0.7], **run}}


def test_load_config_from_yaml_with_overrides_and_typos(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config("data", "out")))
    cfg = load_config(path, {"optim.lr": "3e-3", "run.device": "cpu", "model.kwargs.width": "4",
                             "data.augment.crop": "null"})
    assert cfg.optim.lr == 0.003 and cfg.run.device == "cpu" and cfg.model.kwargs == {"width": 4}
    assert cfg.data.augment.crop is None and cfg.data.batch_size == 4
    with pytest.raises(ConfigError,
                       match=r"--set optim.lrate: unknown key .lrate.; valid keys in optim: accumulate, grad_clip"):
        load_config(path, {"optim.lrate": "1"})
    bad = tiny_config("data", "out")
    bad["data"]["bach_size"] = 4
    with pytest.raises(ConfigError, match=r"unknown key 'data.bach_size'; valid keys in data: augment, batch_size"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"run.epochs: Input should be greater than 0"):
        load_config(path, {"run.epochs": "0"})
    with pytest.raises(ConfigError, match="data.source=chips needs data.chips"):
        load_config(path, {"data.source": "chips"})


def test_threshold_dice_is_the_competition_metric():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((5, 1, 8, 8), dtype=np.float32))
    truth = torch.from_numpy((rng.random((5, 1, 8, 8)) > 0.6).astype(np.float32))
    truth[0] = 0  # an empty truth
    probs[1] = 0.1  # an empty prediction
    probs[0] = 0.0
    probs[0, 0, 0, :3] = 0.9  # 3 false pixels on the empty tile: Dice 0 unless min_pixels > 3 drops them
    acc = ThresholdDice([0.3, 0.5, 0.7], [0, 4])
    acc.update(probs[:2], truth[:2])
    acc.update(probs[2:], truth[2:])
    for (t, m), score in acc.scores().items():
        pred = (probs > t).numpy()[:, 0]
        pred[pred.sum((1, 2)) < m] = False  # the min_pixels rule: too few pixels -> empty
        assert score == pytest.approx(mean_image_dice(pred, truth.numpy()[:, 0])), (t, m)
    assert acc.scores()[(0.5, 4)] - acc.scores()[(0.5, 0)] == pytest.approx(1 / 5)
    threshold, min_pixels, best = acc.best()
    assert best == max(acc.scores().values()) and acc.scores()[(threshold, min_pixels)] == best
    assert acc.best([0.3], [0])[:2] == (0.3, 0)
    valid = torch.ones_like(truth)
    valid[..., :4] = 0
    masked = ThresholdDice([0.5])
    masked.update(probs, truth, valid)
    expected = mean_image_dice((probs[..., 4:] > 0.5).numpy()[:, 0], truth[..., 4:].numpy()[:, 0])
    assert masked.scores()[(0.5, 0)] == pytest.approx(expected)


def test_warmup_then_cosine():
    f = WarmupCosine(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)
    steps = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))


def test_run_outputs_and_resume_equals_a_straight_run(tianchi, tmp_path):
    torch.manual_seed(123)
    caller = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.get_num_threads()
    straight = fit(load_config(tiny_config(tianchi, tmp_path / "straight")))
    # fit leaves the process as found: the caller's RNG states and threads (it draws from its own streams)
    assert torch.equal(torch.get_rng_state(), caller[0]) and np.array_equal(np.random.get_state()[1], caller[1])
    assert random.getstate() == caller[2] and torch.get_num_threads() == caller[3]
    out = tmp_path / "split"
    fit(load_config(tiny_config(tianchi, out, stop_after=1)))
    assert load_checkpoint(out / "last.pt")["meta"]["epoch"] == 1
    with pytest.raises(FileExistsError, match="run.resume=true"):
        fit(load_config(tiny_config(tianchi, out)))
    resumed = fit(load_config(tiny_config(tianchi, out, resume=True)))

    a, b = load_checkpoint(straight.with_name("last.pt")), load_checkpoint(resumed.with_name("last.pt"))
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-9)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    losses = [[r["train_loss"] for r in ck["train_state"]["history"]] for ck in (a, b)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)

    for path in (straight, resumed):
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"]
        assert meta["epoch"] in (1, 2) and meta["threshold"] in (0.3, 0.5, 0.7)
        assert meta["threshold_tta"] == "d4" and meta["val_threshold"] in (0.3, 0.5, 0.7)  # tuned at the end
        assert json.loads((path.parent / "tuning.json").read_text())["checkpoint_epoch"] == meta["epoch"]
        assert meta["min_pixels"] in (0, 16, 64, 256)
        assert meta["best_dice"] == meta["val_dice"] and 0 <= meta["best_dice"] <= 1
        assert meta["data"] == {"source": "tianchi", "path": str(tianchi)}
        assert meta["in_channels"] == 3 and meta["tile_size"] == 512 and meta["rsseg_version"]
        model, _ = model_from_checkpoint(path)
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(out / "config.yaml").run.resume is True
    assert not list(out.glob(".*"))  # no temporaries left


def test_fine_tuning_starts_from_the_init_checkpoint(tianchi, tmp_path, capsys):
    first = fit(load_config(tiny_config(tianchi, tmp_path / "first", epochs=1)))
    cfg = tiny_config(tianchi, tmp_path / "tuned", epochs=1)
    cfg["model"]["init"] = str(first)
    cfg["optim"] = {"lr": 1e-12, "warmup_fraction": 0.0}  # a step that changes nothing measurable
    tuned = fit(load_config(cfg))
    start, end = load_checkpoint(first)["state_dict"], load_checkpoint(tuned)["state_dict"]
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in start)
    cfg["model"]["kwargs"] = {"width": 4}  # another architecture than the checkpoint's width 8
    cfg["run"]["out_dir"] = str(tmp_path / "out")
    _expect_error(capsys, tmp_path, cfg, f"({TINY_ARCH}, 3 bands) do not fit the model: Error(s) in loading")


@pytest.mark.slow  # the console script in a subprocess, 4 epochs of a real U-Net (~40 s on 2 cores)
def test_cli_trains_a_real_unet_and_the_loss_goes_down(tianchi, tmp_path):
    cfg = tiny_config(tianchi, tmp_path / "run", epochs=4)
    cfg["model"] = {"arch": "unet", "encoder": "resnet18",
                    "kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    cfg["data"]["augment"]["crop"] = 128
    cfg["optim"] = {"lr": 3e-3, "warmup_fraction": 0.1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "rsseg.cli", "train", str(tmp_path / "c.yaml"),
                             "--set", "run.epochs=4"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "run" / "best.pt")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses
    assert "val Dice" in result.stderr  # rank 0 logs each epoch


def _bad(root, out, mutate):
    cfg = tiny_config(root, out)
    mutate(cfg)
    return cfg


def _expect_error(capsys, tmp_path, cfg, match, extra=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), *extra])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert err.startswith("rsseg: error:") and "\n" not in err and match in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_input_through_the_cli(tianchi, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_error(capsys, tmp_path, _bad(tianchi, out, lambda c: c["data"].update(bach_size=2)),
                  "unknown key 'data.bach_size'; valid keys in data:")
    _expect_error(capsys, tmp_path, tiny_config(tianchi, out), "unknown key 'lrr'", ["--set", "optim.lrr=1"])
    _expect_error(capsys, tmp_path, tiny_config(tianchi, out), "fewer than one batch", ["--set", "data.batch_size=16"])
    if not torch.cuda.is_available():
        _expect_error(capsys, tmp_path, tiny_config(tianchi, out), "no CUDA GPU is available",
                      ["--set", "run.device=cuda"])
    broken = tmp_path / "broken"
    make_tianchi(broken, n_train=3, n_test=0, seed=1, progress=False)
    names = sorted(p.name for p in (broken / "train").iterdir())
    (broken / "train" / names[0]).unlink()
    _expect_error(capsys, tmp_path, tiny_config(broken, out), f"missing from {broken / 'train'} (e.g. {names[0]})")
    Image.new("RGB", (256, 256)).save(broken / "train" / names[0])
    _expect_error(capsys, tmp_path, tiny_config(broken, out), "is 256x256; expected 512x512")
    (broken / "train_mask.csv").write_text("")
    _expect_error(capsys, tmp_path, tiny_config(broken, out), "train_mask.csv lists no images")


@pytest.mark.slow  # the console-script smoke test: a subprocess
def test_a_config_typo_exits_2_from_the_console_script(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "out")
    cfg["optim"]["lerning_rate"] = 1.0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([sys.executable, "-m", "rsseg.cli", "train", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rsseg: error: {tmp_path / 'c.yaml'}: unknown key 'optim.lerning_rate'; valid keys in optim: "
        "accumulate, grad_clip, lr, min_lr_ratio, warmup_fraction, weight_decay"]


@pytest.mark.parametrize("name", ["train_tianchi.yaml", "train_tianchi_quick.yaml", "train_chips.yaml",
                                  "train_images.yaml"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.data.augment.crop == 256 and cfg.run.precision == "bf16"


def test_resume_with_more_epochs_anneals_over_the_new_total(tianchi, tmp_path):
    out = tmp_path / "extended"
    fit(load_config(tiny_config(tianchi, out, stop_after=1)))  # epoch 1 of 2
    config = load_config(tiny_config(tianchi, out, resume=True, epochs=4))
    fit(config)
    ckpt = load_checkpoint(out / "last.pt")
    steps = ckpt["train_state"]["step"]
    assert ckpt["scheduler"]["lr_lambdas"][0]["total"] == steps and steps % 4 == 0
    schedule = WarmupCosine(steps, round(config.optim.warmup_fraction * steps), config.optim.min_lr_ratio)
    history = ckpt["train_state"]["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    # After epoch 3 the old two-epoch schedule would be at its floor; the new one is still annealing.
    assert history[2]["lr"] == pytest.approx(config.optim.lr * schedule(3 * steps // 4))
    assert history[2]["lr"] > config.optim.lr * config.optim.min_lr_ratio * 1.5


def test_rsseg_train_sets_the_process_settings_fit_leaves_alone(tianchi, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import rsseg.pipeline.process
    from rsseg.cli import cli

    calls = []
    monkeypatch.setattr(rsseg.pipeline.process, "configure_process", lambda **kw: calls.append(kw))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tianchi, tmp_path / "out", threads=1)))
    result = CliRunner().invoke(cli, ["train", str(path), "--set", "data.batch_size=64"])
    assert "fewer than one batch" in str(result.exception)  # fails in fit, after the entry point's settings
    assert calls == [{"threads": 1, "tasks": None}]


def test_auto_precision_is_a_function_of_device_facts(tmp_path):
    from rsseg.training.devices import DeviceFacts, choose_precision, cpu_has_bf16

    assert choose_precision("auto", DeviceFacts("cuda", (9, 0))) == "bf16"  # H100
    assert choose_precision("auto", DeviceFacts("cuda", (8, 0))) == "bf16"  # A100
    assert choose_precision("auto", DeviceFacts("cuda", (7, 5))) == "fp16"  # T4: bf16 emulated
    assert choose_precision("auto", DeviceFacts("cuda", (7, 0))) == "fp16"  # V100
    assert choose_precision("auto", DeviceFacts("cpu", cpu_bf16=True)) == "bf16"
    assert choose_precision("auto", DeviceFacts("cpu", cpu_bf16=False)) == "fp32"
    assert choose_precision("fp32", DeviceFacts("cuda", (9, 0))) == "fp32"
    assert choose_precision("bf16", DeviceFacts("cpu")) == "bf16"
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert cpu_has_bf16(flags)
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_bf16(flags) and not cpu_has_bf16(tmp_path / "none")


def test_fp16_trains_with_a_grad_scaler_saved_for_resume(tianchi, tmp_path):
    out = tmp_path / "fp16"
    fit(load_config(tiny_config(tianchi, out, precision="fp16", epochs=1, device="cpu")))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["meta"]["precision"] == "fp16" and ckpt["scaler"]["scale"] > 0
    assert math.isfinite(ckpt["train_state"]["history"][0]["train_loss"])


def test_resume_where_fewer_gpus_are_visible(tianchi, tmp_path):
    """A last.pt saved by 3 ranks with 8 visible GPUs' CUDA states resumes in one CPU process, exactly."""
    from rsseg.training.devices import saved_rng

    straight = fit(load_config(tiny_config(tianchi, tmp_path / "straight", precision="fp32")))
    out = tmp_path / "edited"
    fit(load_config(tiny_config(tianchi, out, stop_after=1, precision="fp32")))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    own = ckpt["train_state"]["rng"][0]
    cuda = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    ckpt["train_state"]["rng"] = [{"torch": own["torch"], "cuda": cuda} for _ in range(3)]
    torch.save(ckpt, out / "last.pt")
    resumed = fit(load_config(tiny_config(tianchi, out, resume=True, precision="fp32")))
    a, b = load_checkpoint(straight.with_name("last.pt")), load_checkpoint(resumed.with_name("last.pt"))
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key
    rngs = ckpt["train_state"]["rng"]
    assert set(saved_rng(rngs, 0, 1, torch.device("cpu"))) == {"torch"}
    assert torch.equal(saved_rng(rngs, 0, 1, torch.device("cuda", 3))["cuda"], cuda[3])
    assert "cuda" not in saved_rng([{"torch": own["torch"], "cuda": cuda[:2]}], 0, 1, torch.device("cuda", 3))
    assert torch.equal(saved_rng([{"torch": own["torch"], "cuda": cuda[5]}], 0, 1, torch.device("cuda", 0))["cuda"],
                       cuda[5])


def test_persistent_workers_see_each_epoch(tianchi, tmp_path):
    from torch.utils.data import DataLoader

    from rsseg.training.augment import TrainTransform
    from rsseg.training.datasets import TianchiDataset
    from rsseg.training.launch import build_datasets
    from rsseg.training.trainer import Rank, Trainer

    ds = TianchiDataset(tianchi, "all", transform=TrainTransform(crop=32, brightness=0.2))
    loader = DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        first = next(iter(loader))["image"]
        assert torch.equal(first[1], ds[1]["image"]), epoch  # the worker drew this epoch's transform
    assert not torch.equal(ds[1]["image"], (ds.set_epoch(0), ds[1])[1]["image"])
    cfg = load_config(tiny_config(tianchi, tmp_path / "w", device="cpu"), {"data.num_workers": "1"})
    train, val = build_datasets(cfg)
    trainer = Trainer(cfg, Rank(), torch.device("cpu"), train, val, 4)
    assert trainer.loader.persistent_workers and trainer.val_loader.persistent_workers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_uses_the_device_precision_and_resumes(tianchi, tmp_path):
    from rsseg.training.devices import choose_precision, device_facts

    device = torch.device("cuda", 0)
    expected = choose_precision("auto", device_facts(device))
    assert expected == ("bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16")
    out = tmp_path / "cuda"
    fit(load_config(tiny_config(tianchi, out, device="cuda", stop_after=1)))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["meta"]["precision"] == expected and isinstance(ckpt["train_state"]["rng"][0]["cuda"], torch.Tensor)
    fit(load_config(tiny_config(tianchi, out, device="cuda", resume=True)))
    assert load_checkpoint(out / "last.pt")["meta"]["epoch"] == 2


def test_uint8_items_for_gpu_batches_match_the_float_ones(tianchi, tmp_path):
    from rsseg.training.devices import uint8_batches
    from rsseg.training.launch import build_datasets
    from rsseg.training.trainer import Rank, Trainer

    cfg = load_config(tiny_config(tianchi, tmp_path / "u8", device="cpu", precision="fp32"))
    train, val = build_datasets(cfg)
    cuda = torch.device("cuda", 0)
    assert uint8_batches(cuda, (train, val)) and not uint8_batches(torch.device("cpu"), (train, val))
    floats = [train[i] for i in range(2)] + [val[0]]
    train.uint8_items = val.uint8_items = True
    for got, want in zip([train[i] for i in range(2)] + [val[0]], floats, strict=True):
        assert got["image"].dtype == got["mask"].dtype == torch.uint8  # 4x fewer bytes to the GPU
        assert torch.equal(got["image"].float(), want["image"].round())  # augmented values rounded, in 0-255
        assert torch.equal(got["mask"].float(), want["mask"]) and torch.equal(got["valid"].float(), want["valid"])
    trainer = Trainer(cfg, Rank(), torch.device("cpu"), train, val, 4)  # the model normalises uint8 input
    image, mask, valid = trainer._batch(next(iter(trainer.loader)))
    assert image.dtype == torch.uint8 and mask.dtype == valid.dtype == torch.float32
    assert math.isfinite(trainer.train_epoch()["train_loss"])


def test_compile_is_skipped_with_a_warning_where_it_cannot_run(tianchi, tmp_path, monkeypatch, caplog):
    from rsseg.training import devices

    monkeypatch.setattr(devices, "compile_unavailable", lambda device: "no C++ compiler on PATH")
    model = torch.nn.Conv2d(1, 1, 1)
    with caplog.at_level("WARNING", logger="rsseg.training.devices"):
        assert devices.compile_model(model, True, torch.device("cpu")) is model
    assert "run.compile=true skipped: no C++ compiler on PATH" in caplog.text
    assert devices.compile_model(model, False, torch.device("cpu")) is model


@pytest.mark.slow  # inductor compiles CPU kernels (tens of seconds)
def test_compiled_training_runs(tianchi, tmp_path):
    from rsseg.training.devices import compile_unavailable

    reason = compile_unavailable(torch.device("cpu"))
    if reason:
        pytest.skip(f"torch.compile unavailable here: {reason}")
    eager = load_checkpoint(fit(load_config(tiny_config(tianchi, tmp_path / "eager", device="cpu",
                                                        precision="fp32", epochs=1))))
    compiled = load_checkpoint(fit(load_config(tiny_config(tianchi, tmp_path / "compiled", device="cpu",
                                                           precision="fp32", epochs=1, compile=True))))
    for key, value in eager["state_dict"].items():
        assert torch.allclose(compiled["state_dict"][key], value, atol=1e-4), key
