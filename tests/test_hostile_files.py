"""Hostile and damaged files: each is written here by hand, and each must be refused with an error naming the file.

Safetensors headers are held to what the safetensors library itself accepts (every defect below is also refused by
`safetensors.safe_open`, and every oddity it accepts is accepted too). Torch files holding code-executing pickles are
written with a class whose `__reduce__` would create a marker file: the marker must never appear.
"""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, Qwen2Config

from hyimage.errors import CheckpointError, NonFiniteWeightError, UnsafeCheckpointError
from hyimage.loading.safetensors_header import checkpoint_format, read_tensor_infos
from hyimage.loading.safetensors_io import SafetensorsReader, load_safetensors_into
from hyimage.models import AutoencoderKLConv3D, HunyuanVAE2D, HYImageDiffusionTransformer
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.reprompt import Reprompter
from hyimage.text_encoders.glyph import CHECKPOINT_FILE, GlyphByT5Encoder
from hyimage.text_encoders.mllm import MLLMTextEncoder
from tests.fixtures.glyph_fixtures import write_glyph_assets, write_tiny_byt5
from tests.fixtures.vae_fixtures import tiny_refiner_vae_config, tiny_vae_2d_config

F32 = "F32"


def write_safetensors(path: Path, header: dict | None, data: bytes = b"", raw: bytes | None = None) -> Path:
    """A file with exactly the given header (or raw header bytes) and data: no library fixes anything up."""
    encoded = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def entry(shape: object, offsets: object, dtype: object = F32) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# name: (header, data bytes, raw header); each is refused by the safetensors library as well
DEFECTS = {
    "overlapping offsets": ({"a": entry([2], [0, 8]), "b": entry([1], [4, 8])}, 12, None),
    "gap between tensors": ({"a": entry([1], [0, 4]), "b": entry([1], [8, 12])}, 12, None),
    "first tensor not at 0": ({"a": entry([1], [4, 8])}, 8, None),
    "bytes after the last tensor": ({"a": entry([1], [0, 4])}, 8, None),
    "negative begin": ({"a": entry([1], [-4, 0])}, 4, None),
    "negative end": ({"a": entry([0], [0, -4])}, 4, None),
    "end before begin": ({"a": entry([0], [0, 0]), "b": entry([1], [4, 0])}, 4, None),
    "string offsets": ({"a": entry([1], ["0", "4"])}, 4, None),
    "float offsets": ({"a": entry([1], [0.0, 4])}, 4, None),
    "bool offsets": ({"a": entry([1], [False, 4])}, 4, None),
    "three offsets": ({"a": entry([1], [0, 4, 4])}, 4, None),
    "offsets not a list": ({"a": entry([1], 4)}, 4, None),
    "offset beyond 64 bits": ({"a": entry([1], [2**64, 2**64 + 4])}, 4, None),
    "negative shape": ({"a": entry([-1], [0, 4])}, 4, None),
    "float shape": ({"a": entry([1.0], [0, 4])}, 4, None),
    "string shape": ({"a": entry(["1"], [0, 4])}, 4, None),
    "null shape": ({"a": entry(None, [0, 4])}, 4, None),
    "shape larger than its bytes": ({"a": entry([2], [0, 4])}, 4, None),
    "shape overflowing 64 bits": ({"a": entry([2**40, 2**40], [0, 4])}, 4, None),
    "unknown dtype": ({"a": entry([1], [0, 4], "F33")}, 4, None),
    "lower-case dtype": ({"a": entry([1], [0, 4], "f32")}, 4, None),
    "dtype not a string": ({"a": entry([1], [0, 4], 4)}, 4, None),
    "entry not an object": ({"a": [1]}, 0, None),
    "entry without data_offsets": ({"a": {"dtype": F32, "shape": [1]}}, 4, None),
    "metadata value not a string": ({"__metadata__": {"format": 1}, "a": entry([1], [0, 4])}, 4, None),
    "metadata not an object": ({"__metadata__": [1], "a": entry([1], [0, 4])}, 4, None),
    "header not an object": (None, 0, b"[1, 2]"),
    "header not JSON": (None, 4, b'{"a": {"dtype": "F32",'),
    "header not UTF-8": (None, 4, b'{"\xff\xfe": 1}'),
    "duplicate key": (None, 8, b'{"a":' + json.dumps(entry([1], [0, 4])).encode() + b',"a":'
                      + json.dumps(entry([1], [4, 8])).encode() + b"}"),
    "data shorter than the header says": ({"a": entry([4], [0, 16])}, 8, None),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_safetensors_header_defects_are_refused_naming_the_file(tmp_path, name):
    header, size, raw = DEFECTS[name]
    path = write_safetensors(tmp_path / "hostile.safetensors", header, bytes(size), raw)
    with pytest.raises(Exception):  # the safetensors library refuses it too
        with safe_open(str(path), "pt") as file:
            [file.get_tensor(key) for key in file.keys()]
    with pytest.raises(CheckpointError) as error:
        read_tensor_infos(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "name, header, raw, problem",
    [
        ("empty file", None, b"", "shorter than a safetensors header"),
        ("shorter than the length prefix", None, b"\x10\x00", "shorter than a safetensors header"),
        ("header longer than the file", None, struct.pack("<Q", 1000) + b"{}", "the header claims 1000 bytes"),
        ("header over 100 MB", None, struct.pack("<Q", 100_000_001) + b"{}", "more than the 100000000 allowed"),
    ],
)
def test_short_and_oversized_headers(tmp_path, name, header, raw, problem):
    path = tmp_path / "short.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=problem) as error:
        read_tensor_infos(path)
    assert str(path) in str(error.value)


def test_known_but_unread_dtype_is_named(tmp_path):
    path = write_safetensors(tmp_path / "complex.safetensors", {"a": entry([1], [0, 8], "C64")}, bytes(8))
    with pytest.raises(CheckpointError, match=r"complex.safetensors: tensor 'a' has dtype C64, which hyimage does not"):
        read_tensor_infos(path)


def test_what_the_library_accepts_is_accepted(tmp_path):
    """Unsorted entries, zero-size tensors, a 0-d tensor, padding spaces and an empty file all load as stored."""
    header = {
        "b": entry([1], [4, 8]),
        "empty": entry([0, 3], [8, 8]),
        "scalar": entry([], [8, 12]),
        "a": entry([1], [0, 4]),
        "__metadata__": {"format": "pt"},
    }
    data = struct.pack("<3f", 1.0, 2.0, 3.0)
    path = write_safetensors(tmp_path / "odd.safetensors", None, data, raw=json.dumps(header).encode() + b"   ")
    with safe_open(str(path), "pt") as file:
        expected = {key: file.get_tensor(key) for key in file.keys()}
    with SafetensorsReader(path) as reader:
        ours = {key: reader.get(key) for key in reader.keys()}
    assert ours.keys() == expected.keys()
    for key in ours:
        assert torch.equal(ours[key], expected[key]) and ours[key].shape == expected[key].shape
    empty = write_safetensors(tmp_path / "none.safetensors", {})
    assert read_tensor_infos(empty) == {}


def test_special_files_and_links(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "dangling.safetensors")
    os.symlink(tmp_path / "loop_b.safetensors", tmp_path / "loop_a.safetensors")
    os.symlink(tmp_path / "loop_a.safetensors", tmp_path / "loop_b.safetensors")
    cases = {
        "fifo.safetensors": (CheckpointError, "not a regular file"),
        "folder.safetensors": (CheckpointError, "is a folder, not a file"),
        "dangling.safetensors": (FileNotFoundError, "symbolic link to .*gone.safetensors, which does not exist"),
        "loop_a.safetensors": (CheckpointError, "cannot be opened"),
        "absent.safetensors": (FileNotFoundError, "does not exist"),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind, match=message) as error:
            read_tensor_infos(tmp_path / name)  # a FIFO is never opened: this would block
        assert name in str(error.value)
    real = write_safetensors(tmp_path / "real.safetensors", {"a": entry([1], [0, 4])}, bytes(4))
    os.symlink(real, tmp_path / "link.safetensors")  # a link to a good file is fine (the Hugging Face cache)
    assert read_tensor_infos(tmp_path / "link.safetensors")["a"].shape == (1,)


TINY_DIT = dict(
    patch_size=[1, 1], in_channels=4, out_channels=4, hidden_size=32, heads_num=2, mlp_width_ratio=2,
    mm_double_blocks_depth=1, mm_single_blocks_depth=1, rope_dim_list=[8, 8], text_states_dim=24,
)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = HYImageDiffusionTransformer(**TINY_DIT)
    path = tmp_path_factory.mktemp("dit") / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def test_other_formats_given_as_a_dit_say_what_the_file_is(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    torch_zip = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, torch_zip)
    legacy = tmp_path / "legacy.pt"
    torch.save({"weight": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert [checkpoint_format(p) for p in (gguf, torch_zip, legacy)] == ["gguf", "torch-zip", "pickle"]
    with pytest.raises(CheckpointError, match="is a GGUF file.*only the DiT is read from GGUF") as error:
        read_tensor_infos(gguf)  # e.g. given as a text-encoder shard
    assert str(gguf) in str(error.value)
    for path in (torch_zip, legacy):
        with pytest.raises(CheckpointError, match="PyTorch pickle checkpoint") as error:
            HYImageDiffusionTransformer.from_single_file(path, TINY_DIT)
        message = str(error.value)
        assert str(path) in message and "interrupted" not in message and "weights_only=False" not in message


def test_non_finite_weight_is_named_with_verify(tmp_path, dit_file):
    state = _read_all(dit_file)
    key = "double_blocks.0.img_attn_proj.weight"
    state[key][0, 3] = float("nan")
    state[key][1, 1] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    HYImageDiffusionTransformer.from_single_file(path, TINY_DIT, progress_bar=False)  # loads: nothing checks
    with pytest.raises(NonFiniteWeightError, match=rf"nan.safetensors: tensor '{key}' holds 1 NaN and 1 infinite"):
        HYImageDiffusionTransformer.from_single_file(path, TINY_DIT, verify=True)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {key: reader.get(key) for key in reader.keys()}


class _Terminal:
    """A stand-in for a terminal's stderr (tqdm shows bars only on a terminal when disable=None)."""

    def __init__(self, tty: bool) -> None:
        self.text, self.tty = "", tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, progress_bar, shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_reading_progress_bar_in_bytes(monkeypatch, dit_file, tty, progress_bar, shown):
    stderr = _Terminal(tty)
    monkeypatch.setattr("sys.stderr", stderr)
    HYImageDiffusionTransformer.from_single_file(dit_file, TINY_DIT, progress_bar=progress_bar)
    total = sum(t.nbytes for t in _read_all(dit_file).values())
    assert ("reading tiny.safetensors" in stderr.text) == shown
    if shown:
        kib = f"{total / 1024:.0f}k"  # unit_scale with unit_divisor=1024: KiB of the tensors read
        assert f"100%|##########| {kib}/{kib}" in stderr.text and "B/s" in stderr.text


def test_dit_configs_are_checked_before_anything_is_built(tmp_path, dit_file):
    for key, value in (("mm_double_blocks_depth", 10**9), ("hidden_size", 32.0), ("heads_num", "2"), ("qkv_bias", 1)):
        with pytest.raises(ValueError, match=f"{key} must be") as error:
            HYImageDiffusionTransformer.from_single_file(dit_file, dict(TINY_DIT, **{key: value}))
        assert repr(value) in str(error.value)
    root = tmp_path / "ckpts"
    (root / "dit").mkdir(parents=True)
    config_file = root / "dit" / "hunyuanimage2.1.json"
    config_file.write_text(json.dumps(dict(TINY_DIT, mm_single_blocks_depth=10**9)))
    from hyimage import HunyuanImagePipeline

    with pytest.raises(ValueError, match="mm_single_blocks_depth must be an integer") as error:
        HunyuanImagePipeline.from_pretrained("hunyuanimage-v2.1", model_root=root)
    assert str(config_file) in str(error.value)
    with pytest.raises(ValueError, match="x.json: unknown DiT config keys"):
        resolve_dit_config({"depth": 3}, source="x.json")


@pytest.mark.parametrize(
    "key, value",
    [("scaling_factor", "0.75"), ("layers_per_block", 10**9), ("latent_channels", 64.0), ("block_out_channels", "64")],
)
def test_vae_config_values_are_checked_naming_file_and_key(tmp_path, key, value):
    folder = tmp_path / "vae_2_1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(tiny_vae_2d_config(), **{key: value})))
    torch.save({}, folder / "pytorch_model.ckpt")
    with pytest.raises(CheckpointError, match=f"{key} must be") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(folder / "config.json") in str(error.value)


class _RunsCode:
    """Unpickling this calls os.system: a loader that unpickles it has run foreign code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_state(marker: Path) -> dict:
    return {"vae.weight": torch.zeros(2), "payload": _RunsCode(marker)}


def _assert_refused_unsafe(load, path: Path, marker: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as error:
        load()
    message = str(error.value)
    assert str(path) in message and "posix.system" in message and "weights_only=False" not in message
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("model_cls", [HunyuanVAE2D, AutoencoderKLConv3D])
def test_code_executing_pickle_in_a_vae_checkpoint(tmp_path, model_cls, legacy):
    folder = tmp_path / "vae"
    folder.mkdir()
    config = tiny_vae_2d_config() if model_cls is HunyuanVAE2D else tiny_refiner_vae_config()
    (folder / "config.json").write_text(json.dumps(config))
    path = folder / ("pytorch_model.ckpt" if model_cls is HunyuanVAE2D else "pytorch_model.pt")
    marker = tmp_path / "pwned"
    torch.save(_evil_state(marker), path, _use_new_zipfile_serialization=not legacy)
    _assert_refused_unsafe(lambda: model_cls.from_pretrained(folder), path, marker)


@pytest.fixture(scope="module")
def byt5_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byt5")
    write_tiny_byt5(path, d_model=32)
    return path


def _glyph_dir(tmp_path: Path) -> Path:
    glyph = tmp_path / "Glyph-SDXL-v2"
    write_glyph_assets(glyph)
    (glyph / CHECKPOINT_FILE).parent.mkdir(parents=True)
    return glyph


def test_code_executing_pickle_in_the_glyph_checkpoint(tmp_path, byt5_dir):
    glyph = _glyph_dir(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"module.text_tower.encoder.x": _RunsCode(marker)}}, glyph / CHECKPOINT_FILE)
    _assert_refused_unsafe(lambda: GlyphByT5Encoder.from_pretrained(byt5_dir, glyph), glyph / CHECKPOINT_FILE, marker)


def test_code_executing_pickle_in_a_reprompt_bin(tmp_path):
    folder = tmp_path / "reprompt"
    config = Qwen2Config(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError) as error:
        Reprompter.from_pretrained(folder, "7b", dtype=torch.float32, device="cpu")
    message = str(error.value)
    assert str(folder) in message and "pytorch_model.bin" in message and "weights_only=False" not in message
    assert not marker.exists()


def test_damaged_torch_files_name_the_file(tmp_path, byt5_dir):
    folder = tmp_path / "vae_2_1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_vae_2d_config()))
    path = folder / "pytorch_model.ckpt"
    torch.save({"state_dict": {"vae.a": torch.zeros(64), "vae.note": "hello"}}, path)
    with pytest.raises(CheckpointError, match=r"entry 'vae.note' of its state dict is a str, not a tensor") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(path) in str(error.value)
    torch.save({"state_dict": {"vae.a": torch.zeros(4096)}}, path)
    path.write_bytes(path.read_bytes()[:-300])  # truncated zip: no central directory
    with pytest.raises(CheckpointError, match="truncated or damaged") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(path) in str(error.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(path) in str(error.value)
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a file") as error:
        HunyuanVAE2D.from_pretrained(folder)
    assert str(path) in str(error.value)
    glyph = _glyph_dir(tmp_path)
    os.mkfifo(glyph / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a regular file") as error:
        GlyphByT5Encoder.from_pretrained(byt5_dir, glyph)
    assert str(glyph / CHECKPOINT_FILE) in str(error.value)


def test_folders_read_through_transformers_name_the_folder(tmp_path, byt5_dir):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="Qwen2.5-VL configuration in .*llm could not be read"):
        MLLMTextEncoder.from_pretrained(llm)
    broken_byt5 = tmp_path / "byt5-small"
    broken_byt5.mkdir()
    (broken_byt5 / "config.json").write_text('{"d_model": "wide"')
    glyph = _glyph_dir(tmp_path)
    torch.save({"state_dict": {}}, glyph / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="ByT5 .* in .*byt5-small could not be read"):
        GlyphByT5Encoder.from_pretrained(broken_byt5, glyph)


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"metadata": {}}), "has no 'weight_map' object"),
        (json.dumps({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}), "not a file name"),
    ],
)
def test_checkpoint_index_defects_name_the_index(tmp_path, index, message):
    from hyimage.text_encoders.mllm import text_model_sources

    path = tmp_path / "model.safetensors.index.json"
    path.write_text(index)
    with pytest.raises(CheckpointError, match=message) as error:
        text_model_sources(tmp_path, ["embed_tokens.weight"])
    assert str(path) in str(error.value)


def test_load_into_a_model_verifies_each_tensor_as_read(tmp_path):
    state = {"weight": torch.ones(2, 3), "bias": torch.tensor([1.0, float("-inf")])}
    path = tmp_path / "linear.safetensors"
    save_file(state, str(path))
    with torch.device("meta"):
        target = torch.nn.Linear(3, 2)
    with pytest.raises(NonFiniteWeightError, match=r"linear.safetensors: tensor 'bias' holds 0 NaN and 1 infinite"):
        load_safetensors_into(target, [path], verify=True)


def test_vae_verify_names_the_tensor(tmp_path):
    from tests.fixtures.vae_fixtures import random_vae_state_dict, write_vae_2d_dir

    state = random_vae_state_dict(HunyuanVAE2D, tiny_vae_2d_config())
    state["decoder.conv_out.bias"][1] = float("nan")
    folder = write_vae_2d_dir(tmp_path / "vae_2_1", state_dict=state)
    HunyuanVAE2D.from_pretrained(folder)  # loads: nothing checks
    with pytest.raises(NonFiniteWeightError, match=r"pytorch_model.ckpt: tensor 'decoder.conv_out.bias' holds 1 NaN"):
        HunyuanVAE2D.from_pretrained(folder, verify=True)


def test_a_folder_where_the_text_encoder_weights_belong_is_named(tmp_path):
    from hyimage.text_encoders.mllm import text_model_sources

    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is a folder, not a file"):
        text_model_sources(tmp_path, ["embed_tokens.weight"])


@pytest.mark.parametrize("layers", [10**9, "28", 2])
def test_text_encoder_depth_is_checked_before_building(tmp_path, layers):
    from tests.fixtures.tiny_qwen import tiny_config

    (tmp_path / "config.json").write_text(json.dumps(dict(tiny_config(), num_hidden_layers=layers)))
    with pytest.raises(CheckpointError, match="config.json: num_hidden_layers must be an integer"):
        MLLMTextEncoder.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [("hidden_size", "32"), ("rms_norm_eps", "small")])
def test_text_encoder_config_with_a_wrong_type_names_the_file(tmp_path, field, value):
    from tests.fixtures.tiny_qwen import tiny_config

    llm = tmp_path / "text_encoder" / "llm"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text(json.dumps(dict(tiny_config(), **{field: value})))
    with pytest.raises(CheckpointError, match=rf"text_encoder/llm/config.json: .*{field}"):
        MLLMTextEncoder.from_pretrained(llm)
