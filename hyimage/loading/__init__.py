"""Loading: checkpoint layout, readers that stream tensors into meta-built models, key maps, downloads."""
