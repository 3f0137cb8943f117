import numpy as np
import pytest
import s3fs
import torch
from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from amused.plumbing.storage import folder_fingerprint
from amused.tokenizer.image import ImageTokenizer
from amused.tokenizer.text import TextEncoder


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)


def test_ids_equal_diffusers_encode_and_quantize(tiny_models, images):
    ours = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu").encode(images)
    vq = VQModel.from_pretrained(tiny_models / "vqgan").eval()
    # diffusers' own path (AmusedImg2ImgPipeline): pixels in [0, 1], encode, quantize.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        latents = vq.encode(x).latents
        ref = vq.quantize(latents)[2][2].reshape(len(images), latents.shape[2], latents.shape[3])
    assert ours.dtype == np.uint16 and ours.shape == (6, 8, 8)
    np.testing.assert_array_equal(ours, ref.numpy())
    assert len(np.unique(ours)) > 4  # a degenerate encoder would make the equality meaningless


def test_decode_equals_pipeline_decode_path(tiny_models):
    tok = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu")
    ids = np.random.default_rng(1).integers(0, tok.codebook_size, size=(2, 8, 8)).astype(np.uint16)
    out = tok.decode(ids)
    vq = tok.model
    with torch.no_grad():
        ref = vq.decode(torch.from_numpy(ids.astype(np.int64)), force_not_quantize=True,
                        shape=(2, 8, 8, vq.config.latent_channels)).sample.clip(0, 1)
    expected = (ref * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_fp16_is_refused_and_bf16_accepted(tiny_models, images):
    with pytest.raises(ValueError, match="float16"):
        ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu", dtype="fp16")
    ids = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu", dtype="bf16").encode(images)
    assert ids.shape == (6, 8, 8)


def test_non_finite_latents_are_reported(tiny_models, images):
    tok = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu")
    ids, finite = tok.encode_with_mask(images)
    assert finite.all()
    with torch.no_grad():
        tok.model.quant_conv.bias[0] = float("nan")
    ids, finite = tok.encode_with_mask(images)
    assert not finite.any()
    with pytest.raises(FloatingPointError):
        tok.encode(images)


def test_tokenizer_is_real_clip_bpe(tiny_models):
    enc = TextEncoder.from_pretrained(tiny_models, device="cpu")
    ids = enc.token_ids(["a photo of a cat"])[0].tolist()
    # OpenAI CLIP ids: <|startoftext|> a photo of a cat <|endoftext|>, padded with <|endoftext|> to 77.
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(ids) == 77 and set(ids[7:]) == {49407}
    long_ids = enc.token_ids(["word " * 200])[0]
    assert len(long_ids) == 77 and long_ids[-1] == 49407  # truncated, still ends with EOS


def _pipeline(tiny_models) -> AmusedPipeline:
    return AmusedPipeline(
        vqvae=VQModel.from_pretrained(tiny_models / "vqgan"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(tiny_models / "text_encoder"),
        transformer=UVit2DModel.from_pretrained(tiny_models / "transformer"),
        scheduler=AmusedScheduler(mask_token_id=64),
    )


def test_text_encoding_equals_amused_pipeline(tiny_models):
    pipe = _pipeline(tiny_models)
    seen = {}

    def capture(module, args, kwargs):
        seen["hidden"] = kwargs["encoder_hidden_states"]
        seen["pooled"] = kwargs["pooled_text_emb"]

    pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    prompt, negative = "a red circle on a blue background", "blurry"
    pipe(prompt, negative_prompt=negative, num_inference_steps=1, guidance_scale=5.0, height=64, width=64,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    encoder = TextEncoder.from_pretrained(tiny_models, device="cpu")
    # The pipeline encodes each prompt alone ([negative, prompt] after concatenation): same here, bit for bit.
    single = [encoder.encode([text]) for text in (negative, prompt)]
    torch.testing.assert_close(torch.cat([e.hidden_states for e in single]), seen["hidden"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([e.pooled for e in single]), seen["pooled"], rtol=0, atol=0)
    # Batched, as the pre-tokenizer runs it: equal up to float summation order.
    batched = encoder.encode([negative, prompt])
    assert batched.hidden_states.shape == (2, 77, 32) and batched.pooled.shape == (2, 32)
    torch.testing.assert_close(batched.hidden_states, seen["hidden"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.pooled, seen["pooled"], rtol=1e-5, atol=1e-5)


def test_model_folder_from_s3_loads_the_same_model(tiny_models, s3_bucket, images, tmp_path, monkeypatch):
    monkeypatch.setenv("AMUSED_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/models/vqgan"
    s3fs.S3FileSystem().put(str(tiny_models / "vqgan"), url.removeprefix("s3://"), recursive=True)
    remote = ImageTokenizer.from_pretrained(url, device="cpu").encode(images)
    local = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu").encode(images)
    np.testing.assert_array_equal(remote, local)
    cached = next((tmp_path / "cache" / "models").iterdir())
    assert folder_fingerprint(cached) == folder_fingerprint(tiny_models / "vqgan")


@pytest.mark.gpu
def test_bf16_gpu_tokens_mostly_agree_with_fp32(tiny_models, images):
    fp32 = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cuda", dtype="fp32").encode(images)
    bf16 = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cuda", dtype="bf16").encode(images)
    cpu = ImageTokenizer.from_pretrained(tiny_models / "vqgan", device="cpu").encode(images)
    assert (fp32 == cpu).mean() > 0.99
    assert (bf16 == fp32).mean() > 0.8
