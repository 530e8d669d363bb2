"""A 2K image on a small GPU: FP8 DiT weights plus block streaming within a weight budget.

Memory modes (one switch, `memory_mode=`):
- "none":  every part stays on the GPU (fastest; the bf16 DiT alone is 33 GB).
- "model": each part is on the GPU only while it runs (the official offloading; default).
- "block": the DiT's double/single blocks and the text encoder's decoder layers stream from pinned host
           memory, the next block copied on a side CUDA stream while the current one computes; as many
           blocks as `gpu_budget_gb` allows stay resident. A budget alone implies "block".

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
    args = parser.parse_args()

    pipe = HunyuanImagePipeline.from_pretrained(
        model_name=args.variant,
        use_fp8=True,  # the official *_fp8.safetensors when present, else the bf16 file quantized while loading
        gpu_budget_gb=args.gpu_budget_gb,
        refiner=not args.no_refiner,
    ).to("cuda")
    image = pipe(
        prompt='A vintage travel poster of a mountain railway, large title text "ALPINE EXPRESS".',
        aspect_ratio="3:4",
        seed=42,
        use_refiner=not args.no_refiner,
    )
    image.save("low_memory.png")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
