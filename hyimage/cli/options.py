"""The options several subcommands share: variants, seeds, LoRAs and the loading arguments, with their checks and the
pipeline they describe."""

import argparse
import math
import random
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from hyimage.cache import cache_spec_argument
from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline
from hyimage.diffusion.request import check_device, check_real
from hyimage.errors import RequestError
from hyimage.lora.mixin import parse_lora_spec
from hyimage.offload import MEMORY_MODES
from hyimage.offload.machine import check_host_budget
from hyimage.parallel.state import shared_random_seed
from hyimage.variants import ASPECT_RATIOS, aspect_ratio_spelling

RANDOM_SEED = -1
GENERATE_NAMES = {
    "prompt": "PROMPT", "negative_prompt": "--negative-prompt", "width": "--width", "height": "--height",
    "aspect_ratio": "--aspect-ratio", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "shift": "--shift", "seed": "--seed", "num_images_per_prompt": "--num-images", "use_refiner": "--refiner",
    "use_reprompt": "--reprompt", "device": "--device", "image": "IMAGE",
}


def seed_argument(text: str) -> int:
    """An int seed in [0, 2**64), or -1 for a random one."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass e.g. 42, or -1 for a random seed") from None
    if not RANDOM_SEED <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"{seed} is out of range: pass 0 to 2**64-1, or -1 for a random seed")
    return seed


def pick_seed(seed: int, shared: bool = False) -> int:
    """The seed to use: the given one, or a random one (reported) for -1; `shared`: rank 0's under torchrun."""
    if seed != RANDOM_SEED:
        return seed
    seed = shared_random_seed() if shared else random.randrange(2**31)
    logger.info(f"random seed {seed}")
    return seed


def add_aspect_ratio_argument(group: Any) -> None:
    """`--aspect-ratio`, an official preset; `16x9`, `16X9`, `16/9` are read as 16:9."""
    group.add_argument("--aspect-ratio", type=aspect_ratio_spelling,
                       help=f"an official 2K preset: {', '.join(ASPECT_RATIOS)} (16x9 and 16/9 are read as 16:9)")


def check_aspect_ratio(args: argparse.Namespace) -> None:
    """`--aspect-ratio` is a preset and comes without --width/--height (checked before anything loads)."""
    if args.aspect_ratio is None:
        return
    if args.width is not None or args.height is not None:
        raise RequestError("--aspect-ratio", "--aspect-ratio and --width/--height were both given; pass one of them")
    if args.aspect_ratio not in ASPECT_RATIOS:
        raise RequestError("--aspect-ratio", f"--aspect-ratio {args.aspect_ratio!r} is not an official preset; "
                                             f"choose one of {', '.join(ASPECT_RATIOS)} (or write 16x9, 16/9)")


def add_loading_arguments(parser: argparse.ArgumentParser, dit_file: bool = True) -> None:
    """The options that say where the checkpoints are and how parts load (`dit_file`: offer --dit-file)."""
    group = parser.add_argument_group("loading and memory")
    group.add_argument("--model-root", type=Path, default=None,
                       help="the ckpts/ folder (default $HUNYUANIMAGE_V2_1_MODEL_ROOT or ./ckpts)")
    group.add_argument("--download", action="store_true", help="fetch the missing checkpoint files first")
    group.add_argument("--fp8", action="store_true",
                       help="FP8 DiT weights (the official _fp8 files, or the bf16 file quantized while loading)")
    if dit_file:
        group.add_argument("--dit-file", type=Path, default=None,
                           help="another DiT file for the variant in place of the checkpoint folder's: a GGUF "
                                "(e.g. Q4_K), a ComfyUI single-file FP8 DiT or any diffusion_model.-prefixed file")
    group.add_argument("--device", default=None, help="default cuda when available, else cpu")
    group.add_argument("--memory-mode", choices=MEMORY_MODES, default=None,
                       help="auto (default): as `hyimage plan` places each part; none: every part stays on the GPU; "
                            "model: each part on the GPU while it runs; block: stream the DiT and text encoder "
                            "block by block")
    group.add_argument("--gpu-budget-gb", type=float, default=None,
                       help="GPU memory (GiB) the auto plan keeps within; in block mode, for streamed weights")
    group.add_argument("--host-budget-gb", type=host_budget_argument, default="auto",
                       help="host RAM (GiB) to keep within: parts are released between stages and read again "
                            "when next needed, as `hyimage plan --ram-gb` shows; default auto: what this machine "
                            "can give when the first part loads, less a margin; inf: no limit")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each DiT block (slow first image, faster steps after it)")
    group.add_argument("--cache", type=cache_spec_argument, default=None, metavar="KIND[:k=v,...]",
                       help="step caching for the DiT, e.g. fbcache:threshold=0.08 or taylorseer:interval=4,order=2 "
                            "(fewer DiT evaluations; off by default)")


def host_budget_argument(text: str) -> float | str:
    """A host budget on the command line: "auto", a positive number of GiB or inf (no limit)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return check_host_budget(float(text), "the host budget")
    except ValueError as error:
        message = error.args[0] if isinstance(error, RequestError) else f"{text!r} is not a number"
        raise argparse.ArgumentTypeError(f"{message}; pass auto, a number of GiB such as 24, or inf") from None



def add_lora_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA for the DiT (kohya, ComfyUI or diffusers format), scale 1 by default; "
                             f"repeatable{note}")


def lora_arguments(specs: list[str]) -> list[tuple[Path, float]]:
    """The `--lora PATH[:SCALE]` values, checked before anything loads: every file exists, every scale is a number."""
    loras = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        before, sep, after = spec.rpartition(":")
        if not path.is_file() and sep and Path(before).is_file():
            raise RequestError("--lora", f"--lora {spec}: the scale {after!r} after ':' is not a number; "
                                         "write PATH or PATH:SCALE, e.g. style.safetensors:0.8")
        if not path.is_file():
            raise RequestError("--lora", f"--lora {path} does not exist; pass the path of a LoRA .safetensors file")
        if not math.isfinite(scale):
            raise RequestError("--lora", f"--lora {spec}: the scale must be a finite number, e.g. {path}:0.8")
        loras.append((path, scale))
    return loras


def load_loras(pipe: Any, loras: list[tuple[Path, float]]) -> None:
    """Attach the checked `--lora` adapters to the pipeline's DiT."""
    for path, scale in loras:
        pipe.load_lora_weights(path, scale=scale)


def pipeline_from_args(args: argparse.Namespace, variant: str, reprompt: str | None, **options: Any) -> Any:
    """The HunyuanImagePipeline that `args`' loading options describe (its parts load on first use)."""
    options.setdefault("progress_bar", not getattr(args, "quiet", False))  # -q: no progress bars
    pipe = HunyuanImagePipeline.from_pretrained(
        model_name=variant,
        use_fp8=args.fp8,
        model_root=args.model_root,
        memory_mode=args.memory_mode,
        gpu_budget_gb=args.gpu_budget_gb,
        host_budget_gb=args.host_budget_gb,
        reprompt_model=reprompt,
        trust_remote_code=args.trust_remote_code,
        refiner=args.refiner,
        compile=args.compile,
        dit_file=args.dit_file,
        **options,
    )
    if args.cache is not None:
        pipe.enable_cache(args.cache[0], **args.cache[1])
    return pipe


def check_loading_arguments(args: argparse.Namespace) -> str:
    """Memory options that agree with each other, a DiT file that exists and a device that exists; returns the
    device."""
    dit_file = getattr(args, "dit_file", None)
    if dit_file is not None and not dit_file.is_file():
        raise RequestError("--dit-file", f"--dit-file {dit_file} is not a file; pass the path of a .gguf or "
                                         ".safetensors DiT (see hyimage plan --dit-file for its memory)")
    check_host_budget(args.host_budget_gb, "--host-budget-gb")
    if args.gpu_budget_gb is not None:
        check_real("gpu_budget_gb", args.gpu_budget_gb, 0.0, 1e6, low_open=True,
                   namer={"gpu_budget_gb": "--gpu-budget-gb"})
        if args.memory_mode in ("none", "model"):
            raise RequestError(
                "--gpu-budget-gb", f"--gpu-budget-gb applies to --memory-mode auto and block, but --memory-mode "
                f"{args.memory_mode} was given; drop one of them"
            )
    device = args.device or default_device()
    check_device(device, "device", GENERATE_NAMES)
    return device


def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
