"""The `hyimage` console script: generate, refine, download, plan here; batch and serve in their own modules.

    hyimage generate "a red fox in the snow" --download --variant distilled --fp8
    hyimage refine photo.png --prompt "a red fox in the snow" --output refined.png
    hyimage download --variant distilled --fp8 --no-refiner
    hyimage serve --variant distilled --fp8 --port 7860

Every argument is checked before anything loads; a mistake the user can fix ends in one line on stderr and
exit code 1 (`-v`/`--debug` add the traceback). `-v` (debug), `-q` (warnings only) go anywhere on the line.
"""

import argparse
import errno
import json
import math
import os
import random
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from loguru import logger

from hyimage import __version__
from hyimage.diffusion.pipelines.finite import NonFiniteError
from hyimage.diffusion.request import RequestError, check_device, check_real, check_request
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
from hyimage.metadata import png_text
from hyimage.offload import MEMORY_MODES
from hyimage.offload.weights import GGUF_TYPES
from hyimage.parallel import add_parallel_argument
from hyimage.parallel.state import shared_random_seed

VARIANT_ALIASES = {
    "base": "hunyuanimage-v2.1",
    "distilled": "hunyuanimage-v2.1-distilled",
    "hunyuanimage-v2.1": "hunyuanimage-v2.1",
    "hunyuanimage-v2.1-distilled": "hunyuanimage-v2.1-distilled",
}
RANDOM_SEED = -1
LOG_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
GENERATE_NAMES = {
    "prompt": "PROMPT", "negative_prompt": "--negative-prompt", "width": "--width", "height": "--height",
    "aspect_ratio": "--aspect-ratio", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "shift": "--shift", "seed": "--seed", "num_images_per_prompt": "--num-images", "use_refiner": "--refiner",
    "use_reprompt": "--reprompt", "device": "--device", "image": "IMAGE",
}
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, DownloadError, NonFiniteError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False) or getattr(args, "debug", False)
    handler = configure_logging(verbose, getattr(args, "quiet", False))
    try:
        with warnings_to_log():
            return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - user errors become one line, others keep their traceback
        if not is_user_error(error):
            raise
        if verbose:
            traceback.print_exc()
        print(f"error: {describe(error)}", file=sys.stderr)
        return 1
    finally:
        logger.remove(handler)
        logger.disable("hyimage")


def is_user_error(error: BaseException) -> bool:
    """Errors a user can fix (arguments, files, disk, memory), as opposed to bugs."""
    import torch

    return isinstance(error, (*USER_ERRORS, torch.OutOfMemoryError))


def describe(error: BaseException) -> str:
    """One line saying what went wrong and what to do."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return ("out of GPU memory; try --memory-mode block with --gpu-budget-gb, --fp8, a smaller size or fewer "
                "--num-images")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"no space left on the device{where}; free some space or choose another --output / --model-root"
    return " ".join(str(error).split()) or type(error).__name__


def configure_logging(verbose: bool, quiet: bool) -> int:
    """hyimage's log on stderr: INFO with a short format, DEBUG with -v, warnings only with -q."""
    logger.remove()
    logger.enable("hyimage")
    level = "DEBUG" if verbose else "WARNING" if quiet else "INFO"
    return logger.add(lambda message: sys.stderr.write(message), level=level, format=LOG_FORMAT,
                      colorize=sys.stderr.isatty())


@contextmanager
def warnings_to_log() -> Iterator[None]:
    """Python warnings (an ignored argument, ...) as one log line each."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        previous = warnings.showwarning
        warnings.showwarning = lambda message, category, *_args, **_kwargs: logger.warning(str(message))
        try:
            yield
        finally:
            warnings.showwarning = previous


def seed_argument(text: str) -> int:
    """An int seed in [0, 2**64), or -1 for a random one."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass e.g. 42, or -1 for a random seed") from None
    if not RANDOM_SEED <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"{seed} is out of range: pass 0 to 2**64-1, or -1 for a random seed")
    return seed


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and the traceback of an error")
    parser = argparse.ArgumentParser(prog="hyimage", description="HunyuanImage-2.1 text-to-image.", parents=[common])
    parser.add_argument("--version", action="version", version=f"hyimage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="draw images from a prompt", parents=[common])
    generate.add_argument("prompt")
    generate.add_argument("--negative-prompt", default=None, help="used by the base model only (CFG)")
    generate.add_argument("--variant", default=None, choices=sorted(VARIANT_ALIASES),
                          help="base (50 steps, CFG) or distilled (8 steps); default base")
    size = generate.add_argument_group("size (default 2048x2048; HunyuanImage-2.1 is made for 2K)")
    size.add_argument("--width", type=int, help="a multiple of 32, at most 4096")
    size.add_argument("--height", type=int, help="a multiple of 32, at most 4096")
    size.add_argument("--aspect-ratio", help="an official 2K preset: 1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3")
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

    refine = commands.add_parser("refine", help="refine an existing image with the refiner model", parents=[common])
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

    download = commands.add_parser("download", help="fetch the checkpoints a configuration needs", parents=[common])
    download.add_argument("--variant", default=None, choices=sorted(VARIANT_ALIASES), help="default base")
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
    download.set_defaults(run=run_download)
    add_plan_parser(commands, parents=[common])

    from hyimage.cli.batch import add_batch_parser
    from hyimage.cli.serve import add_serve_parser
    from hyimage.cli.env import add_env_parser
    from hyimage.cli.tiny_tree import add_tiny_tree_parser

    add_batch_parser(commands, parents=[common])
    add_serve_parser(commands, parents=[common])
    add_tiny_tree_parser(commands, parents=[common])
    add_env_parser(commands, parents=[common])
    return parser


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
    group.add_argument("--host-budget-gb", type=float, default=None,
                       help="host RAM (GiB) to keep within: parts are released between stages and read again "
                            "when next needed, as `hyimage plan --ram-gb` shows")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each DiT block (slow first image, faster steps after it)")


def add_lora_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA for the DiT (kohya, ComfyUI or diffusers format), scale 1 by default; "
                             f"repeatable{note}")


def lora_arguments(specs: list[str]) -> list[tuple[Path, float]]:
    """The `--lora PATH[:SCALE]` values, checked before anything loads: every file exists, every scale is a number."""
    from hyimage.lora.mixin import parse_lora_spec

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
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline

    options.setdefault("progress_bar", not getattr(args, "quiet", False))  # -q: no progress bars
    return HunyuanImagePipeline.from_pretrained(
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


def check_loading_arguments(args: argparse.Namespace) -> str:
    """Memory options that agree with each other, a DiT file that exists and a device that exists; returns the
    device."""
    dit_file = getattr(args, "dit_file", None)
    if dit_file is not None and not dit_file.is_file():
        raise RequestError("--dit-file", f"--dit-file {dit_file} is not a file; pass the path of a .gguf or "
                                         ".safetensors DiT (see hyimage plan --dit-file for its memory)")
    if args.host_budget_gb is not None:
        check_real("host_budget_gb", args.host_budget_gb, 0.0, 1e6, low_open=True,
                   namer={"host_budget_gb": "--host-budget-gb"})
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


def check_output(path: Path, flag: str = "--output") -> None:
    """`path` can be written: not a folder, no file where a parent folder must be, a writable parent."""
    if path.is_dir():
        raise RequestError(flag, f"{flag} {path} is a folder; pass a file name ending in .png")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RequestError(flag, f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK):
                raise RequestError(flag, f"{flag} {path}: the folder {parent} is not writable; choose another path")
            return


def default_device() -> str:
    """CUDA when available, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_plan_parser(commands: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register `hyimage plan` on the CLI's subcommands."""
    parser = commands.add_parser("plan", help="the memory plan per stage for a GPU and host budget (loads nothing)",
                                 parents=list(parents))
    parser.add_argument("--gpu-gb", type=float, required=True, help="GPU memory to plan for (GiB)")
    parser.add_argument("--ram-gb", type=float, default=None, help="host RAM to plan for (GiB)")
    parser.add_argument("--variant", default="base", help="base (default, as `hyimage generate`) or distilled",
                        choices=["base", "distilled", "hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled"])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--refiner", action="store_true", help="include the refiner stages")
    parser.add_argument("--reprompt", choices=["7b", "32b"], default=None)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=2048)
    dit = parser.add_argument_group("the DiT's weights (default: the variant's bf16, or FP8 with --fp8)")
    dit.add_argument("--dit-file", type=Path, default=None,
                     help="the DiT file to load instead (as from_pretrained(dit_file=...)): a .gguf file is counted "
                          "from its header, a .safetensors file as FP8 when it stores float8 weights")
    dit.add_argument("--gguf", default=None, metavar="TYPE", choices=list(GGUF_TYPES),
                     help=f"estimate a GGUF DiT of this type without a file: {', '.join(GGUF_TYPES)}")
    dit.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA file attached to the DiT (its adapters stay on the GPU); repeatable")
    dit.add_argument("--dit-config", type=Path, default=None, metavar="JSON",
                     help="the DiT's constructor arguments when not the variant's (a JSON file, as the one "
                          "beside a checkpoint)")
    parser.add_argument("--json", action="store_true", help="one JSON object with the list `stages`")
    parser.set_defaults(run=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    from hyimage.offload.planner import PlanRequest, make_plan
    from hyimage.offload.weights import lora_layout

    variant = {"base": "hunyuanimage-v2.1", "distilled": "hunyuanimage-v2.1-distilled"}.get(args.variant, args.variant)
    if args.dit_file is not None and args.gguf is not None:
        raise RequestError("--gguf", "--gguf estimates a GGUF DiT without a file, --dit-file counts a file: pass one")
    dit_file = getattr(args, "dit_file", None)
    if dit_file is not None and not dit_file.is_file():
        raise RequestError("--dit-file", f"--dit-file {args.dit_file} does not exist; pass a .gguf or .safetensors DiT")
    loras = lora_arguments(args.lora)
    config = None
    if args.dit_config is not None:
        from hyimage.models.dit.configs import resolve_dit_config

        try:
            config = resolve_dit_config(json.loads(args.dit_config.read_text()), source=str(args.dit_config))
        except (OSError, json.JSONDecodeError) as error:
            raise RequestError("--dit-config", f"--dit-config {args.dit_config}: {error}; pass a JSON file of the "
                                               "DiT's constructor arguments") from None
    request = PlanRequest(variant=variant, fp8=args.fp8, refiner=args.refiner, reprompt=args.reprompt,
                          width=args.width, height=args.height, dit_config=config, gguf=args.gguf,
                          dit_file=None if args.dit_file is None else str(args.dit_file))
    if loras:
        request = replace(request, loras=tuple(lora_layout(path, request) for path, _ in loras))
    plan = make_plan(request, args.gpu_gb, args.ram_gb)
    print(json.dumps(plan.to_dict()) if args.json else plan)
    return 0


def run_download(args: argparse.Namespace) -> int:
    if args.refiner_only:
        clashes = [flag for flag, given in (("--no-refiner", not args.refiner), ("--variant", args.variant is not None),
                                            ("--reprompt", args.reprompt is not None)) if given]
        if clashes:
            raise RequestError("--refiner-only", f"--refiner-only fetches the refiner alone; it cannot be combined "
                               f"with {', '.join(clashes)}")
    config = DownloadConfig(
        variant=VARIANT_ALIASES[args.variant or "base"], fp8=args.fp8, refiner=args.refiner or args.refiner_only,
        reprompt=args.reprompt, base=not args.refiner_only, repo_id=args.repo_id,
    )
    quiet = getattr(args, "quiet", False)  # -q: warnings only, and no progress bars
    fetch(config, args.model_root, dry_run=args.dry_run, verify=args.verify, progress=not quiet)
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


def pick_seed(seed: int, shared: bool = False) -> int:
    """The seed to use: the given one, or a random one (reported) for -1; `shared`: rank 0's under torchrun."""
    if seed != RANDOM_SEED:
        return seed
    seed = shared_random_seed() if shared else random.randrange(2**31)
    logger.info(f"random seed {seed}")
    return seed


def run_generate(args: argparse.Namespace) -> int:
    from hyimage.diffusion.pipelines.hunyuanimage_pipeline import ASPECT_RATIOS

    variant = VARIANT_ALIASES[args.variant or "base"]
    loras = lora_arguments(args.lora)
    seed = pick_seed(args.seed, shared=args.parallel is not None)
    request = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        aspect_ratio=args.aspect_ratio, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        shift=args.shift, seed=seed, num_images_per_prompt=args.num_images, use_refiner=args.refiner,
        use_reprompt=args.reprompt is not None,
    )
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
        "refiner_steps": default_refiner_steps() if args.refiner else None,
        "reprompt": args.reprompt,
        "lora": args.lora,
    }
    if pipe.parallel is not None and pipe.parallel.rank != 0:
        return 0  # rank 0 writes the images
    for path, image, used_prompt, image_seed in zip(outputs, result.images, result.prompts, result.seeds):
        save_png(image, path, dict(settings, seed=image_seed, prompt_used=used_prompt))
        print(f"saved {path} (seed {image_seed})")
    return 0


def default_refiner_steps() -> int:
    from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline

    return HunyuanImageRefinerPipeline.default_num_inference_steps


def open_image(path: Path) -> Any:
    """The RGB image at `path`, read before any model loads; a clear error when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise RequestError("IMAGE", f"{path} not found (or not a file); pass the path of an image to refine")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        message = f"{path} is not an image that can be read (PNG, JPEG, WebP, ...): {error}"
        raise RequestError("IMAGE", message) from None


def run_refine(args: argparse.Namespace) -> int:
    from hyimage.diffusion.pipelines.hunyuanimage_refiner_pipeline import HunyuanImageRefinerPipeline

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
    pipe.to(device)
    result = pipe(image=image, **request, output_type="pt", return_dict=True)
    settings = {
        "prompt": args.prompt,
        "model": "hunyuanimage-refiner",
        "refined_from": str(args.image),
        "fp8": args.fp8,
        "width": width,
        "height": height,
        "steps": args.steps if args.steps is not None else pipe.default_num_inference_steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else pipe.default_guidance_scale,
        "shift": pipe.default_shift,
        "seed": seed,
    }
    save_png(result.images[0:1], output, settings)
    print(f"saved {output} (seed {seed})")
    return 0


def output_paths(stem: Path, count: int) -> list[Path]:
    """`stem` for one image; `name-0.png`, `name-1.png`, ... for several."""
    if stem.suffix.lower() != ".png":
        raise RequestError("--output", f"--output {stem} must end in .png (the settings are stored as PNG metadata)")
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
    """Save one image tensor (3, H, W) or (1, 3, H, W) in [0, 1] with `settings` as PNG text metadata
    (`parameters` in the A1111 style and `hyimage` JSON); a failed write leaves no partial file."""
    from PIL import Image, PngImagePlugin

    from hyimage.diffusion.pipelines.parts import to_uint8

    pixels = image if image.ndim == 4 else image.unsqueeze(0)
    info = PngImagePlugin.PngInfo()
    for key, text in png_text(settings).items():
        info.add_text(key, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        Image.fromarray(to_uint8(pixels)[0]).save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if not error.filename:  # a full disk or a file-size limit hit while writing names no file
            error.filename = str(path)
        raise


if __name__ == "__main__":
    sys.exit(main())
