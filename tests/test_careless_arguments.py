"""Careless arguments, through the API and the CLI: each is refused before any model part is built, with an
error of the documented type whose message names the argument; NaN/Inf weights end in a clear error.

The pipeline parts are factories that record being called, so "nothing was loaded" is asserted, not assumed.
"""

import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyimage.cli import main
from hyimage.cli.output import save_png
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImageOutput, HunyuanImagePipeline
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.errors import NonFiniteError, RequestError, RequestTypeError
from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
from tests.fixtures.tiny_pipeline import FakeGlyphEncoder, FakeTextEncoder, tiny_vae

PART_NAMES = ("dit", "vae", "text_encoder", "glyph_encoder", "reprompt_model", "refiner_pipeline")
NO_CUDA = not torch.cuda.is_available()


class Built(list):
    """Names of the parts whose factory ran."""

    def factory(self, name: str):
        def build():
            self.append(name)
            raise AssertionError(f"the {name} was built for a request that should have been refused")

        return build


@pytest.fixture
def built() -> Built:
    return Built()


def recording_pipe(built: Built, **without: None) -> HunyuanImagePipeline:
    parts = {name: built.factory(name) for name in PART_NAMES if name not in without}
    return HunyuanImagePipeline(**parts, progress_bar=False)


NAN = float("nan")
API_CASES = [
    # sizes
    (dict(width=48), RequestError, "width"),
    (dict(width=8192, height=64), RequestError, "width"),
    (dict(height=0), RequestError, "height"),
    (dict(width="64"), RequestTypeError, "width"),
    (dict(width=64.0), RequestTypeError, "width"),
    (dict(aspect_ratio="5:4", width=None, height=None), RequestError, "aspect_ratio"),
    (dict(aspect_ratio="1:1"), RequestError, "aspect_ratio"),
    # sampling
    (dict(num_inference_steps=0), RequestError, "num_inference_steps"),
    (dict(num_inference_steps=10**9), RequestError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), RequestTypeError, "num_inference_steps"),
    (dict(num_inference_steps="8"), RequestTypeError, "num_inference_steps"),
    (dict(guidance_scale=NAN), RequestError, "guidance_scale"),
    (dict(guidance_scale=math.inf), RequestError, "guidance_scale"),
    (dict(guidance_scale="3.5"), RequestTypeError, "guidance_scale"),
    (dict(shift=NAN), RequestError, "shift"),
    (dict(shift=0), RequestError, "shift"),
    (dict(shift=-2.0), RequestError, "shift"),
    # seeds and generators
    (dict(seed="42"), RequestTypeError, "seed"),
    (dict(seed=-1), RequestError, "seed"),
    (dict(seed=2**64), RequestError, "seed"),
    (dict(seed=2**64 - 1, num_images_per_prompt=2), RequestError, "seed"),
    (dict(seed=[1, "2"], num_images_per_prompt=2), RequestTypeError, "seed"),
    (dict(seed=[1, 2]), RequestError, "seed"),
    (dict(seed=1.5), RequestTypeError, "seed"),
    (dict(generator="cpu"), RequestTypeError, "generator"),
    (dict(seed=1, generator=torch.Generator()), RequestError, "seed"),
    # images per call
    (dict(num_images_per_prompt=0), RequestError, "num_images_per_prompt"),
    (dict(num_images_per_prompt=10**6), RequestError, "num_images_per_prompt"),
    (dict(num_images_per_prompt=True), RequestTypeError, "num_images_per_prompt"),
    (dict(prompt=["a fox"] * 65), RequestError, "prompt"),
    (dict(prompt=["a", "b"], num_images_per_prompt=40), RequestError, "num_images_per_prompt"),
    # prompts and embeddings
    (dict(prompt=123), RequestTypeError, "prompt"),
    (dict(prompt=[]), RequestError, "prompt"),
    (dict(prompt=["a", 3]), RequestTypeError, "prompt"),
    (dict(prompt=None), RequestError, "prompt"),
    (dict(negative_prompt=["x", "y"]), RequestError, "negative_prompt"),
    (dict(negative_prompt=5), RequestTypeError, "negative_prompt"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 8)), RequestError, "prompt_embeds_mask"),
    (dict(prompt=None, prompt_embeds=np.zeros((1, 4, 8))), RequestTypeError, "prompt_embeds"),
    (dict(latents=torch.zeros(2, 64, 2, 2)), RequestError, "latents"),
    # outputs, callbacks, switches
    (dict(output_type="jpeg"), RequestError, "output_type"),
    (dict(return_dict="yes"), RequestTypeError, "return_dict"),
    (dict(callback_on_step_end=5), RequestTypeError, "callback_on_step_end"),
    (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), RequestError, "callback_on_step_end_tensor_inputs"),
    (dict(use_refiner="yes"), RequestTypeError, "use_refiner"),
    (dict(refiner_handoff="png"), RequestError, "refiner_handoff"),
    (dict(num_inference_step=8), RequestTypeError, "num_inference_steps"),  # unknown keyword: the closest is named
]


@pytest.mark.parametrize("kwargs, error, argument", API_CASES, ids=[f"{i}-{c[2]}" for i, c in enumerate(API_CASES)])
def test_api_refuses_before_loading(built: Built, kwargs: dict, error: type, argument: str) -> None:
    call = {"prompt": "a fox", "width": 64, "height": 64, **kwargs}
    with pytest.raises(error) as raised:
        recording_pipe(built)(**call)
    assert argument in str(raised.value)
    assert built == []


@pytest.mark.parametrize(
    "without, kwargs, argument",
    [
        ("refiner_pipeline", dict(use_refiner=True), "refiner_pipeline"),
        ("reprompt_model", dict(use_reprompt=True), "reprompt_model"),
        ("text_encoder", dict(), "text_encoder"),
    ],
)
def test_missing_parts_are_named_before_loading(built: Built, without: str, kwargs: dict, argument: str) -> None:
    with pytest.raises(RequestError, match=argument):
        recording_pipe(built, **{without: None})("a fox", width=64, height=64, **kwargs)
    assert built == []


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        (dict(image="photo.png"), RequestTypeError, "image"),
        (dict(width=40), RequestError, "width"),
        (dict(width=4112), RequestError, "width"),
        (dict(num_inference_steps=0), RequestError, "num_inference_steps"),
        (dict(seed="7"), RequestTypeError, "seed"),
        (dict(prompt=["a", "b", "c"]), RequestError, "prompt"),
        (dict(image=torch.full((3, 32, 32), NAN)), RequestError, "image"),
        (dict(shift=NAN), RequestError, "shift"),
        (dict(guidance_scale=NAN), RequestError, "guidance_scale"),
        (dict(output_tpye="pt"), RequestTypeError, "output_type"),
    ],
)
def test_refiner_refuses_before_loading(built: Built, kwargs: dict, error: type, argument: str) -> None:
    refiner = HunyuanImageRefinerPipeline(
        dit=built.factory("dit"), vae=built.factory("vae"), text_encoder=built.factory("text_encoder")
    )
    call = {"image": Image.new("RGB", (32, 32)), "prompt": "a fox", **kwargs}
    with pytest.raises(error) as raised:
        refiner(**call)
    assert argument in str(raised.value)
    assert built == []


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "banana", 5])
def test_to_checks_the_device_at_once(built: Built, device) -> None:
    with pytest.raises(RequestError) as raised:
        recording_pipe(built).to(device)
    assert "device" in str(raised.value) or "cuda" in str(raised.value)
    with pytest.raises(RequestError):
        HunyuanImagePipeline.from_pretrained("hunyuanimage-v2.1", device=device)
    assert built == []


def test_to_refuses_a_dtype_it_cannot_compute_in(built: Built) -> None:
    with pytest.raises(RequestError, match="dtype"):
        recording_pipe(built).to(torch.int8)


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        (dict(torch_dtyp=torch.bfloat16), RequestTypeError, "torch_dtype"),
        (dict(enable_full_dit_offload=False), RequestTypeError, "enable_full_dit_offloading"),
        (dict(memory_mode="none", enable_full_dit_offloading=True), RequestError, "memory_mode"),
        (dict(enable_stage1_offloading="no"), RequestError, "enable_stage1_offloading"),
        (dict(torch_dtype=torch.float16, dtype=torch.float32), RequestError, "torch_dtype"),
        (dict(torch_dtype="int4"), RequestError, "torch_dtype"),
    ],
)
def test_from_pretrained_keywords_are_checked_first(tmp_path: Path, kwargs: dict, error: type, named: str) -> None:
    """The folder does not exist: reaching the loader would fail with MissingCheckpointError instead."""
    with pytest.raises(error) as raised:
        HunyuanImagePipeline.from_pretrained("hunyuanimage-v2.1", model_root=tmp_path / "none", **kwargs)
    assert named in str(raised.value)
    assert "HunyuanImagePipeline.from_pretrained" in str(raised.value) or error is RequestError


def test_from_pretrained_names_an_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="neither a variant"):
        HunyuanImagePipeline.from_pretrained("hunyuanimage-v3")
    with pytest.raises(RequestTypeError, match="HunyuanImageRefinerPipeline.from_pretrained.*'use_fp8'"):
        HunyuanImageRefinerPipeline.from_pretrained(use_fp9=True)


# The CLI: user mistakes end in one line on stderr and exit code 1 (argparse's own: 2), before any loading.


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("from_pretrained reached for a request that should have been refused")

    monkeypatch.setattr(HunyuanImagePipeline, "from_pretrained", refuse)
    monkeypatch.setattr(HunyuanImageRefinerPipeline, "from_pretrained", refuse)
    return calls


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


CLI_CASES = [
    (["--width", "48"], "--width"),
    (["--width", "100000", "--height", "64"], "--width"),
    (["--steps", "0"], "--steps"),
    (["--steps", "5000"], "--steps"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--shift", "nan"], "--shift"),
    (["--shift", "inf"], "--shift"),
    (["--num-images", "0"], "--num-images"),
    (["--num-images", "1000"], "--num-images"),
    (["--aspect-ratio", "5:4"], "--aspect-ratio"),
    (["--aspect-ratio", "1:1", "--width", "64"], "--aspect-ratio"),
    (["--memory-mode", "none", "--gpu-budget-gb", "8"], "--gpu-budget-gb"),
    (["--gpu-budget-gb", "-1"], "--gpu-budget-gb"),
    (["--device", "banana"], "--device"),
    (["-o", "picture.jpg"], "--output"),
]


@pytest.mark.parametrize("extra, flag", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_refuses_before_loading(extra, flag, no_loading, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    size = [] if "--width" in extra or "--aspect-ratio" in extra else ["--width", "64", "--height", "64"]
    line = cli_error(["generate", "a fox", *size, *extra], capsys)
    assert flag in line
    assert no_loading == [] and not list(tmp_path.glob("*.png"))


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_fails_at_once(no_loading, tmp_path, capsys) -> None:
    line = cli_error(["generate", "a fox", "--device", "cuda", "-o", str(tmp_path / "a.png")], capsys)
    assert "--device" in line and "CUDA is not available" in line
    assert no_loading == []


def test_cli_output_paths_are_checked_first(no_loading, tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file, not a folder" in cli_error(["generate", "a fox", "-o", str(a_file / "x.png")], capsys)
    (tmp_path / "folder.png").mkdir()
    assert "is a folder" in cli_error(["generate", "a fox", "-o", str(tmp_path / "folder.png")], capsys)
    assert no_loading == []


def test_cli_refine_input_is_checked_first(no_loading, tmp_path, capsys) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "is not an image" in cli_error(["refine", str(text), "--prompt", "x"], capsys)
    assert "not found" in cli_error(["refine", str(tmp_path / "missing.png"), "--prompt", "x"], capsys)
    Image.new("RGB", (40, 48)).save(tmp_path / "odd.png")
    assert "--width" in cli_error(["refine", str(tmp_path / "odd.png"), "--prompt", "x"], capsys)
    assert "--steps" in cli_error(
        ["refine", str(tmp_path / "odd.png"), "--prompt", "x", "--width", "32", "--steps", "0"], capsys
    )
    assert no_loading == []


def test_cli_download_conflicts(no_loading, tmp_path, capsys) -> None:
    line = cli_error(["download", "--refiner-only", "--no-refiner", "--model-root", str(tmp_path)], capsys)
    assert "--refiner-only" in line and "--no-refiner" in line
    assert not any(tmp_path.iterdir())


def test_cli_bad_seed_is_an_argparse_error(no_loading, capsys) -> None:
    for seed in ("abc", str(2**64), "-2"):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "a fox", "--seed", seed])
        assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err


def test_cli_verbose_anywhere_adds_the_traceback(no_loading, capsys) -> None:
    for argv in (
        ["-v", "generate", "a fox", "--steps", "0"],
        ["generate", "a fox", "--steps", "0", "-v"],
        ["generate", "--debug", "a fox", "--steps", "0"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --steps")


def test_disk_full_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from hyimage.cli.console import describe

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    target = tmp_path / "out.png"
    with pytest.raises(OSError) as raised:
        save_png(torch.rand(3, 32, 32), target, {"prompt": "a fox", "seed": 1})
    assert list(tmp_path.iterdir()) == []
    message = describe(raised.value)
    assert "no space left" in message and str(target) in message


# NaN weights and NaN arguments: a clear error naming the stage, and nothing returned or saved.


def test_nan_weight_in_the_dit_is_reported_not_returned() -> None:
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    with torch.no_grad():
        next(p for n, p in dit.named_parameters() if "final_layer" in n).view(-1)[0] = NAN
    pipe = HunyuanImagePipeline(
        dit=dit, vae=tiny_vae(), text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    for output_type in ("pil", "latent"):
        with pytest.raises(NonFiniteError, match="denoising.*DiT checkpoint") as raised:
            pipe("a fox", width=64, height=32, num_inference_steps=1, seed=0, output_type=output_type)
        assert raised.value.stage == "denoising"


def test_nan_in_the_vae_or_the_text_embeddings_is_named() -> None:
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.weight.view(-1)[0] = NAN
    pipe = HunyuanImagePipeline(
        dit=dit, vae=vae, text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    with pytest.raises(NonFiniteError, match="VAE decoding"):
        pipe("a fox", width=64, height=32, num_inference_steps=1, seed=0)
    embeds = torch.full((1, 4, TINY_CONFIGS["hunyuanimage-v2.1-distilled"].text_states_dim), NAN)
    with pytest.raises(NonFiniteError, match="prompt_embeds"):
        pipe(prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 4), width=64, height=32, num_inference_steps=1)


ABSURD = textwrap.dedent("""
    import resource, sys
    import torch
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
    from hyimage.errors import RequestError
    from tests.fixtures.tiny_dit import TINY_CONFIGS, tiny_model
    from tests.fixtures.tiny_pipeline import FakeGlyphEncoder, FakeTextEncoder, tiny_vae

    pipe = HunyuanImagePipeline(dit=tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"]), vae=tiny_vae(),
                                text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False)
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) for line in status if line.startswith("VmSize")) * 1024
    limit = used + 768 * 2**20  # 768 MiB above what is mapped now: an absurd allocation fails fast
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for kwargs in (dict(width=100000, height=100000), dict(num_inference_steps=10**9),
                   dict(num_images_per_prompt=10**6), dict(width=4096, height=4096, num_images_per_prompt=10**4)):
        try:
            pipe("a fox", output_type="latent", **dict(dict(width=64, height=64), **kwargs))
        except RequestError as error:
            print("refused:", error.argument)
        else:
            sys.exit("accepted " + repr(kwargs))
    """)


def test_absurd_requests_are_refused_before_allocating() -> None:
    """In a subprocess under RLIMIT_AS: a regression dies of MemoryError fast instead of hurting the machine."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", ABSURD],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == [
        "refused: width",
        "refused: num_inference_steps",
        "refused: num_images_per_prompt",
        "refused: num_images_per_prompt",
    ]


# diffusers habits on the same tiny parts


def test_diffusers_habits(built: Built) -> None:
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    pipe = HunyuanImagePipeline(
        dit=dit, vae=tiny_vae(), text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    common = dict(prompt="a fox", width=64, height=32, num_inference_steps=1, seed=3)
    official = pipe(**common)
    assert isinstance(official, Image.Image)  # the official return for one image
    out = pipe(**common, return_dict=True)
    assert isinstance(out, HunyuanImageOutput) and out.images[0].tobytes() == official.tobytes()
    assert out[0] is out.images and out["seeds"] == [3]
    assert pipe(**common, return_dict=False)[0][0].tobytes() == official.tobytes()
    latents = pipe(**common, output_type="latent")
    assert isinstance(latents, torch.Tensor)
    assert torch.equal(pipe(**common, output_type="latent", return_dict=True).images, latents)

    seen = []

    def on_step_end(p, step, timestep, kwargs):
        seen.append((p, step, float(timestep), set(kwargs)))
        return {"latents": kwargs["latents"] * 0}

    zeroed = pipe(**common, output_type="latent", callback_on_step_end=on_step_end)
    assert [s[:2] for s in seen] == [(pipe, 0)] and seen[0][2] == 1000.0 and seen[0][3] == {"latents"}
    assert torch.count_nonzero(zeroed) == 0

    pipe.to("cpu", torch.bfloat16)
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert pipe(**common, output_type="latent").dtype == torch.float32  # the Euler step stays float32
    pipe.to(dtype=torch.float32)
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.float32}


def test_random_seed_is_reported() -> None:
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    pipe = HunyuanImagePipeline(
        dit=dit, vae=tiny_vae(), text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    out = pipe("a fox", width=64, height=32, num_inference_steps=1, seed=None, return_dict=True, output_type="np")
    (seed,) = out.seeds
    assert isinstance(seed, int) and 0 <= seed < 2**64
    again = pipe("a fox", width=64, height=32, num_inference_steps=1, seed=np.uint64(seed), output_type="np").images
    assert np.array_equal(again, out.images)


def test_negative_prompt_on_the_distilled_model_warns() -> None:
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    pipe = HunyuanImagePipeline(
        dit=dit, vae=tiny_vae(), text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    with pytest.warns(UserWarning, match="negative prompt is ignored: the distilled model"):
        pipe("a fox", negative_prompt="blurry", width=64, height=32, num_inference_steps=1, output_type="latent")


def test_metadata_chunks() -> None:
    from hyimage.metadata import png_text

    chunks = png_text(
        {
            "prompt": "a fox",
            "negative_prompt": "blurry",
            "steps": 8,
            "guidance_scale": 3.25,
            "seed": 7,
            "width": 64,
            "height": 32,
            "model": "hunyuanimage-v2.1-distilled",
        }
    )
    assert set(chunks) == {"parameters", "hyimage"}
    lines = chunks["parameters"].split("\n")
    assert lines[0] == "a fox" and lines[1] == "Negative prompt: blurry"
    fields = dict(item.split(": ", 1) for item in lines[2].split(", "))
    assert (fields["Steps"], fields["CFG scale"], fields["Seed"], fields["Size"]) == ("8", "3.25", "7", "64x32")
    assert fields["Model"] == "hunyuanimage-v2.1-distilled" and fields["Version"].startswith("hyimage ")
    assert json.loads(chunks["hyimage"])["version"]


def test_library_log_is_off_until_enabled() -> None:
    from loguru import logger

    from hyimage.cli.options import pick_seed

    seen: list[str] = []
    handler = logger.add(seen.append, level="DEBUG")
    try:
        pick_seed(-1)  # logs the random seed at INFO, from inside the package
        assert seen == []
        logger.enable("hyimage")
        pick_seed(-1)
        assert len(seen) == 1 and "random seed" in seen[0]
    finally:
        logger.disable("hyimage")
        logger.remove(handler)


def test_cli_log_levels_anywhere(no_loading, capsys) -> None:
    """INFO by default in a short format (time, level, message); -q keeps warnings only, before or after the command."""
    assert main(["generate", "a fox", "--steps", "0"]) == 1  # the random seed is drawn (and logged) first
    assert re.search(r"^\d\d:\d\d:\d\d INFO +random seed \d+$", capsys.readouterr().err, re.M)
    for argv in (["-q", "generate", "a fox", "--steps", "0"], ["generate", "a fox", "--steps", "0", "--quiet"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "random seed" not in err and err.startswith("error: --steps")


def test_finiteness_is_checked_once_per_stage_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """No host synchronisation inside the loop: the number of isfinite checks does not grow with the steps."""
    dit = tiny_model(TINY_CONFIGS["hunyuanimage-v2.1-distilled"])
    pipe = HunyuanImagePipeline(
        dit=dit, vae=tiny_vae(), text_encoder=FakeTextEncoder(), glyph_encoder=FakeGlyphEncoder(), progress_bar=False
    )
    calls: list[tuple] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(tuple(x.shape)) or isfinite(x))
    counts = []
    for steps in (1, 3):
        calls.clear()
        pipe("a fox", width=64, height=32, num_inference_steps=steps, seed=0, output_type="latent")
        counts.append(len(calls))
    channels = TINY_CONFIGS["hunyuanimage-v2.1-distilled"].in_channels
    assert counts[0] == counts[1] and (1, channels, 1, 2) in calls  # the final latents are among the checks
