"""The HunyuanImage-2.1 diffusion transformer: configs, layers, blocks, model."""
