"""Evaluation: the measurements and the `Metric` table (`metrics`: FID, CLIP score), the
distributed per-checkpoint evaluation and watcher that loop over it (`evaluate`), where
results lie and reading them back without Ray or torch (`results`, for `amused status`),
and the VQ-GAN's reconstruction evaluation (`vqgan`). Models come from `amused.tokenizer`
(Inception, VQ-GAN, text encoder) and `amused.training.inference` (sampling)."""
