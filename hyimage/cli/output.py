"""Where the images go: output paths, refusing to overwrite, and PNG files with the settings as metadata."""

import os
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from hyimage.diffusion.pipelines.parts import to_uint8
from hyimage.errors import RequestError
from hyimage.metadata import png_text


def output_paths(stem: Path, count: int) -> list[Path]:
    """`stem` for one image; `name-0.png`, `name-1.png`, ... for several."""
    if stem.suffix.lower() != ".png":
        raise RequestError("--output", f"--output {stem} must end in .png (the settings are stored as PNG metadata)")
    if count == 1:
        return [stem]
    return [stem.with_name(f"{stem.stem}-{i}{stem.suffix}") for i in range(count)]


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


def refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exists; pass --overwrite to replace it or choose another --output"
        )


def save_png(image: Any, path: Path, settings: dict) -> None:
    """Save one image tensor (3, H, W) or (1, 3, H, W) in [0, 1] with `settings` as PNG text metadata
    (`parameters` in the A1111 style and `hyimage` JSON); a failed write leaves no partial file."""
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
