import pytest
import torch
from stand_ins import TINY_ARCH

from rsseg.errors import CheckpointError, ConfigError
from rsseg.models import create_model, load_checkpoint, model_config, model_from_checkpoint, save_checkpoint

LIGHT_UNET = dict(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[32, 16, 8])


def test_unet_takes_raw_pixels_and_normalises_inside():
    torch.manual_seed(0)
    model = create_model(**LIGHT_UNET).eval()
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = model(raw)
        direct = model.net((raw.float() - model.mean) / model.std)
    assert out.shape == (2, 1, 64, 64)
    assert torch.allclose(out, direct)


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = create_model(**LIGHT_UNET).eval()
    cfg = model_config(model, **LIGHT_UNET)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, meta={"epoch": 3, "threshold": 0.45})
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    again, ckpt = model_from_checkpoint(path)
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert ckpt["meta"] == {"epoch": 3, "threshold": 0.45}
    assert ckpt["model"]["decoder_channels"] == [32, 16, 8] and ckpt["model"]["encoder_weights"] is None


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    model = create_model(**LIGHT_UNET)
    path = save_checkpoint(tmp_path / "m.pt", model, model_config(model, **LIGHT_UNET))
    ckpt = load_checkpoint(path)
    ckpt["model"]["encoder"] = "resnet34"  # the weights are resnet18's
    with pytest.raises(CheckpointError, match=r"\(unet/resnet34, 3 bands\) do not fit the model"):
        model_from_checkpoint(ckpt)
    ckpt["model"] = {"arch": TINY_ARCH}
    with pytest.raises(CheckpointError, match=r"\(stand_ins:TinyNet, 3 bands\) do not fit the model"):
        model_from_checkpoint(ckpt)


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an rsseg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_model_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown arch 'unet3d'; expected one of unet"):
        create_model("unet3d")
    with pytest.raises(ConfigError, match="unknown encoder"):
        create_model("unet", "resnet999")
    with pytest.raises(ConfigError, match="decoder_channels"):
        create_model("unet", "resnet18", encoder_depth=3, decoder_channels=[8, 8])


def test_a_network_of_your_own_by_module_path():
    model = create_model(TINY_ARCH, in_channels=4, width=4)
    assert model(torch.zeros(2, 4, 16, 16)).shape == (2, 1, 16, 16)
    assert model.mean.flatten().tolist() == [0.0] * 4 and model.std.flatten().tolist() == [255.0] * 4
    assert sum(p.numel() for p in model.parameters()) < 5000
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        create_model("no_such_module:Net")
    with pytest.raises(ConfigError, match="module 'stand_ins' has no 'NoNet'"):
        create_model("stand_ins:NoNet")
    with pytest.raises(ConfigError, match="expected a torch.nn.Module subclass"):
        create_model("stand_ins:TINY_ARCH")
    with pytest.raises(ConfigError, match="cannot build arch 'stand_ins:TinyNet'") as exc:
        create_model(TINY_ARCH, depth=3)
    assert isinstance(exc.value.__cause__, TypeError)  # the cause is chained


def test_encoder_weights_from_a_local_state_dict(tmp_path):
    donor = create_model("unet", "resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])
    torch.nn.init.normal_(donor.net.encoder.conv1.weight)
    path = tmp_path / "resnet18.pt"
    torch.save(donor.net.encoder.state_dict(), path)
    model = create_model("unet", "resnet18", encoder_weights=path, encoder_depth=3, decoder_channels=[16, 8, 4])
    for key, value in donor.net.encoder.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[key], value), key
    wrapped = tmp_path / "wrapped.pt"  # a whole model's dict, encoder keys prefixed, plus a classifier
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in donor.net.encoder.state_dict().items()}}, wrapped)
    model = create_model("unet", "resnet18", encoder_weights=wrapped, encoder_depth=3, decoder_channels=[16, 8, 4])
    assert torch.equal(model.net.encoder.conv1.weight, donor.net.encoder.conv1.weight)


def test_encoder_weights_that_do_not_fit_are_one_line(tmp_path):
    donor = create_model("unet", "resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])
    state = donor.net.encoder.state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"resnet18.pt does not fit the encoder: \d+ missing keys \(layer") as err:
        create_model("unet", "resnet34", encoder_weights=path, encoder_depth=3, decoder_channels=[16, 8, 4])
    assert "\n" not in str(err.value) and "is it the state dict of this encoder" in str(err.value)
    extra = tmp_path / "extra.pt"
    torch.save({**state, "head.weight": torch.zeros(2)}, extra)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(head.weight\)"):
        create_model("unet", "resnet18", encoder_weights=extra, encoder_depth=3, decoder_channels=[16, 8, 4])
    with pytest.raises(CheckpointError, match=r"1 shape mismatches \(conv1.weight \(64, 3, 7, 7\) vs \(64, 4, 7, 7\)"):
        create_model("unet", "resnet18", encoder_weights=path, in_channels=4, encoder_depth=3,
                     decoder_channels=[16, 8, 4])
    (tmp_path / "junk.pt").write_text("not torch")
    with pytest.raises(CheckpointError, match="not a loadable torch state dict"):
        create_model("unet", "resnet18", encoder_weights=tmp_path / "junk.pt")
