"""The `hyimage` console script (`hyimage=hyimage.cli:main`, also `python -m hyimage`), one module per concern.

    console.py   main(): the parser with every subcommand, logging on stderr, user errors as one line
    options.py   options several subcommands share: variants, seeds, LoRAs, loading and memory, and their checks
    output.py    output paths, refusing to overwrite, PNG files with the settings as metadata
    generate.py  refine.py  download.py  plan.py  batch.py  serve.py: each subcommand's arguments and its runner

cli/ is the top layer: it may import anything in hyimage, and nothing in hyimage imports it. Within cli/, console
imports the subcommand modules, which import options, output and download (`fetch`), never console or each other
otherwise. FastAPI and uvicorn are imported only when `hyimage serve` runs (an optional extra).
"""

from hyimage.cli.console import main

__all__ = ["main"]
