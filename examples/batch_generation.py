"""Several prompts, several images each, in one call; each image saved with the seed that reproduces it.

    python examples/batch_generation.py --variant hunyuanimage-v2.1-distilled --images-per-prompt 2
"""

import argparse
from pathlib import Path

import torch

from hyimage import HunyuanImagePipeline

PROMPTS = [
    'A hand-painted wooden sign above a bakery door that reads "Fresh Bread", morning light.',
    "A red fox curled up asleep in fresh snow under a pine tree, soft blue dusk.",
    "An isometric illustration of a tiny floating island with a lighthouse, pastel colours.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="hunyuanimage-v2.1-distilled")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, help="with --height instead of the 16:9 2K preset; a multiple of 32")
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, help="default: the variant's (8 distilled, 50 base)")
    parser.add_argument("--no-refiner", action="store_true")
    args = parser.parse_args()

    pipe = HunyuanImagePipeline.from_pretrained(model_name=args.variant, use_fp8=True).to(args.device)
    size = dict(width=args.width, height=args.height) if args.width or args.height else dict(aspect_ratio="16:9")
    # A list of prompts is one batch: classifier-free guidance, glyph handling and the refiner all run per image.
    result = pipe(
        prompt=PROMPTS,
        **size,
        num_inference_steps=args.steps,
        num_images_per_prompt=args.images_per_prompt,
        seed=args.seed,  # image i gets seed + i
        use_refiner=not args.no_refiner,
        return_dict=True,  # always an output object, even for one image
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = args.output_dir / f"batch-{i:02d}-seed{seed}.png"
        image.save(path)
        print(f"{path}: {result.prompts[i]!r}")


if __name__ == "__main__":
    main()
