"""Inference from a training checkpoint or a pipeline folder: MaskGIT sampling token-equal
to diffusers' AmusedPipeline, inpainting and variations, LoRA adapters on a base at a
scale (`sample`), and export to a folder `AmusedPipeline.from_pretrained` opens, or of a
LoRA run's adapters in diffusers' LoRA layout, or merged into the base (`export`)."""
