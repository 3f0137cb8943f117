"""VQ-GAN training parts: forward with separate terms, codebook health, discriminator, PSNR."""

import numpy as np
import pytest
import torch

from amused.tokenizer.image import ImageTokenizer, build_vqgan
from amused.tokenizer.vq_objective import (
    CodebookHealth,
    PatchDiscriminator,
    VQLossWeights,
    codebook_loss,
    commitment_loss,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    psnr,
    reinit_dead_codes,
    vq_forward,
    vqgan_losses,
)


@pytest.fixture()
def vq():
    torch.manual_seed(0)
    return build_vqgan("tiny")


def test_forward_matches_the_models_own_encode_and_decode(vq):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    fwd = vq_forward(vq, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    ids = ImageTokenizer(vq, device="cpu").encode(images)
    assert torch.equal(fwd.ids, torch.from_numpy(ids.astype(np.int64)))  # the same codes as pre-tokenization
    with torch.no_grad():
        decoded = vq.decode(fwd.ids, force_not_quantize=True, shape=(2, 8, 8, vq.config.latent_channels)).sample
    assert torch.allclose(fwd.reconstruction, decoded, atol=1e-4)  # z + (z_q - z) rounds: measured 2e-5


def test_straight_through_and_the_terms_reach_only_their_parameters(vq):
    fwd = vq_forward(vq, torch.rand(2, 3, 64, 64))
    codebook = vq.quantize.embedding.weight
    encoder = vq.encoder.conv_in.weight
    rec_grads = torch.autograd.grad(fwd.reconstruction.mean(), [encoder], retain_graph=True)
    assert rec_grads[0].abs().sum() > 0  # the decoder's gradient passes the quantiser
    cb = torch.autograd.grad(codebook_loss(fwd), [codebook, encoder], retain_graph=True, allow_unused=True)
    assert cb[0].abs().sum() > 0 and cb[1] is None
    cm = torch.autograd.grad(commitment_loss(fwd), [codebook, encoder], allow_unused=True)
    assert cm[0] is None and cm[1].abs().sum() > 0


def test_codebook_health_usage_perplexity_window_and_resume():
    health = CodebookHealth(size=8, window=2)
    health.update(torch.tensor([0, 0, 1, 1]))
    assert health.usage() == 2 / 8 and health.perplexity() == pytest.approx(2.0)
    health.update(torch.tensor([2, 3]))
    assert health.usage() == 4 / 8
    health.update(torch.arange(8))  # the first batch leaves the window
    assert health.counts().tolist() == [1, 1, 2, 2, 1, 1, 1, 1]
    assert health.dead().tolist() == []
    uniform = CodebookHealth(size=8, window=1)
    uniform.update(torch.arange(8).repeat(3))
    assert uniform.perplexity() == pytest.approx(8.0)
    collapsed = CodebookHealth(size=8, window=1)
    collapsed.update(torch.zeros(50, dtype=torch.long))
    assert collapsed.usage() == 1 / 8 and collapsed.perplexity() == pytest.approx(1.0)
    assert collapsed.dead().tolist() == [1, 2, 3, 4, 5, 6, 7]
    restored = CodebookHealth(size=8, window=2)
    restored.load_state_dict(health.state_dict())
    assert torch.equal(restored.counts(), health.counts())
    with pytest.raises(ValueError, match="does not match"):
        CodebookHealth(size=8, window=3).load_state_dict(health.state_dict())


def test_dead_codes_move_onto_recent_latents_and_get_used(vq):
    pixels = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        fwd = vq_forward(vq, pixels)
    health = CodebookHealth(vq.config.num_vq_embeddings, window=1)
    health.update(fwd.ids)
    dead = health.dead()
    assert len(dead) > 0
    latents = fwd.latents.permute(0, 2, 3, 1).reshape(-1, fwd.latents.shape[1])
    moved = reinit_dead_codes(vq.quantize.embedding, dead, latents, torch.Generator().manual_seed(0))
    assert moved == len(dead)
    with torch.no_grad():
        after = vq_forward(vq, pixels)
    revived = set(after.ids.unique().tolist()) & set(dead.tolist())
    assert revived  # a latent that now sits exactly on a moved code picks it


def test_every_rank_moves_its_dead_codes_onto_rank_0s_rows():
    """As VQ-GAN training calls it on each rank: rank 0 draws from its own latents, the
    others from none, and `share` (a broadcast from rank 0, here between two codebooks)
    leaves every codebook the same."""
    torch.manual_seed(0)
    codebooks = [torch.nn.Embedding(16, 4) for _ in range(2)]
    codebooks[1].load_state_dict(codebooks[0].state_dict())
    dead = torch.tensor([1, 5, 9])
    drawn: list[torch.Tensor] = []

    def share(rank: int):
        def broadcast(rows: torch.Tensor) -> None:
            if rank == 0:
                drawn.append(rows.clone())
            else:
                rows.copy_(drawn[0])
        return broadcast

    latents = torch.randn(10, 4)
    for rank, codebook in enumerate(codebooks):
        mine = latents if rank == 0 else None
        assert reinit_dead_codes(codebook, dead, mine, torch.Generator().manual_seed(7), share(rank)) == 3
    assert torch.equal(codebooks[0].weight, codebooks[1].weight)
    assert all(any(torch.equal(row, latent) for latent in latents) for row in codebooks[1].weight[dead])
    assert reinit_dead_codes(codebooks[0], torch.tensor([], dtype=torch.long), None, torch.Generator(), share(1)) == 0


def test_patch_discriminator_and_hinge_losses():
    disc = PatchDiscriminator(width=16, layers=3)
    logits = disc(torch.rand(2, 3, 64, 64))
    assert logits.shape[0] == 2 and logits.shape[1] == 1 and logits.shape[2] > 1  # one logit per patch
    assert discriminator_hinge_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both beyond the margin
    assert discriminator_hinge_loss(torch.zeros(4), torch.zeros(4)) == pytest.approx(1.0)
    assert generator_adversarial_loss(torch.full((4,), 3.0)) == pytest.approx(-3.0)


def test_psnr():
    a = torch.rand(2, 3, 8, 8)
    assert psnr(a, a).tolist() == pytest.approx([100.0, 100.0])
    assert psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)).item() == pytest.approx(20.0, abs=1e-4)


def test_one_backward_trains_each_player_only_on_its_own_term(vq):
    disc = PatchDiscriminator(width=8, layers=2)
    pixels = torch.rand(2, 3, 64, 64)
    weights = VQLossWeights(adversarial=0.5, adversarial_start=10)
    _, terms, _ = vqgan_losses(vq, disc, pixels, weights, step=9)
    assert set(terms) == {"l1", "codebook", "commitment"}  # the adversarial game has not started
    total, terms, _ = vqgan_losses(vq, disc, pixels, weights, step=10)
    assert set(terms) == {"l1", "codebook", "commitment", "adversarial", "discriminator"}
    vq_params, disc_params = list(vq.parameters()), list(disc.parameters())
    g_only = torch.autograd.grad(terms["adversarial"], vq_params + disc_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_only[len(vq_params):])  # the generator's term leaves D alone
    assert any(g is not None and g.abs().sum() > 0 for g in g_only[:len(vq_params)])
    d_only = torch.autograd.grad(terms["discriminator"], vq_params + disc_params, retain_graph=True,
                                 allow_unused=True)
    assert all(g is None for g in d_only[:len(vq_params)])  # the discriminator's term leaves G alone
    assert any(g is not None and g.abs().sum() > 0 for g in d_only[len(vq_params):])
    expected = terms["l1"] + terms["codebook"] + 0.25 * terms["commitment"] + 0.5 * terms["adversarial"] \
        + terms["discriminator"]
    assert torch.allclose(total, expected)
    with pytest.raises(ValueError, match="pixel reconstruction"):
        VQLossWeights(l1=0, l2=0)
