"""The `hyimage` console script's entry: the parser with every subcommand, logging, and errors as one line.

    hyimage generate "a red fox in the snow" --download --variant distilled --fp8
    hyimage refine photo.png --prompt "a red fox in the snow" --output refined.png
    hyimage download --variant distilled --fp8 --no-refiner
    hyimage serve --variant distilled --fp8 --port 7860

Every argument is checked before anything loads; a mistake the user can fix ends in one line on stderr and
exit code 1 (`-v`/`--debug` add the traceback). `-v` (debug), `-q` (warnings only) go anywhere on the line.
"""

import argparse
import errno
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from loguru import logger

from hyimage import __version__
from hyimage.cli.batch import add_batch_parser
from hyimage.cli.download import add_download_parser
from hyimage.cli.env import add_env_parser
from hyimage.cli.generate import add_generate_parser
from hyimage.cli.plan import add_plan_parser
from hyimage.cli.refine import add_refine_parser
from hyimage.cli.serve import add_serve_parser
from hyimage.cli.tiny_tree import add_tiny_tree_parser
from hyimage.errors import DownloadError, NonFiniteError

LOG_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, DownloadError, NonFiniteError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False) or getattr(args, "debug", False)
    handler = configure_logging(verbose, getattr(args, "quiet", False))
    try:
        with warnings_to_log():
            return args.run(args)
    except KeyboardInterrupt as interrupt:  # a subcommand may say how to go on (batch: rerun to resume)
        print(str(interrupt) or "interrupted", file=sys.stderr)
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
    return isinstance(error, (*USER_ERRORS, torch.OutOfMemoryError))


def describe(error: BaseException) -> str:
    """One line saying what went wrong and what to do."""
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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the options every subcommand takes, then each subcommand from its own module."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and the traceback of an error")
    parser = argparse.ArgumentParser(prog="hyimage", description="HunyuanImage-2.1 text-to-image.", parents=[common])
    parser.add_argument("--version", action="version", version=f"hyimage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(commands, parents=[common])
    add_refine_parser(commands, parents=[common])
    add_download_parser(commands, parents=[common])
    add_plan_parser(commands, parents=[common])
    add_batch_parser(commands, parents=[common])
    add_serve_parser(commands, parents=[common])
    add_tiny_tree_parser(commands, parents=[common])
    add_env_parser(commands, parents=[common])
    return parser
