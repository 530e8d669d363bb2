"""The text-to-image pipeline and the refiner pipeline, at the official import paths, and their wiring.

    hunyuanimage_pipeline.py          HunyuanImagePipeline (imports the refiner pipeline for its refiner stage)
    hunyuanimage_refiner_pipeline.py  HunyuanImageRefinerPipeline
    conditioning.py  denoise.py  sizes.py  outputs.py  parts.py  finite.py   what a call is made of
    loader.py  keywords.py  factories.py  part_sizes.py   from_pretrained: the ckpts/ tree to lazily built parts

The loader takes the pipeline classes as arguments and imports none of them, so imports run one way:
the pipeline modules -> loader -> factories -> the part classes below.
"""
