"""`hyimage download`: its arguments, its runner, and `fetch`, which the other subcommands' --download calls."""

import argparse
from pathlib import Path
from typing import Any

from hyimage.checkpoints.download import complete, describe_unknown, human_size, plan_download
from hyimage.checkpoints.layout import model_root
from hyimage.checkpoints.needs import OFFICIAL_REPO, DownloadConfig
from hyimage.errors import HubUnreachableError, RequestError
from hyimage.variants import VARIANT_ALIASES


def add_download_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `hyimage download` on the CLI's subcommands (`parents`: the options every subcommand takes)."""
    download = commands.add_parser("download", help="fetch the checkpoints a configuration needs", parents=parents)
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
    return download


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
        found = plan_download(config, root, verify=verify)
    except HubUnreachableError as error:
        if not dry_run:
            raise
        found = plan_download(config, root, online=False, verify=verify)
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
