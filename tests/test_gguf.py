"""GGUF DiTs: dequantisers against the `gguf` package and the spec formulas, files written with `gguf`, a pipeline."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from hyimage.errors import CheckpointError
from hyimage.models import HYImageDiffusionTransformer
from hyimage.quantization.gguf import GGUFLinear, dequantize

load_dit = HYImageDiffusionTransformer.from_single_file
from tests.fixtures.gguf_files import CONFIG, F16_FIELDS, K_TYPES, H, random_blocks, write_gguf
from tests.fixtures.numerics import max_rel_error
from tests.fixtures.tiny_dit import make_inputs, randomize_

WRITABLE = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_dequantizers_match_the_gguf_package(qtype) -> None:
    raw = random_blocks(qtype, 3, 512, np.random.default_rng(int(qtype)))
    expected = quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), int(qtype), expected.shape, torch.float32)
    assert np.array_equal(ours.numpy(), expected)


def f16(value: float) -> bytes:
    return struct.pack("<e", value)


def test_k_quant_blocks_by_the_spec_formulas() -> None:
    """Hand-made blocks, each value computed from the ggml block formulas written out here."""
    q = [(i * 7 + 3) % 256 for i in range(256)]  # a fixed byte pattern reused for the quant bytes
    # Q4_K: d=0.5, dmin=0.25; 6-bit (scale, min) j<4: scales[j]&63, scales[j+4]&63; j>=4 from bytes 8-11 + top bits
    scales = [1, 2, 3, 4, 5, 6, 7, 8, 0x21, 0x43, 0x65, 0x87]
    block = f16(0.5) + f16(0.25) + bytes(scales) + bytes(q[:128])

    def k4(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    expected = []
    for chunk in range(4):
        for half in range(2):
            sc, mn = k4(2 * chunk + half)
            for l in range(32):
                nibble = (q[32 * chunk + l] >> (4 * half)) & 0xF
                expected.append(0.5 * sc * nibble - 0.25 * mn)
    check(block, T.Q4_K, expected)

    # Q5_K: as Q4_K plus bit (2*chunk + half) of qh[l] adds 16
    qh = [(i * 37 + 11) % 256 for i in range(32)]
    block = f16(0.5) + f16(0.25) + bytes(scales) + bytes(qh) + bytes(q[:128])
    expected = []
    for chunk in range(4):
        for half in range(2):
            sc, mn = k4(2 * chunk + half)
            for l in range(32):
                value = ((q[32 * chunk + l] >> (4 * half)) & 0xF) + 16 * ((qh[l] >> (2 * chunk + half)) & 1)
                expected.append(0.5 * sc * value - 0.25 * mn)
    check(block, T.Q5_K, expected)

    # Q6_K: ql[128], qh[64], int8 scales[16], d; per 128 values: four groups of 32, scale per 16
    sc6 = [(-1) ** i * (i + 1) for i in range(16)]
    block = bytes(q[:128]) + bytes(qh + qh) + struct.pack("<16b", *sc6) + f16(0.125)
    expected = [0.0] * 256
    for n in range(2):
        ql, qhh = q[64 * n : 64 * n + 64], (qh + qh)[32 * n : 32 * n + 32]
        for l in range(32):
            vals = [
                (ql[l] & 0xF) | ((qhh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qhh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qhh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qhh[l] >> 6) & 3) << 4),
            ]
            for g, v in enumerate(vals):
                expected[128 * n + 32 * g + l] = 0.125 * sc6[8 * n + l // 16 + 2 * g] * (v - 32)
    check(block, T.Q6_K, expected)

    # Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin; 2-bit q at shift 2j of qs[32n + l]
    sc2 = [(i * 29 + 5) % 256 for i in range(16)]
    block = bytes(sc2) + bytes(q[:64]) + f16(0.5) + f16(0.25)
    expected = []
    for n in range(2):
        for j in range(4):
            for half in range(2):
                s = sc2[8 * n + 2 * j + half]
                for l in range(16):
                    expected.append(0.5 * (s & 0xF) * ((q[32 * n + 16 * half + l] >> (2 * j)) & 3) - 0.25 * (s >> 4))
    check(block, T.Q2_K, expected)

    # Q3_K: hmask[32], qs[64], 12 scale bytes (16 six-bit scales - 32), d; q - 4 where the hmask bit is clear
    raw_scales = [(i * 53 + 17) % 256 for i in range(12)]
    six = [
        ((raw_scales[i % 8] >> (4 * (i // 8))) & 0xF) | (((raw_scales[8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
        for i in range(16)
    ]
    block = bytes(qh) + bytes(q[:64]) + bytes(raw_scales) + f16(0.25)
    expected = []
    for n in range(2):
        for j in range(4):
            for half in range(2):
                scale = six[8 * n + 2 * j + half] - 32
                for l in range(16):
                    index = 16 * half + l
                    value = ((q[32 * n + index] >> (2 * j)) & 3) - (0 if (qh[index] >> (4 * n + j)) & 1 else 4)
                    expected.append(0.25 * scale * value)
    check(block, T.Q3_K, expected)


def check(block: bytes, qtype: T, expected: list[float]) -> None:
    raw = torch.frombuffer(bytearray(block), dtype=torch.uint8)
    assert raw.numel() == GGML_QUANT_SIZES[qtype][1]
    ours = dequantize(raw, int(qtype), (256,), torch.float64)
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6), qtype.name
    reference = quants.dequantize(np.frombuffer(block, dtype=np.uint8), qtype)
    assert np.allclose(reference, expected, atol=1e-6), qtype.name


@pytest.fixture(scope="module")
def model() -> HYImageDiffusionTransformer:
    model = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
    randomize_(model)
    return model


def test_gguf_file_loads_as_its_dequantised_weights(model, tmp_path: Path) -> None:
    """One file with every type the gguf package writes (F16, BF16, Q8_0, Q4_0/1, Q5_0/1) and the K types
    it cannot write (hand-made blocks), one per block linear; fused tensors split by rows of blocks."""
    path = tmp_path / "dit.gguf"
    stored = write_gguf(model, path, WRITABLE + K_TYPES)
    loaded = HYImageDiffusionTransformer.from_single_file(path, CONFIG.to_dict(), dtype=torch.float32)
    quantised = {name: m for name, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
    assert {m.type_id for m in quantised.values()} == {int(t) for t in WRITABLE[2:] + K_TYPES}
    assert any(name.endswith(("_attn_v", "linear1_mlp")) for name in quantised)  # pieces of fused rows
    assert all(m.weight.dtype == torch.uint8 for m in quantised.values())
    reference = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
    reference.load_state_dict(stored)
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        assert max_rel_error(loaded(**inputs), reference(**inputs)) <= 1e-5


@pytest.mark.slow
def test_gguf_dit_runs_the_pipeline_and_takes_a_lora(model, tmp_path: Path) -> None:
    from hyimage.offload import MemoryManager
    from tests.fixtures.tiny_pipeline import fixed_inputs, make_pipe, tiny_vae

    path = tmp_path / "dit-Q8_0.gguf"
    stored = write_gguf(model, path, [T.Q8_0, T.Q4_K], prefix="model.diffusion_model.")
    gguf_dit = load_dit(path, CONFIG.to_dict(), dtype=torch.float32)
    reference = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
    reference.load_state_dict(stored)
    vae = tiny_vae()
    inputs = fixed_inputs()
    call = dict(num_inference_steps=2, output_type="latent", **{k: v for k, v in inputs.items() if "negative" not in k})
    ours = make_pipe(gguf_dit, vae)(**call)
    expected = make_pipe(reference, vae)(**call)
    assert max_rel_error(ours, expected) <= 1e-5

    pipe = make_pipe(gguf_dit, vae, memory=MemoryManager(mode="block"))  # the quantised bytes stream with the blocks
    g = torch.Generator().manual_seed(0)
    pipe.load_lora_weights(
        {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, H, generator=g) * 0.1,
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(
                3 * H + model.single_blocks[0].linear1_mlp.out_features, 2, generator=g
            )
            * 0.1,
        }
    )
    assert max_rel_error(pipe(**call), expected) > 1e-4
    with pytest.raises(ValueError, match="GGUF"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert torch.equal(pipe(**call), ours)
    assert pipe.memory.streamer(gguf_dit).counts["load"] >= len(pipe.memory.streamer(gguf_dit).plan.streamed) > 0


def test_split_layout_gguf(model, tmp_path: Path) -> None:
    """A GGUF made from a split-layout file (the distilled release) keeps its keys: read as they are."""
    path = tmp_path / "split.gguf"
    stored = write_gguf(model, path, [T.Q5_K, T.Q8_0], fused=False)
    loaded = load_dit(path, CONFIG.to_dict(), dtype=torch.float32)
    assert isinstance(loaded.double_blocks[0].img_attn_k, GGUFLinear)
    reference = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
    reference.load_state_dict(stored)
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        assert max_rel_error(loaded(**inputs), reference(**inputs)) <= 1e-5


def test_wrong_model_is_named_before_reading(model, tmp_path: Path) -> None:
    path = tmp_path / "dit.gguf"
    write_gguf(model, path, [T.Q8_0])
    other = dict(CONFIG.to_dict(), mm_single_blocks_depth=3)
    with pytest.raises(CheckpointError, match="missing keys.*single_blocks.2"):
        load_dit(path, other)


def test_from_pretrained_takes_a_dit_file(model, tmp_path: Path) -> None:
    from hyimage.checkpoints.layout import CheckpointLayout
    from hyimage.diffusion.pipelines.factories import dit_factory
    from hyimage.offload import MemoryManager

    path = tmp_path / "hunyuanimage2.1-distilled-Q4_K.gguf"
    write_gguf(model, path, [T.Q4_K])
    args = (CheckpointLayout(tmp_path), "hunyuanimage-v2.1-distilled", CONFIG.to_dict(), False, torch.float32)
    dit = dit_factory(*args, MemoryManager(), None, None, dit_file=path)()
    assert isinstance(dit.single_blocks[0].linear1_q, GGUFLinear)
    with pytest.raises(FileNotFoundError, match="dit_file"):
        dit_factory(*args, MemoryManager(), None, None, dit_file=tmp_path / "absent.gguf")


# What llama-quantize leaves at high precision besides 1-D tensors is its choice; the distilled model's
# `time_r_in` is quantised like the blocks by every tool, and a user may quantise every linear.
OUTSIDE_BLOCKS = ("time_in.", "time_r_in.", "guidance_in.", "txt_in.", "img_in.", "final_layer.", "byt5_in.")


@pytest.mark.parametrize(
    "qtype",
    [t if t in (T.Q8_0, T.Q4_K) else pytest.param(t, marks=pytest.mark.slow) for t in [T.F16, T.BF16, *F16_FIELDS]],
    ids=lambda t: t.name,
)
def test_gguf_with_quantised_embedders_and_final_layer_runs(model, qtype, tmp_path: Path) -> None:
    """Every 2-D weight whose rows fit the type's blocks is quantised, the embedders and the final layer
    included (the first forward used to cast the timestep features to the ggml bytes' uint8)."""
    block = GGML_QUANT_SIZES[qtype][0]
    path = tmp_path / "all-linears.gguf"
    stored = write_gguf(
        model, path, [qtype], quantise=lambda key, data: data.ndim == 2 and data.shape[1] % block == 0, amplitude=1e-4
    )
    loaded = load_dit(path, CONFIG.to_dict(), dtype=torch.float32)
    quantised = {name for name, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
    if qtype in (T.F16, T.BF16):
        assert not quantised  # plain types are read as float tensors
    else:
        assert {"time_in.mlp.0", "time_r_in.mlp.0", "guidance_in.mlp.2", "txt_in.t_embedder.mlp.0"} <= quantised
        assert {"final_layer.linear", "final_layer.adaLN_modulation.1"} <= quantised
        assert any(name.startswith("txt_in.individual_token_refiner") for name in quantised)
    reference = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
    reference.load_state_dict(stored)
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        ours = loaded(**inputs)
        assert ours.dtype == torch.float32
        assert max_rel_error(ours, reference(**inputs)) <= 1e-5
    # a bf16 load computes the embedders in bf16, as the released bf16 model does
    half = {k: v.to(torch.bfloat16) if k.endswith("states") else v for k, v in inputs.items()}
    with torch.no_grad():
        assert load_dit(path, CONFIG.to_dict())(**half).dtype == torch.bfloat16


def test_gguf_base_takes_comfy_diffs_as_a_side_branch(model, tmp_path: Path) -> None:
    """ComfyUI's `.diff` (full weight difference) and `.diff_b` on quantised GGUF layers: run beside the ggml weight
    (it cannot be requantised here), equal to the dequantised weight plus the difference; unload is exact."""
    from hyimage.lora import LoraMixin
    from tests.fixtures.comfy_lora import merged_as_comfy

    path = tmp_path / "dit.gguf"
    stored = write_gguf(model, path, [T.Q8_0, T.Q4_K])
    loaded = load_dit(path, CONFIG.to_dict(), dtype=torch.float32)
    assert isinstance(loaded.single_blocks[0].linear1_q, GGUFLinear)
    g = torch.Generator().manual_seed(5)
    linear1_rows = 3 * H + model.single_blocks[0].linear1_mlp.out_features
    lora = {
        "diffusion_model.single_blocks.0.linear1.diff": (torch.randn(linear1_rows, H, generator=g) * 0.01).half(),
        "diffusion_model.single_blocks.0.linear1.diff_b": (torch.randn(linear1_rows, generator=g) * 0.1).half(),
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": (torch.randn(3 * H, generator=g) * 0.1).half(),
    }

    class Holder(LoraMixin):
        dit, memory = loaded, None

    holder = Holder()
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        before = loaded(**inputs)
        holder.load_lora_weights(lora, scale=0.8)
        expected = HYImageDiffusionTransformer(**CONFIG.to_dict()).eval()
        expected.load_state_dict(merged_as_comfy(stored, lora, 0.8, H))
        assert max_rel_error(loaded(**inputs), expected(**inputs)) <= 1e-5
        with pytest.raises(ValueError, match="GGUF"):
            holder.fuse_lora()
        holder.unload_lora_weights()
        assert torch.equal(loaded(**inputs), before)
