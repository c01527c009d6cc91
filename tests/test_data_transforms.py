"""normalize and Augment against independent per-sample references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teachx.data.transforms import Augment, denormalize, normalize


def test_normalize_matches_numpy():
    x = torch.randint(0, 256, (3, 2, 4, 5), dtype=torch.uint8)
    mean, std = (0.2, 0.7), (0.3, 0.1)
    out = normalize(x, mean, std)
    ref = (x.numpy().astype(np.float64) / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(denormalize(out, mean, std).numpy(), x.numpy() / 255, atol=1e-6)
    with pytest.raises(ValueError, match="3 per-channel values for 2 channels"):
        normalize(x, (0.1, 0.2, 0.3), std)


def reference(x: torch.Tensor, top, left, flip, p: int, mode: str) -> torch.Tensor:
    """Per-sample pad -> crop -> flip, written with slicing and torch.flip."""
    outs = []
    h, w = x.shape[2:]
    for i in range(x.shape[0]):
        sample = x[i : i + 1]
        if p:
            if mode == "constant":
                padded = torch.zeros(1, x.shape[1], h + 2 * p, w + 2 * p, dtype=x.dtype)
                padded[:, :, p : p + h, p : p + w] = sample
            else:
                padded = F.pad(sample, (p, p, p, p), mode="reflect")
        else:
            padded = sample
        crop = padded[:, :, int(top[i]) : int(top[i]) + h, int(left[i]) : int(left[i]) + w]
        outs.append(torch.flip(crop, dims=[3]) if bool(flip[i]) else crop)
    return torch.cat(outs)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
@pytest.mark.parametrize("hflip", [True, False])
def test_augment_matches_per_sample_reference_and_moves_maps(mode, hflip):
    torch.manual_seed(0)
    images = torch.randn(16, 3, 9, 7)
    maps = torch.randn(16, 2, 9, 7)
    aug = Augment(crop_padding=3, hflip=hflip, pad_mode=mode)
    g = torch.Generator().manual_seed(123)
    params = aug.sample(16, torch.Generator().manual_seed(123))
    out_images, out_maps = aug(images, g, maps)
    assert params.top.max() <= 6 and params.left.min() >= 0
    assert bool(params.flip.any()) == hflip  # 16 fair coins: all-False has probability 2**-16
    torch.testing.assert_close(
        out_images, reference(images, params.top, params.left, params.flip, 3, mode), rtol=0, atol=0
    )
    torch.testing.assert_close(out_maps, reference(maps, params.top, params.left, params.flip, 3, mode), rtol=0, atol=0)


def test_augment_same_transform_on_images_and_maps():
    # A map that is literally a channel of the image must stay equal to that channel after augmenting.
    images = torch.randn(32, 3, 8, 8)
    maps = images[:, 1:2].clone()
    out_images, out_maps = Augment(4)(images, torch.Generator().manual_seed(7), maps)
    torch.testing.assert_close(out_maps, out_images[:, 1:2], rtol=0, atol=0)


def test_augment_deterministic_and_varied():
    images = torch.randn(64, 1, 6, 6)
    aug = Augment(2)
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    c = aug(images, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # Identity settings leave images untouched.
    torch.testing.assert_close(Augment(0, hflip=False)(images, torch.Generator()), images, rtol=0, atol=0)


def test_augment_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="maps must be"):
        Augment(2)(torch.randn(2, 3, 8, 8), torch.Generator(), torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_expectation_spreads_a_pixel_over_every_draw(hflip):
    """Closed form: one bright pixel lands at (r + p - top, c + p - left) for every crop offset (mirrored
    for a flip), each draw as likely as any other."""
    p, h, w, r, c = 2, 9, 11, 4, 3
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[0, 0, r, c] = 1.0
    flips = [False, True] if hflip else [False]
    ref = np.zeros((h, w))
    for top in range(2 * p + 1):
        for left in range(2 * p + 1):
            for flip in flips:
                i, j = r + p - top, c + p - left
                ref[i, (w - 1 - j) if flip else j] += 1 / ((2 * p + 1) ** 2 * len(flips))
    np.testing.assert_allclose(Augment(p, hflip=hflip).expectation(x)[0, 0].numpy(), ref, atol=1e-12)


def test_augment_expectation_equals_the_mean_of_padded_crops():
    """Against a second implementation: numpy pad + crop + flip for every draw, averaged."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    p = 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)))
    crops = [padded[..., t : t + 6, lft : lft + 7] for t in range(2 * p + 1) for lft in range(2 * p + 1)]
    ref = np.mean([cr for cr in crops] + [cr[..., ::-1] for cr in crops], axis=0)
    np.testing.assert_allclose(Augment(p, hflip=True).expectation(x).numpy(), ref, atol=1e-12)
    assert Augment(0, hflip=False).is_identity and torch.equal(Augment(0, hflip=False).expectation(x), x)
