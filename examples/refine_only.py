"""Refine an existing image with the HunyuanImage-2.1 refiner alone (no base model is loaded).

    python examples/refine_only.py input.png "what the image shows" --output refined.png
Same as `hyimage refine input.png --prompt "..."`.
"""

import argparse
from pathlib import Path

import torch
from PIL import Image

from hyimage import HunyuanImageRefinerPipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--output", type=Path, default=Path("refined.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, help="default: the image's width (a multiple of 16)")
    parser.add_argument("--height", type=int, help="default: the image's height (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=4, help="default 4 (the official)")
    args = parser.parse_args()

    refiner = HunyuanImageRefinerPipeline.from_pretrained(use_fp8=True).to(args.device)
    image = Image.open(args.image).convert("RGB")
    refined = refiner(
        image=image, prompt=args.prompt, width=args.width, height=args.height, num_inference_steps=args.steps,
        seed=args.seed,
    )
    refined.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
