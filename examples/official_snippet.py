"""The official HunyuanImage-2.1 README example, unchanged: it runs with hyimage as it runs with the official code.

Checkpoints are read from $HUNYUANIMAGE_V2_1_MODEL_ROOT (default ./ckpts); fetch them first with
`hyimage download --fp8`. Without a GPU, replace "cuda" by "cpu" (slow at 2K).
"""

import os

os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from hyimage.diffusion.pipelines.hunyuanimage_pipeline import HunyuanImagePipeline  # noqa: E402

# Supported model_name: hunyuanimage-v2.1, hunyuanimage-v2.1-distilled
model_name = "hunyuanimage-v2.1"
pipe = HunyuanImagePipeline.from_pretrained(model_name=model_name, use_fp8=True)
pipe = pipe.to("cuda")

prompt = (
    "A cute, cartoon-style anthropomorphic penguin plush toy with fluffy fur, standing in a painting studio, "
    'wearing a red knitted scarf and a red beret with the word "Tencent" on it, holding a paintbrush with a '
    "focused expression as it paints an oil painting of the Mona Lisa, rendered in a photorealistic photographic style."
)

# The official 2K sizes for each aspect ratio
aspect_ratios = {
    "16:9": (2560, 1536),
    "4:3": (2304, 1792),
    "1:1": (2048, 2048),
    "3:4": (1792, 2304),
    "9:16": (1536, 2560),
}
width, height = aspect_ratios["1:1"]

image = pipe(
    prompt=prompt,
    width=width,
    height=height,
    use_reprompt=False,  # True rewrites the prompt with PromptEnhancer first (more memory)
    use_refiner=True,
    num_inference_steps=8 if "distilled" in model_name else 50,
    guidance_scale=3.25 if "distilled" in model_name else 3.5,
    shift=4 if "distilled" in model_name else 5,
    seed=649151,
)
image.save("generated_image.png")
