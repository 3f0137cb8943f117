"""The U-ViT (aMUSEd's transformer): building it from a preset or a folder (`model`), the
masked-token objective and mask schedule (`objective`), its token-shard reader with exact
resume (`data`) and the training task the generic loop runs (`task`)."""
