"""Denoising: the flow-matching schedule and Euler step (`sampling`), classifier-free guidance and APG
(`guidance`), trimming padded text (`padding`), the checks of a call's arguments (`request`), and the two
pipelines under `pipelines/`.

May import every layer below it (models, loading, checkpoints, quantization, text_encoders, reprompt, lora,
offload, parallel, and the bottom modules errors, variants, stages); nothing below imports it. Outside it, only
batch, serving and cli do.
"""
