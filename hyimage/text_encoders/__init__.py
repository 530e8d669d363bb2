"""Text encoders: the MLLM prompt encoder (Qwen2.5-VL) and the glyph encoder (ByT5).

May import loading, and the bottom modules (errors, stages); transformers is imported by the encoder modules,
which the pipeline factories import only when a part is built."""
