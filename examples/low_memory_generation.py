"""A 2K image on a small GPU: FP8 DiT weights and a GPU budget that the memory plan fits the parts into.

Memory modes (one switch, `memory_mode=`):
- "auto":  the default. The memory plan places each part within `gpu_budget_gb` (else the free GPU memory):
           all resident when everything fits, else each stage model-offloaded or block-streamed with as
           many resident blocks as fit. This example sets only the budget, so it runs in "auto".
- "none":  every part stays on the GPU (fastest; the bf16 DiT alone is 35 GB).
- "model": each part is on the GPU only while it runs (the official offloading).
- "block": the DiT's double/single blocks and the text encoder's decoder layers stream from pinned host
           memory, the next block copied on a side CUDA stream while the current one computes; as many
           blocks as `gpu_budget_gb` allows stay resident.

`hyimage plan --gpu-gb 8 --fp8 --refiner --variant distilled --width 1792 --height 2304` prints the plan this
example gets (its 3:4 preset), loading nothing.

    python examples/low_memory_generation.py --gpu-budget-gb 8
"""

import argparse

import torch

from hyimage import HunyuanImagePipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-budget-gb", type=float, default=8.0, help="GPU memory for weights (activations extra)")
    parser.add_argument("--variant", default="hunyuanimage-v2.1-distilled")
    parser.add_argument("--no-refiner", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, help="with --height instead of the 3:4 2K preset; a multiple of 32")
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, help="default: the variant's (8 distilled, 50 base)")
    parser.add_argument("--output", default="low_memory.png")
    args = parser.parse_args()

    pipe = HunyuanImagePipeline.from_pretrained(
        model_name=args.variant,
        use_fp8=True,  # the official *_fp8.safetensors when present, else the bf16 file quantized while loading
        gpu_budget_gb=args.gpu_budget_gb,
        refiner=not args.no_refiner,
    ).to(args.device)
    size = dict(width=args.width, height=args.height) if args.width or args.height else dict(aspect_ratio="3:4")
    image = pipe(
        prompt='A vintage travel poster of a mountain railway, large title text "ALPINE EXPRESS".',
        **size,
        num_inference_steps=args.steps,
        seed=42,
        use_refiner=not args.no_refiner,
    )
    image.save(args.output)
    print(f"saved {args.output}")
    if pipe.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
