"""Loading: readers that stream tensors into meta-built models, key maps, and the loaders built on them."""
