"""End to end on CPU: a complete tiny checkpoint tree in the official layout, the official README snippet, the CLI.

The snippet runs as the official README prints it with three substitutions, each stated here:
"cuda" -> "cpu" (no GPU in the suite); every (width, height) preset divided by 16 (2048x2048 through the
tiny VAEs would cost minutes of CPU per image and tests nothing the small size does not: the 16:9 preset run
becomes 160x96, multiples of the VAE factor 32, aspect ratio unchanged); 2 sampling steps instead of 50/8 (the
loop is tested step by step against the official one in the pipeline tests; here it only has to run).
"""

import json
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hyimage.checkpoints.layout import MODEL_ROOT_ENV, CheckpointLayout
from hyimage.cli import main
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.errors import MissingCheckpointError
from tests.fixtures.fake_hub import FakeHub, closed_endpoint, point_hub_at
from tests.fixtures.qwen_tokenizer import build_qwen_tokenizer_once
from tests.fixtures.tiny_tree import write_tiny_tree

OFFICIAL_SNIPPET = '''
import os
os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'
import torch
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline

# Supported model_name: hunyuanimage-v2.1, hunyuanimage-v2.1-distilled
model_name = "hunyuanimage-v2.1"
pipe = HunyuanImagePipeline.from_pretrained(model_name=model_name, use_fp8=True)
pipe = pipe.to("cuda")

# The input prompt
prompt = "A cute, cartoon-style anthropomorphic penguin plush toy with fluffy fur, standing in a painting studio, wearing a red knitted scarf and a red beret with the word \\"Tencent\\" on it, holding a paintbrush with a focused expression as it paints an oil painting of the Mona Lisa, rendered in a photorealistic photographic style."


# Generate with different aspect ratios
aspect_ratios = {
    "16:9": (2560, 1536),
    "4:3": (2304, 1792),
    "1:1": (2048, 2048),
    "3:4": (1792, 2304),
    "9:16": (1536, 2560),
}

width, height = aspect_ratios["1:1"]

image = pipe(
    prompt=prompt,
    width=width,
    height=height,
    # disable the reprompt if you already use the prompt enhancement to enhance the prompt
    use_reprompt=False,  # Enable prompt enhancement (which may result in higher GPU memory usage)
    use_refiner=True,   # Enable refiner model
    # For the distilled model, use 8 steps for faster inference.
    # For the non-distilled model, use 50 steps for better quality.
    num_inference_steps=8 if "distilled" in model_name else 50, 
    guidance_scale=3.25 if "distilled" in model_name else 3.5,
    shift=4 if "distilled" in model_name else 5,
    seed=649151,
)

image.save("generated_image.png")
'''


def cpu_snippet(model_name: str, ratio: str) -> str:
    """The snippet with the substitutions of the module docstring (and the variant and preset to run)."""
    code = OFFICIAL_SNIPPET.replace('pipe.to("cuda")', 'pipe.to("cpu")')
    code = re.sub(r"\((\d+), (\d+)\)", lambda m: f"({int(m[1]) // 16}, {int(m[2]) // 16})", code)
    code = code.replace("num_inference_steps=8 if", "num_inference_steps=2 if").replace("else 50,", "else 2,")
    code = code.replace('model_name = "hunyuanimage-v2.1"', f'model_name = "{model_name}"')
    return code.replace('aspect_ratios["1:1"]', f'aspect_ratios["{ratio}"]')


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_qwen_tokenizer_once(str(tmp_path_factory.getbasetemp()))
    return write_tiny_tree(tmp_path_factory.mktemp("ckpts"), tokenizer)


@pytest.fixture
def in_tree(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HUNYUANIMAGE_V2_1_MODEL_ROOT at the tree, working directory a fresh folder."""
    monkeypatch.setenv(MODEL_ROOT_ENV, str(tree))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_official_snippet_runs_on_the_tiny_tree(in_tree: Path) -> None:
    """The base model with the official FP8 pair and the refiner (quantized while loading: no FP8 file for it)."""
    namespace: dict = {}
    exec(compile(cpu_snippet("hunyuanimage-v2.1", "16:9"), "README snippet", "exec"), namespace)
    image = Image.open(in_tree / "generated_image.png")
    assert image.size == (160, 96) and image.mode == "RGB"
    assert len(set(image.getdata())) > 1  # not a blank image

    pipe = namespace["pipe"]
    assert torch.float8_e4m3fn in {p.dtype for p in pipe.dit.parameters()}
    assert not pipe.is_distilled
    refiner = pipe.parts.loaded("refiner_pipeline")
    assert torch.float8_e4m3fn in {p.dtype for p in refiner.dit.parameters()}
    assert refiner.text_encoder.model is pipe.text_encoder.model  # one language model for both templates
    assert pipe.parts.loaded("reprompt_model") is None  # never asked for, never loaded


def test_parts_load_only_when_needed(in_tree: Path) -> None:
    pipe = HunyuanImagePipeline.from_pretrained(
        model_name="hunyuanimage-v2.1-distilled", use_fp8=False, memory_mode="block"
    )
    assert all(pipe.parts.loaded(name) is None for name in ("dit", "vae", "text_encoder", "glyph_encoder"))
    latents = pipe(prompt="a red fox", width=64, height=64, num_inference_steps=1, seed=1, output_type="latent")
    assert latents.shape == (1, 64, 2, 2)
    assert pipe.parts.loaded("refiner_pipeline") is None and pipe.parts.loaded("reprompt_model") is None
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.float32}  # bf16 file, float32 compute on CPU
    for part in (pipe.dit, pipe.text_encoder):  # block streaming ran in the pipeline, for both
        streamer = pipe.memory.streamer(part)
        assert streamer.counts["load"] >= len(streamer.plan.streamed) > 0


def test_cli_generate_writes_sized_images_with_settings(in_tree: Path) -> None:
    args = ["generate", 'a shop sign that reads "OPEN"', "--variant", "distilled", "--fp8", "--width", "64",
            "--height", "32", "--steps", "1", "--seed", "11", "--num-images", "2", "--device", "cpu", "-o", "out.png"]
    assert main(args) == 0
    for i in range(2):
        image = Image.open(in_tree / f"out-{i}.png")
        assert image.size == (64, 32)
        settings = json.loads(image.text["hyimage"])
        assert settings["seed"] == 11 + i and "prompt" not in image.text
        assert settings["model"] == "hunyuanimage-v2.1-distilled" and settings["fp8"] is True
        assert settings["steps"] == 1 and settings["shift"] == 4 and settings["refiner"] is True
        assert (settings["width"], settings["height"], settings["refiner_steps"]) == (64, 32, 4)
        assert f"Seed: {11 + i}, Size: 64x32" in image.text["parameters"]

    assert main(args) == 1  # refuses to overwrite
    assert main(["refine", "out-0.png", "--prompt", "a shop sign", "--seed", "3", "--steps", "1", "--device", "cpu"]) == 0
    refined = Image.open(in_tree / "out-0-refined.png")
    settings = json.loads(refined.text["hyimage"])
    assert refined.size == (64, 32) and settings["seed"] == 3 and settings["steps"] == 1
    assert settings["model"] == "hunyuanimage-refiner" and settings["refined_from"] == "out-0.png"


def test_cli_generate_records_the_step_cache(in_tree: Path) -> None:
    """--cache reaches the pipeline; the PNG metadata records the cache and its full steps."""
    args = ["generate", "a red fox", "--variant", "distilled", "--no-refiner", "--width", "64", "--height", "32",
            "--steps", "4", "--seed", "5", "--device", "cpu", "-o", "cached.png",
            "--cache", "taylorseer:interval=4,order=1,warmup=1"]
    assert main(args) == 0
    image = Image.open(in_tree / "cached.png")
    cache = json.loads(image.text["hyimage"])["cache"]
    assert cache["cache"] == "taylorseer:interval=4,order=1,warmup=1"
    assert (cache["steps"], cache["full_steps"], cache["decisions"]) == (4, 2, ["F", "c", "F", "c"])
    assert "Cache: taylorseer:interval=4,order=1,warmup=1 (2/4 full steps)" in image.text["parameters"]


def hub_repos(tree: Path, tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """The tiny tree as the Hub holds it: the Glyph encoder only in the diffusers format (the Hub route)."""
    from hyimage.text_encoders.glyph import GlyphByT5Encoder

    def files(folder: Path, prefix: str = "") -> dict[str, bytes]:
        return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    layout = CheckpointLayout(tree)
    glyph = GlyphByT5Encoder.from_pretrained(layout.byt5, layout.glyph)
    diffusers_glyph = tmp_path / "diffusers"
    glyph.text_tower.save_pretrained(diffusers_glyph / "text_encoder_2")
    glyph.tokenizer.save_pretrained(diffusers_glyph / "tokenizer_2")
    official = {k: v for k, v in files(tree).items() if k.startswith("vae/") or k.endswith(".safetensors")}
    return {
        "tencent/HunyuanImage-2.1": official,
        "Qwen/Qwen2.5-VL-7B-Instruct": files(layout.text_encoder),
        "google/byt5-small": files(layout.byt5),
        "hunyuanvideo-community/HunyuanImage-2.1-Diffusers": files(diffusers_glyph),
    }


def test_generate_download_fetches_then_draws(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first command: `hyimage generate --download` on an empty folder, against a local Hub; then
    the same command with the Hub unreachable, which needs no network once the download is complete."""
    hub = FakeHub(hub_repos(tree, tmp_path))
    point_hub_at(monkeypatch, hub.endpoint)
    root = tmp_path / "ckpts"
    (root / "dit").mkdir(parents=True)
    for config in (tree / "dit").glob("*.json"):  # the tiny sizes (the released sizes need no file)
        shutil.copy(config, root / "dit")
    try:
        code = main(["generate", 'a sign that reads "HUB"', "--download", "--variant", "distilled", "--width", "64",
                     "--height", "64", "--steps", "1", "--seed", "5", "--device", "cpu", "--model-root", str(root),
                     "-o", str(tmp_path / "first.png")])
    finally:
        hub.close()
    assert code == 0
    assert Image.open(tmp_path / "first.png").size == (64, 64)
    assert (root / "text_encoder/Glyph-SDXL-v2/text_encoder_2/config.json").is_file()
    assert not (root / "dit/hunyuanimage2.1.safetensors").exists()  # the base model was not needed

    point_hub_at(monkeypatch, closed_endpoint())  # no network: the same command runs from what is on disk
    code = main(["generate", "offline", "--download", "--variant", "distilled", "--no-refiner", "--width", "64",
                 "--height", "64", "--steps", "1", "--seed", "6", "--device", "cpu", "--model-root", str(root),
                 "-o", str(tmp_path / "offline.png")])
    assert code == 0 and Image.open(tmp_path / "offline.png").size == (64, 64)


def partial_tree(tree: Path, target: Path, leave_out: str) -> Path:
    """A copy of `tree` (as symlinks) without the file or folder `leave_out`."""
    for path in tree.rglob("*"):
        relative = path.relative_to(tree)
        if path.is_file() and not relative.as_posix().startswith(leave_out):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).symlink_to(path)
    return target


@pytest.mark.parametrize(
    "leave_out, use_fp8, named, command",
    [
        ("dit/hunyuanimage2.1-distilled.safetensors", False, "dit/hunyuanimage2.1-distilled.safetensors",
         "hyimage download --variant hunyuanimage-v2.1-distilled"),
        ("dit/hunyuanimage2.1_fp8_scale", True, "dit/hunyuanimage2.1_fp8_scale.safetensors",
         "hyimage download --variant hunyuanimage-v2.1 --fp8"),
        ("vae/vae_2_1", False, "vae/vae_2_1/config.json", "hyimage download --variant hunyuanimage-v2.1"),
        ("text_encoder/llm", False, "text_encoder/llm/config.json", "hyimage download --variant hunyuanimage-v2.1"),
        ("text_encoder/Glyph-SDXL-v2", False, "text_encoder/Glyph-SDXL-v2", "hyimage download"),
    ],
)
def test_missing_checkpoint_names_file_configuration_and_command(
    tree: Path, tmp_path: Path, leave_out: str, use_fp8: bool, named: str, command: str
) -> None:
    root = partial_tree(tree, tmp_path / "ckpts", leave_out)
    variant = "hunyuanimage-v2.1-distilled" if "distilled" in leave_out else "hunyuanimage-v2.1"
    with pytest.raises(MissingCheckpointError) as error:
        HunyuanImagePipeline.from_pretrained(model_name=variant, use_fp8=use_fp8, model_root=root)
    message = str(error.value)
    assert str(root / named) in message and variant in message and command in message


def test_missing_refiner_fails_when_the_refiner_is_first_needed(tree: Path, tmp_path: Path) -> None:
    root = partial_tree(tree, tmp_path / "ckpts", "dit/hunyuanimage-refiner")
    pipe = HunyuanImagePipeline.from_pretrained(model_name="hunyuanimage-v2.1-distilled", model_root=root)
    with pytest.raises(MissingCheckpointError, match=r"hunyuanimage-refiner\.safetensors.*hyimage download"):
        pipe(prompt="a fox", width=64, height=64, num_inference_steps=1, seed=0, use_refiner=True)


def test_fp8_bf16_mixup_and_missing_root_are_explained(tree: Path, tmp_path: Path) -> None:
    root = partial_tree(tree, tmp_path / "ckpts", "dit/hunyuanimage2.1.safetensors")
    with pytest.raises(MissingCheckpointError, match=r"use_fp8=True"):
        HunyuanImagePipeline.from_pretrained(model_name="hunyuanimage-v2.1", use_fp8=False, model_root=root)
    with pytest.raises(MissingCheckpointError, match=r"does not exist.*hyimage download"):
        HunyuanImagePipeline.from_pretrained(model_root=tmp_path / "nowhere")
    assert CheckpointLayout(root).dit_fp8("hunyuanimage-v2.1").exists()
    shutil.rmtree(root)


@pytest.mark.skipif(not os.environ.get("HYIMAGE_CKPTS"), reason="set HYIMAGE_CKPTS to a ckpts/ folder to run")
@pytest.mark.parametrize("model_name", ["hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled"])
def test_released_layout_is_found(model_name: str) -> None:
    """With the released checkpoints: the pipeline is assembled (nothing heavy is read) for both variants."""
    pipe = HunyuanImagePipeline.from_pretrained(model_name=model_name, model_root=os.environ["HYIMAGE_CKPTS"])
    assert pipe.parts.loaded("dit") is None and pipe.parts.given("glyph_encoder")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--device", "cpu", "--width", "64", "--height", "32", "--steps", "1"]


@pytest.mark.slow
def test_examples_run_on_the_tiny_tree(in_tree: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Every example, with the options that make it run on a CPU at a tiny size (the released sizes otherwise)."""
    Image.new("RGB", (32, 32), (200, 80, 40)).save(in_tree / "input.png")
    runs = {
        "official_snippet.py": ["--model-name", "hunyuanimage-v2.1-distilled", "--no-refiner", *TINY],
        "batch_generation.py": ["--no-refiner", "--output-dir", "batch", *TINY],
        "low_memory_generation.py": ["--no-refiner", "--gpu-budget-gb", "0.001", *TINY],
        "refine_only.py": ["input.png", "an orange square", "--device", "cpu", "--steps", "1"],
    }
    assert set(runs) == {p.name for p in EXAMPLES.glob("*.py")}
    for name, argv in runs.items():
        monkeypatch.setattr(sys, "argv", [name, *argv])
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert Image.open(in_tree / "generated_image.png").size == (64, 32)
    assert len(list((in_tree / "batch").glob("*.png"))) == 3
    assert Image.open(in_tree / "low_memory.png").size == (64, 32)
    assert Image.open(in_tree / "refined.png").size == (32, 32)


def test_cli_random_seed_is_drawn_reported_and_stored(in_tree: Path, capsys) -> None:
    args = ["generate", "a fox", "--variant", "distilled", "--no-refiner", "--seed", "-1", *TINY]
    assert main(args) == 0
    saved = re.search(r"saved (hyimage-(\d+)\.png) \(seed (\d+)\)", capsys.readouterr().out)
    assert saved and saved[2] == saved[3]
    image = Image.open(in_tree / saved[1])
    assert json.loads(image.text["hyimage"])["seed"] == int(saved[3]) and f"Seed: {saved[3]}," in image.text["parameters"]
    assert "prompt" not in image.text


def test_nan_weight_ends_in_an_error_and_no_png(tree: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    root = partial_tree(tree, tmp_path / "ckpts", "dit/hunyuanimage2.1-distilled.safetensors")
    state = load_file(str(tree / "dit/hunyuanimage2.1-distilled.safetensors"))
    name = next(k for k in state if k.startswith("final_layer"))
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(root / "dit/hunyuanimage2.1-distilled.safetensors"))
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "a fox", "--variant", "distilled", "--no-refiner", "--seed", "1", "--model-root",
                 str(root), "-o", "nan.png", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and "error: denoising produced non-finite values" in err and "DiT checkpoint" in err
    assert "Traceback" not in err and not list(tmp_path.glob("*.png*"))


def test_from_pretrained_diffusers_habits(tree: Path) -> None:
    """A local folder first, `torch_dtype`, and the official offloading keywords (all off: memory mode none)."""
    pipe = HunyuanImagePipeline.from_pretrained(
        str(tree), model_name="hunyuanimage-v2.1-distilled", torch_dtype=torch.bfloat16,
        enable_stage1_offloading=False, enable_full_dit_offloading=False, device="cpu",
    )
    assert pipe.memory.mode == "none" and pipe.is_distilled
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.bfloat16}
    assert HunyuanImagePipeline.from_pretrained(tree, enable_full_dit_offloading=True).memory.mode == "model"
