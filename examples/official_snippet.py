"""The official HunyuanImage-2.1 README example: it runs with hyimage as it runs with the official code.

Checkpoints are read from $HUNYUANIMAGE_V2_1_MODEL_ROOT (default ./ckpts); fetch them first with
`hyimage download --fp8`. The official snippet hard-codes "cuda" and the 2K sizes; here they are options:

    python examples/official_snippet.py                       # cuda when available, else cpu; 2048x2048
    python examples/official_snippet.py --device cpu --width 256 --height 256 --steps 4
"""

import argparse
import os

os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

import torch  # noqa: E402

from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline  # noqa: E402

# The official 2K sizes for each aspect ratio
aspect_ratios = {
    "16:9": (2560, 1536),
    "4:3": (2304, 1792),
    "1:1": (2048, 2048),
    "3:4": (1792, 2304),
    "9:16": (1536, 2560),
}

parser = argparse.ArgumentParser()
parser.add_argument("--model-name", default="hunyuanimage-v2.1",
                    choices=["hunyuanimage-v2.1", "hunyuanimage-v2.1-distilled"])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--aspect-ratio", default="1:1", choices=sorted(aspect_ratios))
parser.add_argument("--width", type=int, help="default: the aspect ratio's 2K size")
parser.add_argument("--height", type=int, help="default: the aspect ratio's 2K size")
parser.add_argument("--steps", type=int, help="default: 8 distilled, 50 base (the official advice)")
parser.add_argument("--no-refiner", action="store_true")
parser.add_argument("--output", default="generated_image.png")
args = parser.parse_args()

# Supported model_name: hunyuanimage-v2.1, hunyuanimage-v2.1-distilled
model_name = args.model_name
pipe = HunyuanImagePipeline.from_pretrained(model_name=model_name, use_fp8=True)
pipe = pipe.to(args.device)

prompt = (
    "A cute, cartoon-style anthropomorphic penguin plush toy with fluffy fur, standing in a painting studio, "
    'wearing a red knitted scarf and a red beret with the word "Tencent" on it, holding a paintbrush with a '
    "focused expression as it paints an oil painting of the Mona Lisa, rendered in a photorealistic photographic style."
)
width, height = aspect_ratios[args.aspect_ratio]

image = pipe(
    prompt=prompt,
    width=args.width or width,
    height=args.height or height,
    use_reprompt=False,  # True rewrites the prompt with PromptEnhancer first (more memory)
    use_refiner=not args.no_refiner,
    num_inference_steps=args.steps or (8 if "distilled" in model_name else 50),
    guidance_scale=3.25 if "distilled" in model_name else 3.5,
    shift=4 if "distilled" in model_name else 5,
    seed=649151,
)
image.save(args.output)
print(f"saved {args.output}")
