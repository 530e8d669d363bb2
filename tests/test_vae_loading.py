"""Loading VAE folders in the release format and diffusers' format, and refusing broken or unsafe files."""

import json
import os

import pytest
import torch

from hyimage.errors import CheckpointError
from hyimage.loading.vae_diffusers_keys import refiner_vae_key_map, vae_2d_key_map
from hyimage.models import AutoencoderKLConv3D, HunyuanVAE2D
from tests.fixtures.numerics import TOLERANCE, max_rel_error
from tests.fixtures.vae_fixtures import (
    random_vae_state_dict,
    tiny_refiner_vae_config,
    tiny_vae_2d_config,
    write_refiner_vae_dir,
    write_vae_2d_dir,
)


@pytest.fixture(scope="module")
def vae_2d_weights():
    return random_vae_state_dict(HunyuanVAE2D, tiny_vae_2d_config(), seed=3)


@pytest.fixture(scope="module")
def vae_2d_reference(vae_2d_weights):
    """The diffusers model holding the same weights, and its decode of a fixed latent."""
    diffusers = pytest.importorskip("diffusers")
    config = tiny_vae_2d_config()
    model = diffusers.AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=64,
        block_out_channels=config["block_out_channels"],
        layers_per_block=1,
        spatial_compression_ratio=32,
        sample_size=config["sample_size"],
        scaling_factor=config["scaling_factor"],
    ).eval()
    key_map = vae_2d_key_map(vae_2d_weights, 1, num_resample_levels=5)
    model.load_state_dict({key_map[k]: v for k, v in vae_2d_weights.items()}, strict=True)
    latents = torch.randn(1, 64, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, latents, model.decode(latents).sample


@pytest.mark.parametrize(
    "filename,wrap,prefix,conv_5d",
    [
        ("pytorch_model.ckpt", True, "vae.", False),
        ("pytorch_model.ckpt", True, "vae.", True),
        ("pytorch_model.pt", False, "vae.", True),
        ("pytorch_model.pt", False, "", False),
    ],
)
def test_release_layouts_load_and_decode_like_diffusers(
    tmp_path, vae_2d_weights, vae_2d_reference, filename, wrap, prefix, conv_5d
):
    folder = write_vae_2d_dir(
        tmp_path / "vae_2_1", state_dict=vae_2d_weights, filename=filename, wrap=wrap, prefix=prefix, conv_5d=conv_5d
    )
    vae = HunyuanVAE2D.from_pretrained(folder)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor == 0.75289 and vae.config.latent_channels == 64
    for key, value in vae.state_dict().items():
        assert torch.equal(value, vae_2d_weights[key]), key
    _, latents, expected = vae_2d_reference
    with torch.no_grad():
        assert max_rel_error(vae.decode(latents).sample, expected) < TOLERANCE


def test_release_checkpoint_ignores_other_prefixes_and_converts_dtype(tmp_path, vae_2d_weights):
    folder = tmp_path / "vae_2_1"
    write_vae_2d_dir(folder, state_dict=vae_2d_weights)
    stored = torch.load(folder / "pytorch_model.ckpt", weights_only=True)
    stored["state_dict"]["loss.discriminator.weight"] = torch.zeros(3)
    torch.save(stored, folder / "pytorch_model.ckpt")
    vae = HunyuanVAE2D.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    key = "decoder.conv_in.weight"
    assert torch.equal(vae.state_dict()[key], vae_2d_weights[key].to(torch.bfloat16))


def test_refiner_release_folder_loads(tmp_path):
    config = tiny_refiner_vae_config()
    weights = random_vae_state_dict(AutoencoderKLConv3D, config, seed=4)
    vae = AutoencoderKLConv3D.from_pretrained(write_refiner_vae_dir(tmp_path / "vae_refiner", state_dict=weights))
    assert vae.config.ffactor_temporal == 4 and vae.config.scaling_factor == 1.03682
    for key, value in vae.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_diffusers_layouts_load(tmp_path, vae_2d_weights, vae_2d_reference):
    diffusers = pytest.importorskip("diffusers")
    reference, latents, expected = vae_2d_reference
    reference.save_pretrained(tmp_path / "vae")
    vae = HunyuanVAE2D.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        assert max_rel_error(vae.decode(latents).sample, expected) < TOLERANCE

    config = tiny_refiner_vae_config()
    weights = random_vae_state_dict(AutoencoderKLConv3D, config, seed=5)
    refiner = diffusers.AutoencoderKLHunyuanImageRefiner(
        latent_channels=32, block_out_channels=config["block_out_channels"], layers_per_block=1
    ).eval()
    key_map = refiner_vae_key_map(weights)
    refiner.load_state_dict({key_map[k]: v for k, v in weights.items()}, strict=True)
    refiner.save_pretrained(tmp_path / "refiner_vae")
    loaded = AutoencoderKLConv3D.from_pretrained(tmp_path / "refiner_vae")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[key]), key
    with pytest.raises(CheckpointError, match="load it with AutoencoderKLConv3D"):
        HunyuanVAE2D.from_pretrained(tmp_path / "refiner_vae")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickle_is_refused_without_running(tmp_path):
    folder = write_vae_2d_dir(tmp_path / "vae_2_1")
    marker = tmp_path / "pwned"
    weights = torch.load(folder / "pytorch_model.ckpt", weights_only=True)
    weights["payload"] = _RunsCode(str(marker))
    torch.save(weights, folder / "pytorch_model.ckpt")
    with pytest.raises(CheckpointError, match="refuses files that could run code") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert "pytorch_model.ckpt" in str(error.value)
    assert not marker.exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    folder = write_vae_2d_dir(tmp_path / "vae_2_1")
    path = folder / "pytorch_model.ckpt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(path) in str(error.value) and "download it again" in str(error.value)


def test_config_missing_a_key_names_file_and_key(tmp_path):
    folder = write_vae_2d_dir(tmp_path / "vae_2_1")
    config = tiny_vae_2d_config()
    del config["latent_channels"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json lacks the key\(s\) \['latent_channels'\]"):
        HunyuanVAE2D.from_pretrained(folder)


def test_malformed_or_missing_files_give_clear_errors(tmp_path):
    folder = write_vae_2d_dir(tmp_path / "vae_2_1")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        HunyuanVAE2D.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        HunyuanVAE2D.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HunyuanVAE2D.from_pretrained(tmp_path / "nowhere")

    folder = write_vae_2d_dir(tmp_path / "no_weights")
    (folder / "pytorch_model.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no VAE weights \(pytorch_model.ckpt or pytorch_model.pt\)"):
        HunyuanVAE2D.from_pretrained(folder)


def test_checkpoint_of_another_shape_lists_the_keys(tmp_path):
    folder = write_vae_2d_dir(tmp_path / "vae_2_1")
    config = tiny_vae_2d_config()
    config["block_out_channels"] = [32, 32, 64, 64, 128, 256]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit HunyuanVAE2D") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert "wrong shapes" in str(error.value) and "pytorch_model.ckpt" in str(error.value)


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder to run")
@pytest.mark.parametrize("model_cls,manifest_name", [(HunyuanVAE2D, "vae_2_1"), (AutoencoderKLConv3D, "vae_refiner")])
def test_released_vae_loads_and_reconstructs(model_cls, manifest_name):
    from pathlib import Path

    from hyimage.checkpoints.layout import CheckpointLayout
    from tests.fixtures.manifests import load_manifest

    layout = CheckpointLayout(Path(os.environ["HYIMAGE_CKPTS"]))
    folder = layout.vae if model_cls is HunyuanVAE2D else layout.refiner_vae
    vae = model_cls.from_pretrained(folder)
    manifest = load_manifest(manifest_name)
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == {
        k: shape for k, (shape, _) in manifest["state_dict"].items()
    }
    side = torch.linspace(-1, 1, 64)
    image = torch.stack([side[None, :].expand(64, 64), side[:, None].expand(64, 64), side.outer(side)])[None]
    if model_cls is AutoencoderKLConv3D:
        image = image.unsqueeze(2)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(image).latent_dist.mode()).sample
    assert (reconstruction - image).abs().mean() < 0.05
