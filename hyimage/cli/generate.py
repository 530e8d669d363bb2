"""`hyimage generate`: its arguments and its runner (prompt to PNG files)."""

import argparse
from pathlib import Path
from typing import Any

from loguru import logger

from hyimage.checkpoints.needs import DownloadConfig
from hyimage.cli.download import fetch
from hyimage.cli.options import (
    GENERATE_NAMES,
    RANDOM_SEED,
    add_aspect_ratio_argument,
    add_loading_arguments,
    add_lora_argument,
    check_aspect_ratio,
    check_loading_arguments,
    load_loras,
    lora_arguments,
    pick_seed,
    pipeline_from_args,
    seed_argument,
)
from hyimage.cli.output import check_output, output_paths, refuse_overwrite, save_png
from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline
from hyimage.diffusion.request import check_request
from hyimage.parallel import add_parallel_argument
from hyimage.variants import ASPECT_RATIOS, VARIANT_ALIASES


def add_generate_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `hyimage generate` on the CLI's subcommands (`parents`: the options every subcommand takes)."""
    generate = commands.add_parser("generate", help="draw images from a prompt", parents=parents)
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default=None, help="used by the base model only (CFG)")
    generate.add_argument("--variant", default=None, choices=sorted(VARIANT_ALIASES),
                          help="base (50 steps, CFG) or distilled (8 steps); default base")
    size = generate.add_argument_group("size (default 2048x2048; HunyuanImage-2.1 is made for 2K)")
    size.add_argument("--width", type=int, help="a multiple of 32, at most 4096")
    size.add_argument("--height", type=int, help="a multiple of 32, at most 4096")
    add_aspect_ratio_argument(size)
    generate.add_argument("--steps", type=int, help="default: 50 base, 8 distilled")
    generate.add_argument("--guidance-scale", type=float, help="default: 3.5 base, 3.25 distilled")
    generate.add_argument("--shift", type=float, help="default: 5 base, 4 distilled")
    generate.add_argument("--seed", type=seed_argument, default=RANDOM_SEED,
                          help="default (or -1): a random seed, printed and stored in the PNG")
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=True,
                          help="run the refiner after the base stage (default on, as the official README advises)")
    generate.add_argument("--reprompt", choices=["7b", "32b"], help="rewrite the prompt with PromptEnhancer first")
    generate.add_argument("--trust-remote-code", action="store_true",
                          help="allow the 7B reprompt model's tokenizer code from its checkpoint folder to run")
    generate.add_argument("--output", "-o", type=Path, default=None,
                          help="PNG path (default hyimage-<seed>.png); several images get -0, -1, ... before .png")
    generate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_lora_argument(generate)
    add_loading_arguments(generate)
    add_parallel_argument(generate)
    generate.set_defaults(run=run_generate)
    return generate


def run_generate(args: argparse.Namespace) -> int:
    variant = VARIANT_ALIASES[args.variant or "base"]
    loras = lora_arguments(args.lora)
    seed = pick_seed(args.seed, shared=args.parallel is not None)
    request = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        aspect_ratio=args.aspect_ratio, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        shift=args.shift, seed=seed, num_images_per_prompt=args.num_images, use_refiner=args.refiner,
        use_reprompt=args.reprompt is not None,
    )
    check_aspect_ratio(args)
    check_request(request, aspect_ratios=ASPECT_RATIOS, names=GENERATE_NAMES)
    device = check_loading_arguments(args)
    if args.trust_remote_code and args.reprompt != "7b":
        logger.warning("--trust-remote-code is only used by --reprompt 7b; ignored")
    stem = args.output if args.output is not None else Path(f"hyimage-{seed}.png")
    outputs = output_paths(stem, args.num_images)
    for path in outputs:
        check_output(path)
    refuse_overwrite(outputs, args.overwrite)
    if args.download:
        fetch(DownloadConfig(variant=variant, fp8=args.fp8, refiner=args.refiner, reprompt=args.reprompt),
              args.model_root)

    pipe = pipeline_from_args(args, variant, args.reprompt or "32b", parallel=args.parallel)
    pipe.to(device)
    load_loras(pipe, loras)
    result = pipe(**request, output_type="pt", return_dict=True)
    defaults = pipe.defaults
    width, height = result.images.shape[-1], result.images.shape[-2]
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "model": variant,
        "fp8": args.fp8,
        "width": width,
        "height": height,
        "steps": args.steps if args.steps is not None else defaults.num_inference_steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        "shift": args.shift if args.shift is not None else defaults.shift,
        "refiner": args.refiner,
        "refiner_steps": HunyuanImageRefinerPipeline.default_num_inference_steps if args.refiner else None,
        "reprompt": args.reprompt,
        "lora": args.lora,
        "cache": pipe.cache_stats,
    }
    if pipe.parallel is not None and pipe.parallel.rank != 0:
        return 0  # rank 0 writes the images
    for path, image, used_prompt, image_seed in zip(outputs, result.images, result.prompts, result.seeds):
        save_png(image, path, dict(settings, seed=image_seed, prompt_used=used_prompt))
        print(f"saved {path} (seed {image_seed})")
    return 0
