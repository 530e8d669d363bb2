"""`hyimage plan`: its arguments and its runner (the memory plan itself is `hyimage.offload.planner`)."""

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hyimage.cli.numbers import gigabytes, side
from hyimage.cli.options import host_budget_argument, lora_arguments
from hyimage.errors import RequestError
from hyimage.models.dit.configs import resolve_dit_config
from hyimage.offload.dit_weights import GGUF_TYPES
from hyimage.offload.host_plan import HOST_BASE_GIB
from hyimage.offload.machine import auto_host_budget_gib
from hyimage.offload.planner import gpu_budget_gib, make_plan
from hyimage.offload.request import PlanRequest, lora_layout
from hyimage.offload.ways_out import refusal, ways_out
from hyimage.variants import VARIANT_ALIASES


def add_plan_parser(commands: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register `hyimage plan` on the CLI's subcommands."""
    parser = commands.add_parser("plan", help="the memory plan per stage for a GPU and host budget (loads nothing)",
                                 parents=list(parents))
    parser.add_argument("--gpu-gb", type=gigabytes(), default=None,
                        help="GPU memory to plan for (GiB; default: what the CUDA GPU has free now)")
    parser.add_argument("--ram-gb", type=host_budget_argument, default="auto",
                        help="host RAM to plan for (GiB; default auto: what this machine can give now, less a margin, "
                             "as generate's --host-budget-gb; inf: no limit)")
    parser.add_argument("--variant", default="base", help="base (default, as `hyimage generate`) or distilled",
                        choices=sorted(VARIANT_ALIASES))
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--refiner", action=argparse.BooleanOptionalAction, default=True,
                        help="include the refiner stages (default, as `hyimage generate`)")
    parser.add_argument("--reprompt", choices=["7b", "32b"], default=None)
    parser.add_argument("--width", type=side(32), default=2048, help="a multiple of 32, at most 4096")
    parser.add_argument("--height", type=side(32), default=2048, help="a multiple of 32, at most 4096")
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
    variant = VARIANT_ALIASES[args.variant]
    if args.dit_file is not None and args.gguf is not None:
        raise RequestError("--gguf", "--gguf estimates a GGUF DiT without a file, --dit-file counts a file: pass one")
    dit_file = getattr(args, "dit_file", None)
    if dit_file is not None and not dit_file.is_file():
        raise RequestError("--dit-file", f"--dit-file {args.dit_file} does not exist; pass a .gguf or .safetensors DiT")
    loras = lora_arguments(args.lora)
    config = None
    if args.dit_config is not None:
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
    host = planned_host_gib(args.ram_gb)
    plan = make_plan(request, gpu_gib(args.gpu_gb), None if math.isinf(host) else host)
    found = ways_out(plan)
    if args.json:
        print(json.dumps({**plan.to_dict(), "host_budget": "given" if args.ram_gb != "auto" else "machine",
                          "ways_out": [way.describe("plan") for way in found]}, allow_nan=False))  # strict JSON
        return 0 if plan.fits else 1
    print(plan)
    source = "" if args.ram_gb != "auto" else " (what this machine can give now, less a margin)"
    if plan.fits:
        peak = max(s.host_gib for s in plan.stages)
        budget = "unbounded" if plan.host_gib is None else f"{plan.host_gib:.1f} GiB{source}"
        print(f"fits: every stage within the GPU budget, host RAM peak {peak:.1f} GiB of {budget}")
        return 0
    print(refusal(plan, "plan"))
    return 1


def gpu_gib(given: float | None) -> float:
    """The GPU budget: the one given, else the free memory of the CUDA GPU now."""
    if given is not None:
        return given
    if not torch.cuda.is_available():
        raise RequestError("--gpu-gb", "no CUDA GPU here to read the free memory of; pass --gpu-gb, e.g. --gpu-gb 24")
    return gpu_budget_gib(torch.device("cuda"), None)


def planned_host_gib(given: float | str) -> float:
    """The host budget (GiB, inf: none): the one given, else what this machine can give (as `generate` plans it)."""
    return auto_host_budget_gib(HOST_BASE_GIB) if given == "auto" else given
