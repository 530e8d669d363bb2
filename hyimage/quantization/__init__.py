"""Weight quantization: FP8 (float8_e4m3fn) weight-only storage in the official format."""
