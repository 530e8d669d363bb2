"""Loading a DiT from one safetensors file: official and diffusers layouts, strict checks, damaged files."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from hyimage.checkpoints.layout import CheckpointLayout
from hyimage.errors import CheckpointError
from hyimage.loading.dit_diffusers_keys import official_to_diffusers
from hyimage.loading.dit_fused_keys import dit_layout, fused_to_split, split_module_names
from hyimage.loading.safetensors_header import read_tensor_infos
from hyimage.loading.safetensors_io import SafetensorsReader
from hyimage.models import HYImageDiffusionTransformer
from hyimage.quantization.fp8 import convert_to_fp8_linear, fp8_linear_modules

load_dit = HYImageDiffusionTransformer.from_single_file
from tests.fixtures.dit_loading import TINY, assert_same_weights, run, save, tiny_dit, tiny_inputs
from tests.fixtures.numerics import TOLERANCE, max_rel_error


@pytest.fixture(scope="module")
def reference() -> HYImageDiffusionTransformer:
    return tiny_dit()


@pytest.fixture(scope="module")
def official_file(reference, tmp_path_factory) -> Path:
    return save(reference.state_dict(), tmp_path_factory.mktemp("dit") / "tiny.safetensors")


def test_official_layout_loads_strictly_and_matches(reference, official_file):
    expected = run(reference, tiny_inputs())
    for loaded in (
        HYImageDiffusionTransformer.from_single_file(official_file, TINY),
        load_dit(official_file, TINY, device="cpu"),
    ):
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        assert loaded.config == reference.config
        assert_same_weights(loaded, reference)
        assert max_rel_error(run(loaded, tiny_inputs()), expected) <= TOLERANCE


def test_diffusers_layout_loads_and_matches(reference, tmp_path):
    diffusers_state = official_to_diffusers(reference.state_dict())
    assert set(diffusers_state) != set(reference.state_dict())
    path = save(diffusers_state, tmp_path / "diffusers.safetensors")
    loaded = load_dit(path, TINY)
    assert_same_weights(loaded, reference)
    assert max_rel_error(run(loaded, tiny_inputs()), run(reference, tiny_inputs())) <= TOLERANCE


def test_dtype_defaults_to_the_files_and_can_be_overridden(tmp_path):
    path = save(tiny_dit(torch.bfloat16).state_dict(), tmp_path / "bf16.safetensors")
    assert {p.dtype for p in load_dit(path, TINY).parameters()} == {torch.bfloat16}
    upcast = load_dit(path, TINY, dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    assert_same_weights(upcast, tiny_dit().to(torch.bfloat16).float())


def test_missing_key_is_named(reference, tmp_path):
    state = reference.state_dict()
    del state["final_layer.linear.weight"]
    path = save(state, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing.safetensors.*1 missing key.*final_layer\.linear\.weight"):
        load_dit(path, TINY)


def test_extra_key_is_named(reference, tmp_path):
    state = dict(reference.state_dict(), **{"double_blocks.0.surplus.weight": torch.zeros(3)})
    path = save(state, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)extra.safetensors.*1 unexpected key.*double_blocks\.0\.surplus"):
        load_dit(path, TINY)


def test_wrong_shape_is_named(reference, tmp_path):
    state = reference.state_dict()
    state["img_in.proj.weight"] = torch.zeros(32, 4, 2, 2)
    path = save(state, tmp_path / "shape.safetensors")
    with pytest.raises(
        CheckpointError, match=r"(?s)shape.safetensors.*wrong shape.*img_in\.proj\.weight.*\(32, 4, 2, 2\)"
    ):
        load_dit(path, TINY)


def test_wrong_config_lists_all_problems(official_file):
    with pytest.raises(CheckpointError, match=r"(?s)tiny.safetensors.*unexpected key.*wrong shape"):
        load_dit(official_file, dict(TINY, mm_double_blocks_depth=1, hidden_size=48, heads_num=3))


@pytest.mark.parametrize("keep", [5, 40, 0.5, 0.999])
def test_truncated_file_says_incomplete(official_file, tmp_path, keep):
    data = official_file.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors is incomplete.*download it again"):
        load_dit(path, TINY)


def test_other_file_types_are_named(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="model.safetensors is a PyTorch pickle checkpoint.*not a safetensors"):
        load_dit(path, TINY)


def test_files_larger_than_memory_are_read_without_mapping_them(tmp_path):
    """A sparse 64 GB file: its last tensor is read without mapping (or reading) the rest."""
    header = {
        "huge": {"dtype": "BF16", "shape": [2**35], "data_offsets": [0, 2**36]},
        "last": {"dtype": "F32", "shape": [2], "data_offsets": [2**36, 2**36 + 8]},
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.seek(8 + len(encoded) + 2**36)
        file.write(struct.pack("<2f", 1.5, -2.0))
    with SafetensorsReader(path) as reader:
        assert reader.infos["huge"].shape == (2**35,)
        assert reader.get("last").tolist() == [1.5, -2.0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_dit(tmp_path / "nothing.safetensors", TINY)


def test_header_gives_every_shape_and_dtype(official_file):
    infos = read_tensor_infos(official_file)
    state = tiny_dit().state_dict()
    assert {key: (tuple(t.shape), t.dtype) for key, t in state.items()} == {
        key: (info.shape, info.dtype) for key, info in infos.items()
    }


RELEASED = ["hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled", "hunyuanimage-refiner"]


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder to run")
@pytest.mark.parametrize("variant", RELEASED)
def test_released_files_fit_the_model(variant):
    """Header check of the released bf16 and FP8 files against the meta-built model (no weights read), in
    whichever layout (fused or split) each file has."""
    layout = CheckpointLayout(Path(os.environ["HYIMAGE_CKPTS"]))
    if not layout.dit(variant).is_file():
        pytest.skip(f"{layout.dit(variant)} is not there")
    model = HYImageDiffusionTransformer.from_config(variant, device="meta")
    assert model_shapes(layout.dit(variant), model.config.hidden_size) == {
        key: tuple(t.shape) for key, t in model.state_dict().items()
    }
    if layout.dit_fp8(variant).is_file():
        names = fp8_linear_modules(model)
        convert_to_fp8_linear(model, names)
        scales = read_tensor_infos(layout.dit_fp8_scale(variant))
        assert {name for key in scales for name in split_module_names(key)} == set(names)
        stored = model_shapes(layout.dit_fp8(variant), model.config.hidden_size)
        assert set(stored) | {name + ".weight_scale" for name in names} == set(model.state_dict())
        infos = read_tensor_infos(layout.dit_fp8(variant))
        assert {info.dtype for key, info in infos.items() if key.rpartition(".")[2] == "weight"} >= {torch.float8_e4m3fn}


def model_shapes(path: Path, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The model keys and shapes a DiT file gives, in either layout, from its header alone."""
    with SafetensorsReader(path) as reader:
        kind = dit_layout(path, [key.rpartition(".")[0] for key in reader.keys()])
        if kind == "split":
            return {key: info.shape for key, info in reader.infos.items()}
        return {key: tuple(t.shape) for key, t in fused_to_split(reader.keys(), reader.get_meta, hidden_size=hidden_size)}
