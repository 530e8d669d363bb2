"""Loading: readers that stream tensors from files into models built on `meta` (safetensors, torch, GGUF),
the key maps between the official, fused, diffusers and ComfyUI layouts, and the DiT and VAE loaders.

The loaders take the model class as an argument (`load_dit(cls, ...)`, `load_vae(cls, ...)`) and import no
model module: the models' `from_single_file` / `from_pretrained` call down into them. May import quantization
and the bottom modules (errors, variants, stages); nothing else of hyimage.
"""
