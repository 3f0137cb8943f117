"""The VQ-GAN as a training task on the same loop: its config, task and export (`task`)
and the image-crop reader over webdataset shards (`data`). The model itself and its
objective live in `amused.tokenizer`."""
