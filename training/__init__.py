"""Training on token shards with DeepSpeed: the generic loop (`engine`), what resume needs
(`state`), checkpoints (`checkpoint`), distributed set-up (`distributed`), EMA, Ray Train
launch; one room per model (`uvit`, `vqgan`: its task and reader), and the evaluation and
inference rooms."""
