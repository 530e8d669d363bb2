"""Errors that name what the user gave: a prompt that is not text, embeddings of the wrong width, a write that fails."""

import errno
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.diffusion.request import check_request
from hyimage.errors import RequestError
from hyimage.models import HunyuanVAE2D, HYImageDiffusionTransformer
from tests.fixtures.vae_fixtures import tiny_vae_2d_config

SURROGATE = "a fox in the \udcff snow"  # what Python makes of the byte 0xff in a command-line argument


@pytest.mark.parametrize(
    "args, named",
    [
        ({"prompt": SURROGATE}, r"`?prompt`? holds an unpaired surrogate U\+DCFF at character 13"),
        ({"prompt": ["a cat", SURROGATE]}, r"`?prompt`? entry 1 holds an unpaired surrogate U\+DCFF at character 13"),
        ({"prompt": "a cat", "negative_prompt": SURROGATE}, r"negative_prompt`? holds an unpaired surrogate"),
    ],
)
def test_a_lone_surrogate_is_named_with_its_position(args, named) -> None:
    with pytest.raises(RequestError, match=named) as raised:
        check_request(args)
    assert "UTF-8" in str(raised.value)


def test_valid_non_ascii_prompts_pass() -> None:
    check_request({"prompt": "一只狐狸 🦊 im Schnee", "negative_prompt": "ぼやけた"})


def tiny_pipe() -> HunyuanImagePipeline:
    dit = HYImageDiffusionTransformer(
        patch_size=[1, 1], in_channels=64, out_channels=64, hidden_size=32, heads_num=2, mm_double_blocks_depth=1,
        mm_single_blocks_depth=1, rope_dim_list=[8, 8], text_states_dim=24, glyph_byT5_v2=True,
    ).eval()

    def never(*_):
        raise AssertionError("the DiT ran on embeddings that should have been refused")

    dit.register_forward_pre_hook(never)
    return HunyuanImagePipeline(dit=dit, vae=HunyuanVAE2D(**tiny_vae_2d_config()), progress_bar=False)


@pytest.mark.parametrize("name, width", [("prompt_embeds", 40), ("negative_prompt_embeds", 40), ("glyph_embeds", 24)])
def test_embeddings_of_the_wrong_width_are_named_before_the_loop(name, width) -> None:
    embeds = {
        "prompt_embeds": torch.zeros(1, 4, 24), "negative_prompt_embeds": torch.zeros(1, 4, 24),
        "glyph_embeds": torch.zeros(1, 3, 1472), "negative_glyph_embeds": torch.zeros(1, 3, 1472),
    }
    embeds[name] = torch.zeros(1, embeds[name].shape[1], width)
    masks = {key + "_mask": torch.ones(1, value.shape[1], dtype=torch.long) for key, value in embeds.items()}
    expected = 1472 if "glyph" in name else 24
    with pytest.raises(RequestError, match=rf"`{name}` has width {width} .* DiT takes {expected}-wide"):
        tiny_pipe()(prompt=None, width=64, height=64, num_inference_steps=1, guidance_scale=2.0, **embeds, **masks)


@pytest.mark.parametrize("code", [errno.EFBIG, errno.ENOSPC, errno.EDQUOT])
def test_a_failed_png_write_names_the_file(code, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyimage.batch import write_png_atomic
    from hyimage.cli.console import describe
    from hyimage.cli.output import save_png

    def refuse(self, fp, *args, **kwargs):
        raise OSError(code, "the file system said no")

    monkeypatch.setattr(Image.Image, "save", refuse)
    for write, target in ((save_png, tmp_path / "out.png"), (write_png_atomic, tmp_path / "00001.png")):
        with pytest.raises(OSError) as raised:
            write(torch.rand(3, 32, 32), target, {"prompt": "a fox", "seed": 1})
        assert str(target) in describe(raised.value)
        assert list(tmp_path.iterdir()) == []
