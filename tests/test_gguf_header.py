"""GGUF headers read within the file's bounds: parity with the `gguf` package's reader on files its writer made,
and every truncated, damaged or hostile header refused with a CheckpointError naming the file (never a hang,
an unbounded allocation or a raw IndexError)."""

import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from hyimage.errors import CheckpointError
from hyimage.loading.gguf_header import GGUFArray, original_shape, read_gguf_header
from hyimage.loading.gguf_loader import read_gguf_tensors


def write_sample(path: Path) -> None:
    """A small GGUF file with a key of each value type (nested arrays too) and tensors of several ggml types."""
    writer = gguf.GGUFWriter(str(path), "hyvid")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 700)
    writer.add_int16("t.i16", -700)
    writer.add_uint32("t.u32", 70000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.strings", ["a", "bc", ""])
    writer.add_array("t.ints", [3, 1, 4])
    writer.add_array("t.long", list(range(1000)))
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("comfy.gguf.orig_shape.conv", [2, 3, 4, 4])
    rng = np.random.default_rng(0)
    writer.add_tensor("conv", rng.standard_normal((6, 16)).astype(np.float32))
    writer.add_tensor("half", rng.standard_normal((3, 32)).astype(np.float16))
    q8 = quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "sample.gguf"
    write_sample(path)
    return path


def test_header_matches_the_gguf_packages_reader(sample: Path) -> None:
    reader = gguf.GGUFReader(str(sample))
    header = read_gguf_header(sample)
    assert header.data_offset == reader.data_offset
    theirs = [(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
              for t in reader.tensors]
    ours = [(t.name, t.dims, t.type_id, t.offset, t.nbytes) for t in header.tensors]
    assert ours == theirs
    for key in ("t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.u64", "t.i64", "t.bool"):
        assert header.fields[key] == reader.get_field(key).contents(), key
    for key in ("t.f32", "t.f64"):
        assert header.fields[key] == pytest.approx(reader.get_field(key).contents()), key
    assert header.fields["t.str"] == reader.get_field("t.str").contents() == "héllo"
    assert header.fields["t.ints"] == tuple(reader.get_field("t.ints").contents()) == (3, 1, 4)
    assert isinstance(header.fields["t.long"], GGUFArray) and header.fields["t.long"].count == 1000
    assert isinstance(header.fields["t.strings"], GGUFArray) and header.fields["t.strings"].count == 3
    assert header.fields["t.nested"].count == 2
    conv = header.tensors[0]
    assert original_shape(sample, header, conv) == (2, 3, 4, 4)
    assert [t.shape for t in read_gguf_tensors(sample)] == [(2, 3, 4, 4), (3, 32), (4, 64)]


def refused(path: Path, match: str | None = None) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        read_gguf_header(path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_every_truncation_is_refused_naming_the_file(sample: Path, tmp_path: Path) -> None:
    data = sample.read_bytes()
    header = read_gguf_header(sample)
    cut = tmp_path / "cut.gguf"
    data_end = max(t.offset + t.nbytes for t in header.tensors)
    for length in [*range(0, header.data_offset + 1), data_end - 1]:
        cut.write_bytes(data[:length])
        refused(cut)


def test_damaged_bytes_end_in_checkpoint_error_only(sample: Path, tmp_path: Path) -> None:
    """Random bytes of the header overwritten (1-4 at a time, 400 seeded tries): the file reads, or is refused
    with a CheckpointError naming it; never another exception."""
    data = sample.read_bytes()
    end = read_gguf_header(sample).data_offset
    rng = random.Random(0)
    damaged = tmp_path / "damaged.gguf"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(400):
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(4, end)] = rng.choice([0, 0xFF, 0x7F, rng.randrange(256)])
        damaged.write_bytes(bytes(raw))
        try:
            read_gguf_header(damaged)
            outcomes["read"] += 1
        except CheckpointError as error:
            assert str(damaged) in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["read"] > 50  # both kinds of damage were tried


def gguf_bytes(*kvs: bytes, tensor_count: int = 0, kv_count: int | None = None, tail: bytes = b"") -> bytes:
    count = len(kvs) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, count) + b"".join(kvs) + tail


def key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


HOSTILE = {
    # the 73-byte file of the report: an array of 2**40 uint8 (the gguf package's reader loops without end)
    "huge_array": (gguf_bytes(key("a") + struct.pack("<IIQ", 9, 0, 2**40)).ljust(73, b"\0"), "array 'a'"),
    "huge_string_array": (gguf_bytes(key("a") + struct.pack("<IIQ", 9, 8, 2**40)), "array 'a'"),
    "huge_nested_array": (gguf_bytes(key("a") + struct.pack("<IIQ", 9, 9, 2**40)), "array 'a'"),
    "huge_kv_count": (gguf_bytes(kv_count=2**63), "key/values"),
    "huge_tensor_count": (gguf_bytes(tensor_count=2**64 - 1), "tensor infos"),
    "huge_key_length": (gguf_bytes(struct.pack("<Q", 2**62) + b"abc" * 8, kv_count=1), "a key"),
    "huge_string_value": (gguf_bytes(key("s") + struct.pack("<IQ", 8, 2**50)), "string value of 's'"),
    "huge_dims": (gguf_bytes(tensor_count=1, tail=key("w") + struct.pack("<I", 2**31) + b"\0" * 32), "dimensions"),
    "deep_nesting": (gguf_bytes(key("a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 20), "nests"),
    "unknown_value_type": (gguf_bytes(key("a") + struct.pack("<I", 99) + b"\0" * 8), "value type 99"),
    "unknown_item_type": (gguf_bytes(key("a") + struct.pack("<IIQ", 9, 99, 1) + b"\0" * 8), "item type 99"),
    "duplicate_key": (gguf_bytes(*[key("a") + struct.pack("<IB", 0, 1)] * 2), "twice"),
    "bad_alignment": (gguf_bytes(key("general.alignment") + struct.pack("<II", 4, 3)), "power of two"),
    "not_utf8_key": (gguf_bytes(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1)), "UTF-8"),
    "version_1": (b"GGUF" + struct.pack("<III", 1, 0, 0), "version 1"),
    "tensor_past_end": (
        gguf_bytes(tensor_count=1, tail=key("w") + struct.pack("<IQQIQ", 2, 4096, 4096, 0, 0)),
        "past the end",
    ),
    "unknown_tensor_type": (
        gguf_bytes(tensor_count=1, tail=key("w") + struct.pack("<IQIQ", 1, 4, 99, 0)).ljust(128, b"\0"),
        "type 99",
    ),
    "short_magic": (b"GG", "not a GGUF file"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_refused_naming_the_file(name: str, tmp_path: Path) -> None:
    data, match = HOSTILE[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    refused(path, match)


def test_bad_orig_shape_is_refused(tmp_path: Path) -> None:
    for shape, match in (([5, 5], "stores 96"), (["x"], "non-negative integers")):
        path = tmp_path / "orig.gguf"
        writer = gguf.GGUFWriter(str(path), "hyvid")
        writer.add_array("comfy.gguf.orig_shape.w", shape)
        writer.add_tensor("w", np.zeros((6, 16), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(CheckpointError, match=match) as error:
            read_gguf_tensors(path)
        assert str(path) in str(error.value)


def test_from_single_file_and_plan_refuse_the_73_byte_file(tmp_path: Path, capsys) -> None:
    from hyimage.cli import main
    from hyimage.models import HYImageDiffusionTransformer

    path = tmp_path / "evil.gguf"
    path.write_bytes(HOSTILE["huge_array"][0])
    assert path.stat().st_size == 73
    with pytest.raises(CheckpointError, match="array 'a'") as error:
        HYImageDiffusionTransformer.from_single_file(path, config="hunyuanimage-v2.1-distilled")
    assert str(path) in str(error.value)
    assert main(["plan", "--gpu-gb", "24", "--dit-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_verify_refuses_nan_in_a_gguf_dit(tmp_path: Path) -> None:
    """`verify=True` on a GGUF DiT: a NaN in a quantised block (a Q8_0 scale) names the tensor and the file."""
    from hyimage.loading.verify import NonFiniteWeightError
    from hyimage.models import HYImageDiffusionTransformer
    from tests.fixtures.dit_layouts import fused_layout
    from tests.fixtures.tiny_tree import TINY_DISTILLED, random_dit

    path = tmp_path / "dit.gguf"
    writer = gguf.GGUFWriter(str(path), "hyvid")
    for key, tensor in fused_layout(random_dit(TINY_DISTILLED, seed=0).state_dict()).items():
        data = tensor.float().numpy()
        if key == "double_blocks.0.img_mlp.fc1.weight":
            writer.add_tensor(key, quants.quantize(data, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert HYImageDiffusionTransformer.from_single_file(path, TINY_DISTILLED, verify=True) is not None
    quantised = next(t for t in read_gguf_header(path).tensors if t.type_id == int(T.Q8_0))
    data = bytearray(path.read_bytes())
    data[quantised.offset : quantised.offset + 2] = np.float16(np.nan).tobytes()  # the first block's scale
    path.write_bytes(bytes(data))
    HYImageDiffusionTransformer.from_single_file(path, TINY_DISTILLED)  # not scanned without verify
    with pytest.raises(NonFiniteWeightError, match=quantised.name) as error:
        HYImageDiffusionTransformer.from_single_file(path, TINY_DISTILLED, verify=True)
    assert str(path) in str(error.value)
