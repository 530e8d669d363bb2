"""`hyimage refine`: its arguments and its runner (an existing image through the refiner to a PNG file)."""

import argparse
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from hyimage.checkpoints.needs import DownloadConfig
from hyimage.cli.download import fetch
from hyimage.cli.options import (
    GENERATE_NAMES,
    RANDOM_SEED,
    add_loading_arguments,
    check_loading_arguments,
    pick_seed,
    seed_argument,
)
from hyimage.cli.output import check_output, output_paths, refuse_overwrite, save_png
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.diffusion.request import check_request
from hyimage.errors import RequestError
from hyimage.variants import REFINER


def add_refine_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `hyimage refine` on the CLI's subcommands (`parents`: the options every subcommand takes)."""
    refine = commands.add_parser("refine", help="refine an existing image with the refiner model", parents=parents)
    refine.add_argument("image", type=Path)
    refine.add_argument("--prompt", required=True, help="what the image shows (the refiner is prompt-guided)")
    refine.add_argument("--width", type=int, help="default: the image's width (a multiple of 16)")
    refine.add_argument("--height", type=int, help="default: the image's height (a multiple of 16)")
    refine.add_argument("--steps", type=int, help="default 4")
    refine.add_argument("--guidance-scale", type=float, help="default 3.5")
    refine.add_argument("--seed", type=seed_argument, default=RANDOM_SEED, help="default (or -1): a random seed")
    refine.add_argument("--output", "-o", type=Path, default=None, help="default <image>-refined.png")
    refine.add_argument("--overwrite", action="store_true")
    add_loading_arguments(refine, dit_file=False)
    refine.set_defaults(run=run_refine)
    return refine


def open_image(path: Path) -> Any:
    """The RGB image at `path`, read before any model loads; a clear error when it is not an image."""
    if not path.is_file():
        raise RequestError("IMAGE", f"{path} not found (or not a file); pass the path of an image to refine")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        message = f"{path} is not an image that can be read (PNG, JPEG, WebP, ...): {error}"
        raise RequestError("IMAGE", message) from None


def run_refine(args: argparse.Namespace) -> int:
    image = open_image(args.image)
    seed = pick_seed(args.seed)
    width, height = args.width or image.width, args.height or image.height
    request = dict(prompt=args.prompt, width=width, height=height, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale, seed=seed)
    check_request(request, size_multiple=16, image_count=1, names=dict(GENERATE_NAMES, prompt="--prompt"))
    device = check_loading_arguments(args)
    output = args.output if args.output is not None else args.image.with_name(args.image.stem + "-refined.png")
    output_paths(output, 1)
    check_output(output)
    refuse_overwrite([output], args.overwrite)
    if args.download:
        fetch(DownloadConfig(fp8=args.fp8, refiner=True, base=False), args.model_root)
    pipe = HunyuanImageRefinerPipeline.from_pretrained(
        use_fp8=args.fp8, model_root=args.model_root, memory_mode=args.memory_mode, gpu_budget_gb=args.gpu_budget_gb,
        host_budget_gb=args.host_budget_gb,
    )
    if args.cache is not None:
        pipe.enable_cache(args.cache[0], **args.cache[1])
    pipe.to(device)
    result = pipe(image=image, **request, output_type="pt", return_dict=True)
    settings = {
        "prompt": args.prompt,
        "model": REFINER,
        "refined_from": str(args.image),
        "fp8": args.fp8,
        "width": width,
        "height": height,
        "steps": args.steps if args.steps is not None else pipe.default_num_inference_steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else pipe.default_guidance_scale,
        "shift": pipe.default_shift,
        "seed": seed,
        "cache": pipe.cache_stats,
    }
    save_png(result.images[0:1], output, settings)
    print(f"saved {output} (seed {seed})")
    return 0
