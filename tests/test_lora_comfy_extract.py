"""LoRAs from ComfyUI's "Extract and Save Lora" node (`.diff`, `.diff_b`, fp16, no alpha, a 4-D LoRA on the patch
embedding, adapters outside the blocks) against the weights merged as ComfyUI merges them."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hyimage.lora import LoraMixin
from hyimage.lora.layers import BANK
from hyimage.models import HYImageDiffusionTransformer
from hyimage.offload import MemoryManager
from hyimage.quantization.fp8 import (
    FP8Linear,
    convert_to_fp8_linear,
    fp8_linear_modules,
)
from tests.fixtures.comfy_lora import extracted_lora, merged_as_comfy
from tests.fixtures.numerics import max_rel_error

CONFIG = dict(
    patch_size=[1, 1], in_channels=4, out_channels=4, hidden_size=32, heads_num=2, mlp_width_ratio=2,
    mm_double_blocks_depth=1, mm_single_blocks_depth=1, rope_dim_list=[8, 8], text_states_dim=24,
    glyph_byT5_v2=False, guidance_embed=True, use_meanflow=True,
)
H = CONFIG["hidden_size"]
EXACT = 1e-5


def random_state(seed: int, like: dict[str, torch.Tensor], scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=g) * scale for key, value in like.items()}


def dit(state: dict[str, torch.Tensor]) -> HYImageDiffusionTransformer:
    model = HYImageDiffusionTransformer(**CONFIG).eval()
    model.load_state_dict(state)
    return model


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    return dict(
        hidden_states=torch.randn(2, 4, 4, 6, generator=g), timestep=torch.tensor([500.0, 250.0]),
        text_states=torch.randn(2, 6, 24, generator=g), encoder_attention_mask=mask,
        guidance=torch.tensor([3250.0, 4000.0]), timesteps_r=torch.tensor([250.0, 100.0]),
    )


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs())


class Holder(LoraMixin):
    def __init__(self, model: nn.Module) -> None:
        self.dit, self.memory = model, MemoryManager()


@pytest.fixture(scope="module")
def states() -> tuple[dict, dict]:
    like = HYImageDiffusionTransformer(**CONFIG, device="meta").state_dict()
    base = random_state(0, like)
    tuned = {key: value + delta for (key, value), delta in zip(base.items(), random_state(1, like, 0.05).values())}
    for key in tuned:  # ComfyUI names the q/k norm weights `.scale`: the extractor never writes them
        if "q_norm" in key or "k_norm" in key:
            tuned[key] = base[key]
    return base, tuned


@pytest.mark.parametrize("full_diff", [False, True], ids=["standard", "full_diff"])
def test_extracted_lora_equals_comfys_merge(states, full_diff, tmp_path: Path) -> None:
    base, tuned = states
    lora = extracted_lora(base, tuned, rank=4, full_diff=full_diff)
    assert not any(key.endswith(".alpha") for key in lora) and {v.dtype for v in lora.values()} == {torch.float16}
    if not full_diff:
        assert lora["diffusion_model.img_in.proj.lora_up.weight"].shape == (H, 4, 1, 1)
        assert lora["diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.diff"].ndim == 1
    for key in ("time_in.in_layer", "txt_in.t_embedder.in_layer", "final_layer.linear", "double_blocks.0.img_attn.qkv",
                "txt_in.individual_token_refiner.blocks.0.self_attn.qkv", "time_r_in.out_layer"):
        assert f"diffusion_model.{key}.diff_b" in lora
    path = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    save_file(lora, str(path))
    holder = Holder(dit(base))
    holder.load_lora_weights(path, scale=0.7)
    adapted = {name.rpartition(".")[0] for name, _ in holder.dit.named_modules() if name.endswith("." + BANK)}
    assert {"img_in.proj", "time_in.mlp.0", "txt_in.t_embedder.mlp.0", "final_layer.linear",
            "txt_in.individual_token_refiner.blocks.1.norm2",
            "txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "double_blocks.0.img_attn_k"} <= adapted
    expected = run(dit(merged_as_comfy(base, lora, 0.7, H)))
    assert max_rel_error(run(holder.dit), expected) <= EXACT
    assert max_rel_error(run(dit(base)), expected) > 1e-3
    if full_diff:  # the whole difference at strength 1 is the tuned model, up to fp16 rounding of the difference
        holder.set_adapters(holder.get_list_adapters(), 1.0)
        assert max_rel_error(run(holder.dit), run(dit(tuned))) <= 1e-3


def test_unload_and_fuse_unfuse_are_exact(states) -> None:
    base, tuned = states
    lora = extracted_lora(base, tuned, rank=4)
    holder = Holder(dit(base))
    before = run(holder.dit)
    original = {k: v.clone() for k, v in holder.dit.state_dict().items()}
    holder.load_lora_weights(lora, scale=0.5)
    side_branch = run(holder.dit)
    holder.fuse_lora()
    changed = {k for k, v in holder.dit.state_dict().items() if not torch.equal(v, original[k])}
    assert {"img_in.proj.weight", "img_in.proj.bias", "time_in.mlp.0.bias",
            "txt_in.individual_token_refiner.blocks.0.norm1.weight"} <= changed
    assert max_rel_error(run(holder.dit), side_branch) <= EXACT
    holder.unfuse_lora()
    assert all(torch.equal(v, original[k]) for k, v in holder.dit.state_dict().items())
    assert torch.equal(run(holder.dit), side_branch)
    holder.unload_lora_weights()
    assert torch.equal(run(holder.dit), before)
    assert all(not module._forward_hooks for module in holder.dit.modules())


def test_fp8_base_runs_diffs_as_a_side_branch(states) -> None:
    """A `.diff` on an FP8 weight runs beside it (exact); fusing requantises weight + diff."""
    base, tuned = states
    lora = extracted_lora(base, tuned, rank=4, full_diff=True)
    model = dit(base)
    convert_to_fp8_linear(model, fp8_linear_modules(model))
    dequantized = {
        key: (model.get_submodule(key[: -len(".weight")]).weight.float()
              * model.get_submodule(key[: -len(".weight")]).weight_scale)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float8_e4m3fn else value
        for key, value in model.state_dict().items() if not key.endswith(".weight_scale")
    }
    holder = Holder(model)
    holder.load_lora_weights(lora, scale=0.7)
    expected = run(dit(merged_as_comfy(dequantized, lora, 0.7, H)))
    assert max_rel_error(run(model), expected) <= EXACT
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    holder.fuse_lora()
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    assert max_rel_error(run(model), expected) <= 0.1  # e4m3 requantisation, as in test_lora
    holder.unfuse_lora()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_wrong_shapes_are_named(states) -> None:
    base, tuned = states
    lora = extracted_lora(base, tuned, rank=4)
    lora["diffusion_model.final_layer.linear.diff_b"] = torch.zeros(7, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"final_layer.linear.*diff_b.*7 output rows"):
        Holder(dit(base)).load_lora_weights(lora)
    lora = extracted_lora(base, tuned, rank=4)
    lora["diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.lora_up.weight"] = torch.zeros(H, 2)
    lora["diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.lora_down.weight"] = torch.zeros(2, H)
    with pytest.raises(ValueError, match="norm1.*only .diff/.diff_b"):
        Holder(dit(base)).load_lora_weights(lora)


def test_plan_counts_an_extracted_lora(states, tmp_path: Path) -> None:
    from hyimage.offload.dit_weights import dit_weights
    from hyimage.offload.request import PlanRequest, lora_layout

    base, tuned = states
    path = tmp_path / "extracted.safetensors"
    save_file(extracted_lora(base, tuned, rank=4), str(path))
    request = PlanRequest(variant="hunyuanimage-v2.1-distilled", dit_config=CONFIG)
    layout = lora_layout(path, request)
    assert ("img_in.proj", 4) in layout.ranks and ("txt_in.individual_token_refiner.blocks.1.norm2", 0) in layout.ranks
    from hyimage.models.dit.configs import resolve_dit_config

    assert dit_weights(resolve_dit_config(CONFIG), False, None, None, (layout,)).part.total > 0


def test_plan_counts_the_dense_differences(states, tmp_path: Path) -> None:
    """A full_diff file's `.diff`/`.diff_b` tensors are held on the GPU beside the layers (in the compute dtype,
    bf16): the planned DiT grows by at least their numbers x 2 bytes, read from the file itself; the same layout is
    found from the adapters once attached."""
    from hyimage.models.dit.configs import resolve_dit_config
    from hyimage.offload.dit_weights import dit_weights, lora_layouts
    from hyimage.offload.request import PlanRequest, lora_layout

    base, tuned = states
    state = extracted_lora(base, tuned, rank=4, full_diff=True)
    dense = sum(t.numel() for key, t in state.items() if key.endswith((".diff", ".diff_b")))
    assert dense > 0
    path = tmp_path / "full_diff.safetensors"
    save_file(state, str(path))
    config = resolve_dit_config(CONFIG)
    layout = lora_layout(path, PlanRequest(variant="hunyuanimage-v2.1-distilled", dit_config=CONFIG))
    plain = dit_weights(config, False, None, None, ()).part.total
    low_rank_only = replace(layout, dense=())
    with_dense = dit_weights(config, False, None, None, (layout,)).part.total
    assert with_dense - dit_weights(config, False, None, None, (low_rank_only,)).part.total == 2 * dense
    assert with_dense - plain >= 2 * dense

    model = HYImageDiffusionTransformer(**CONFIG).eval()

    class Holder(LoraMixin):
        dit, memory = model, None

    Holder().load_lora_weights(str(path), adapter_name=layout.name)
    assert lora_layouts(model) == (layout,)
