"""Inference from a training checkpoint: MaskGIT sampling token-equal to diffusers'
AmusedPipeline, inpainting and variations (`sample`), and export to a folder
`AmusedPipeline.from_pretrained` opens (`export`)."""
