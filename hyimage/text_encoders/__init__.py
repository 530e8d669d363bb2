"""Text encoders: the MLLM prompt encoder (Qwen2.5-VL) and the glyph encoder (ByT5)."""
