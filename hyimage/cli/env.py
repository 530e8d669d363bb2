"""`hyimage env`: versions, torch build, GPUs, RAM, disk and checkpoint completeness, for a bug report."""

import argparse
import json
import sys
from pathlib import Path


def add_env_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("env", parents=parents,
                                 help="what a bug report needs: versions, GPU, RAM, disk, checkpoints (loads nothing)")
    parser.add_argument("--model-root", type=Path, default=None,
                        help="the ckpts/ folder to check (default $HUNYUANIMAGE_V2_1_MODEL_ROOT or ./ckpts)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(run=run_env)


def run_env(args: argparse.Namespace) -> int:
    from hyimage.env_report import env_report, format_report  # deferred: reads the CUDA devices

    report = env_report(args.model_root)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_report(report)) + "\n")
    return 0
