"""The `hyimage` console script: generate, refine, download.

    hyimage generate "a red fox in the snow" --download --variant distilled --fp8
    hyimage refine photo.png --prompt "a red fox in the snow" --output refined.png
    hyimage download --variant distilled --fp8 --no-refiner
"""

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from hyimage import __version__
from hyimage.loading.download import (
    OFFICIAL_REPO,
    DownloadConfig,
    DownloadError,
    HubUnreachableError,
    complete,
    describe_unknown,
    human_size,
    plan,
)
from hyimage.loading.layout import model_root
from hyimage.offload import MEMORY_MODES
from hyimage.offload.planner import add_plan_parser
from hyimage.parallel import add_parallel_argument
from hyimage.parallel.state import shared_random_seed

VARIANT_ALIASES = {
    "base": "hunyuanimage-v2.1",
    "distilled": "hunyuanimage-v2.1-distilled",
    "hunyuanimage-v2.1": "hunyuanimage-v2.1",
    "hunyuanimage-v2.1-distilled": "hunyuanimage-v2.1-distilled",
}
METADATA_KEY = "hyimage"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    try:
        return args.run(args)
    except (DownloadError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyimage", description="HunyuanImage-2.1 text-to-image.")
    parser.add_argument("--version", action="version", version=f"hyimage {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="draw images from a prompt")
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--variant", default="base", choices=sorted(VARIANT_ALIASES),
                          help="base (50 steps, CFG) or distilled (8 steps); default base")
    size = generate.add_argument_group("size (default 2048x2048; HunyuanImage-2.1 is made for 2K)")
    size.add_argument("--width", type=int)
    size.add_argument("--height", type=int)
    size.add_argument("--aspect-ratio", help="an official 2K preset: 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3")
    generate.add_argument("--steps", type=int, help="default: 50 base, 8 distilled")
    generate.add_argument("--guidance-scale", type=float, help="default: 3.5 base, 3.25 distilled")
    generate.add_argument("--shift", type=float, help="default: 5 base, 4 distilled")
    generate.add_argument("--seed", type=int, help="default: a random seed, printed and stored in the PNG")
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=True,
                          help="run the refiner after the base stage (default on, as the official README advises)")
    generate.add_argument("--reprompt", choices=["7b", "32b"], help="rewrite the prompt with PromptEnhancer first")
    generate.add_argument("--trust-remote-code", action="store_true",
                          help="allow the 7B reprompt model's tokenizer code from its checkpoint folder to run")
    generate.add_argument("--output", "-o", type=Path, default=None,
                          help="PNG path (default hyimage-<seed>.png); several images get -0, -1, ... before .png")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    generate.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                          help="a LoRA for the DiT (kohya, ComfyUI or diffusers format), scale 1 by default; repeatable")
    add_loading_arguments(generate)
    add_parallel_argument(generate)
    generate.set_defaults(run=run_generate)

    refine = commands.add_parser("refine", help="refine an existing image with the refiner model")
    refine.add_argument("image", type=Path)
    refine.add_argument("--prompt", required=True, help="what the image shows (the refiner is prompt-guided)")
    refine.add_argument("--width", type=int, help="default: the image's width (a multiple of 16)")
    refine.add_argument("--height", type=int, help="default: the image's height (a multiple of 16)")
    refine.add_argument("--steps", type=int, help="default 4")
    refine.add_argument("--guidance-scale", type=float)
    refine.add_argument("--seed", type=int)
    refine.add_argument("--output", "-o", type=Path, default=None, help="default <image>-refined.png")
    refine.add_argument("--overwrite", action="store_true")
    add_loading_arguments(refine)
    refine.set_defaults(run=run_refine)

    download = commands.add_parser("download", help="fetch the checkpoints a configuration needs")
    download.add_argument("--variant", default="base", choices=sorted(VARIANT_ALIASES))
    download.add_argument("--fp8", action="store_true", help="the FP8 DiT files instead of the bf16 ones")
    download.add_argument("--no-refiner", dest="refiner", action="store_false")
    download.add_argument("--refiner-only", action="store_true", help="only what `hyimage refine` needs")
    download.add_argument("--reprompt", choices=["7b", "32b"])
    download.add_argument("--model-root", type=Path, default=None,
                          help="where the ckpts/ layout goes (default $HUNYUANIMAGE_V2_1_MODEL_ROOT or ./ckpts)")
    download.add_argument("--dry-run", action="store_true",
                          help="list what would be fetched and stop (offline: from what is recorded)")
    download.add_argument("--verify", action="store_true",
                          help="hash every present file again and fetch those that do not match")
    download.add_argument("--repo-id", default=OFFICIAL_REPO,
                          help="the Hub repository holding dit/ and vae/ in the official layout")
    download.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    download.set_defaults(run=run_download)
    add_plan_parser(commands)

    from hyimage.batch import add_batch_parser

    add_batch_parser(commands)
    return parser


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading and memory")
    group.add_argument("--model-root", type=Path, default=None,
                       help="the ckpts/ folder (default $HUNYUANIMAGE_V2_1_MODEL_ROOT or ./ckpts)")
    group.add_argument("--download", action="store_true", help="fetch the missing checkpoint files first")
    group.add_argument("--fp8", action="store_true",
                       help="FP8 DiT weights (the official _fp8 files, or the bf16 file quantized while loading)")
    group.add_argument("--device", default=None, help="default cuda when available, else cpu")
    group.add_argument("--memory-mode", choices=MEMORY_MODES, default=None,
                       help="auto (default): as `hyimage plan` places each part; none: all on the GPU; "
                            "model: each part on the GPU while it runs; block: stream the DiT and text encoder "
                            "block by block")
    group.add_argument("--gpu-budget-gb", type=float, default=None,
                       help="GPU memory (GiB) the auto plan keeps within; in block mode, for streamed weights")


def default_device() -> str:
    """CUDA when available, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_download(args: argparse.Namespace) -> int:
    config = DownloadConfig(
        variant=VARIANT_ALIASES[args.variant], fp8=args.fp8, refiner=args.refiner or args.refiner_only,
        reprompt=args.reprompt, base=not args.refiner_only, repo_id=args.repo_id,
    )
    fetch(config, args.model_root, dry_run=args.dry_run, verify=args.verify, progress=not args.quiet)
    return 0


def fetch(
    config: DownloadConfig, root: Path | None, *, dry_run: bool = False, verify: bool = False, progress: bool = True
) -> None:
    """Show what `config` lacks and its size, then fetch it; asks the Hub only for what is not recorded in `root`."""
    root = model_root(root)
    try:
        found = plan(config, root, verify=verify)
    except HubUnreachableError as error:
        if not dry_run:
            raise
        found = plan(config, root, online=False, verify=verify)
        found.offline_reason = f"the Hub is unreachable ({error.__cause__ or error})"
    if found.complete:
        print(f"everything for {config.describe()} is in {root}, checked")
        return
    if found.offline_reason:
        print(f"{found.offline_reason}: working from what is recorded in {root}")
    if found.unchecked:
        size = human_size(sum(f.size for f in found.unchecked))
        print(f"{len(found.unchecked)} files present ({size}) will be hashed against the Hub's listing")
    if found.missing:
        more = " (and the unknown below)" if found.unknown else ""
        print(f"{len(found.missing)} files, {human_size(found.fetch_bytes())}{more}, will be fetched into {root}:")
        for file in found.missing:
            print(f"  {human_size(file.size):>10}  {file.destination.relative_to(root)}  ({file.repo_id})")
    if found.unknown:
        print("not known offline (the file lists were never recorded here; names and sizes need the Hub):")
        for line in describe_unknown(found.unknown):
            print(f"  {line}")
    if dry_run:
        return
    placed = complete(found, progress=progress)
    print(f"done: {len(placed)} files put in place, everything for {config.describe()} checked")


def run_generate(args: argparse.Namespace) -> int:
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
    from hyimage.lora.mixin import parse_lora_spec

    variant = VARIANT_ALIASES[args.variant]
    loras = [parse_lora_spec(spec) for spec in args.lora]
    for path, _ in loras:
        if not path.is_file():
            raise FileNotFoundError(f"--lora {path} does not exist; pass the path of a LoRA .safetensors file")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    seed = args.seed
    if seed is None:  # under --parallel, rank 0's random seed for every rank
        seed = random.randrange(2**31) if args.parallel is None else shared_random_seed()
    stem = args.output if args.output is not None else Path(f"hyimage-{seed}.png")
    outputs = output_paths(stem, args.num_images)
    refuse_overwrite(outputs, args.overwrite)
    if args.download:
        fetch(DownloadConfig(variant=variant, fp8=args.fp8, refiner=args.refiner, reprompt=args.reprompt),
              args.model_root)

    pipe = HunyuanImagePipeline.from_pretrained(
        model_name=variant,
        use_fp8=args.fp8,
        model_root=args.model_root,
        memory_mode=args.memory_mode,
        gpu_budget_gb=args.gpu_budget_gb,
        reprompt_model=args.reprompt or "32b",
        trust_remote_code=args.trust_remote_code,
        refiner=args.refiner,
        parallel=args.parallel,
    )
    pipe.to(args.device or default_device())
    for path, scale in loras:
        pipe.load_lora_weights(path, scale=scale)
    result = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        aspect_ratio=args.aspect_ratio,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        shift=args.shift,
        seed=seed,
        num_images_per_prompt=args.num_images,
        use_reprompt=args.reprompt is not None,
        use_refiner=args.refiner,
        output_type="pt",
    )
    defaults = pipe.defaults
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "variant": variant,
        "fp8": args.fp8,
        "steps": args.steps if args.steps is not None else defaults.num_inference_steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        "shift": args.shift if args.shift is not None else defaults.shift,
        "refiner": args.refiner,
        "reprompt": args.reprompt,
        "lora": args.lora,
    }
    if pipe.parallel is not None and pipe.parallel.rank != 0:
        return 0  # rank 0 writes the images
    for path, image, used_prompt, image_seed in zip(outputs, result.images, result.prompts, result.seeds):
        save_png(image, path, dict(settings, seed=image_seed, prompt_used=used_prompt))
        print(f"saved {path} (seed {image_seed})")
    return 0


def run_refine(args: argparse.Namespace) -> int:
    from PIL import Image

    from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline

    if not args.image.is_file():
        raise FileNotFoundError(f"{args.image} not found; pass the path of an image to refine")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    output = args.output if args.output is not None else args.image.with_name(args.image.stem + "-refined.png")
    refuse_overwrite([output], args.overwrite)
    if args.download:
        fetch(DownloadConfig(fp8=args.fp8, refiner=True, base=False), args.model_root)
    image = Image.open(args.image).convert("RGB")
    pipe = HunyuanImageRefinerPipeline.from_pretrained(
        use_fp8=args.fp8, model_root=args.model_root, memory_mode=args.memory_mode, gpu_budget_gb=args.gpu_budget_gb
    )
    pipe.to(args.device or default_device())
    result = pipe(
        image=image, prompt=args.prompt, width=args.width, height=args.height,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=seed, output_type="pt",
    )
    settings = {"prompt": args.prompt, "refined_from": str(args.image), "fp8": args.fp8, "steps": args.steps,
                "seed": seed}
    save_png(result.images[0:1], output, settings)
    print(f"saved {output} (seed {seed})")
    return 0


def output_paths(stem: Path, count: int) -> list[Path]:
    """`stem` for one image; `name-0.png`, `name-1.png`, ... for several."""
    if stem.suffix.lower() != ".png":
        raise ValueError(f"--output {stem} must end in .png (the settings are stored as PNG metadata)")
    if count == 1:
        return [stem]
    return [stem.with_name(f"{stem.stem}-{i}{stem.suffix}") for i in range(count)]


def refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exists; pass --overwrite to replace it or choose another --output"
        )


def save_png(image: Any, path: Path, settings: dict) -> None:
    """Save one image tensor (3, H, W) or (1, 3, H, W) in [0, 1] with `settings` as PNG text metadata."""
    from PIL import Image, PngImagePlugin

    from hyimage.diffusion.pipelines.parts import to_uint8

    pixels = image if image.ndim == 4 else image.unsqueeze(0)
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(settings, ensure_ascii=False))
    for key in ("prompt", "seed"):
        if settings.get(key) is not None:
            info.add_text(key, str(settings[key]))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(pixels)[0]).save(path, pnginfo=info)


if __name__ == "__main__":
    sys.exit(main())
