"""`hyimage tiny-tree DIR`: write a tiny random checkpoint tree to try the pipeline without the weights."""

import argparse
from pathlib import Path


def add_tiny_tree_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "tiny-tree", parents=parents,
        help="write a tiny random ckpts/ tree (about 150 MB) to try every command without the 40+ GB of weights",
    )
    parser.add_argument("directory", type=Path, help="a new or empty folder")
    parser.set_defaults(run=run_tiny_tree)


def run_tiny_tree(args: argparse.Namespace) -> int:
    from hyimage.testing.tiny_tree import write_tree_command  # deferred: imports transformers and the models

    return write_tree_command(args.directory)
