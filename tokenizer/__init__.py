"""Models and tokenization: the VQ-GAN (`image`, its objective, presets), the CLIP text
tower (`text`), the model presets table and Inception for FID. Everything loads from a
local or fsspec folder through `from_pretrained`; nothing here fetches from a hub."""
