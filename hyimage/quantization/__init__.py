"""Weight quantization layers: FP8 (float8_e4m3fn, the official format) and GGUF (ggml blocks, dequantised per
forward). The bottom of the model stack: imports torch and nothing of hyimage."""
