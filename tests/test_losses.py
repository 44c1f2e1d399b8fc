import numpy as np
import pytest
import torch

from ssm.losses import msgms_loss, msgms_map, ssim_loss, ssm_loss


def test_zero_loss_for_identical_images():
    x = torch.rand(2, 3, 64, 64)
    masks = (torch.rand(2, 3, 64, 64) > 0.5).float()
    total, parts = ssm_loss(x, x.clone(), masks.clone(), masks)
    assert total.item() < 1e-5
    for v in parts.values():
        assert abs(v.item()) < 1e-5


def test_losses_grow_with_distortion():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    small = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    large = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert 0 < msgms_loss(x, small) < msgms_loss(x, large)
    assert 0 < ssim_loss(x, small) < ssim_loss(x, large)


def test_msgms_map_localises_a_defect():
    x = torch.rand(1, 3, 64, 64) * 0.1 + 0.45
    y = x.clone()
    y[..., 40:48, 8:16] = torch.rand(1, 3, 8, 8)
    amap = msgms_map(x, y)[0, 0]
    assert amap.shape == (64, 64)
    assert amap[40:48, 8:16].mean() > 5 * amap[:30, 30:].mean()


def test_weights_apply():
    x = torch.rand(1, 3, 32, 32)
    y = torch.rand(1, 3, 32, 32)
    m = torch.ones(1, 3, 32, 32)
    _, parts = ssm_loss(x, y, m, m)
    total, _ = ssm_loss(x, y, m, m, alpha=2.0, beta=0.0, gamma=3.0)
    expected = 2 * parts["msgms"] + 3 * parts["mse"] + parts["mask"]
    assert torch.allclose(total, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The maps against a plain numpy reading of their formulas (method page, section 4; Wang et al. 2004 for
# SSIM). Borders as ssm's kornia calls pad them: mirrored without repeating the edge pixel ("reflect").


def _windows(a: np.ndarray, k: int) -> np.ndarray:
    """(H, W) -> (H, W, k, k): the k x k neighbourhood of every pixel, the image mirrored at its borders."""
    return np.lib.stride_tricks.sliding_window_view(np.pad(a, k // 2, mode="reflect"), (k, k))


def _bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with pixel centres at half-integers (source coordinates clamped at the borders)."""
    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (r0, r1, fr), (c0, c1, fc) = axis(height, a.shape[0]), axis(width, a.shape[1])
    rows = a[r0] * (1 - fr)[:, None] + a[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def _numpy_gms_distance(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """x, y (C, H, W) -> 1 - GMS at the 4 scales: grey = channel mean, 2 x 2 mean pooling between scales,
    3 x 3 median, Prewitt gradient magnitude, GMS = (2 g1 g2 + c) / (g1^2 + g2^2 + c), c = 0.0026."""
    prewitt = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0

    def magnitude(grey):
        smooth = np.median(_windows(grey, 3), axis=(2, 3))
        gx = (_windows(smooth, 3) * prewitt).sum((2, 3))
        gy = (_windows(smooth, 3) * prewitt.T).sum((2, 3))
        return np.sqrt(gx**2 + gy**2)

    gx, gy, maps = x.mean(0), y.mean(0), []
    for scale in range(4):
        if scale:
            h, w = gx.shape[0] // 2, gx.shape[1] // 2
            gx, gy = (g[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean((1, 3)) for g in (gx, gy))
        m1, m2 = magnitude(gx), magnitude(gy)
        maps.append(1 - (2 * m1 * m2 + 0.0026) / (m1**2 + m2**2 + 0.0026))
    return maps


def _numpy_ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x, y (C, H, W) -> the SSIM map (C, H, W): an 11 x 11 Gaussian window of sigma 1.5 (sampled, summing to
    1), C1 = 0.01^2, C2 = 0.03^2 for a data range of 1."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for a, b in zip(x, y):
        mean = lambda v: (_windows(v, 11) * window).sum((2, 3))  # noqa: E731
        mu_a, mu_b = mean(a), mean(b)
        var_a, var_b, cov = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2, mean(a * b) - mu_a * mu_b
        out.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return np.stack(out)


@pytest.fixture(scope="module")
def image_pair():
    """A smooth image and a distorted copy, 46 x 58 (odd halvings: 23 x 29, 11 x 14, 5 x 7)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:46, 0:58] / 10.0
    x = np.stack([0.5 + 0.3 * np.sin(xx + c) * np.cos(yy * (c + 1)) for c in range(3)])
    y = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1)
    y[:, 20:30, 30:40] = 0.2
    return x, y


def test_msgms_map_and_loss_match_the_formula(image_pair):
    x, y = image_pair
    maps = _numpy_gms_distance(x, y)
    expected_map = sum(_bilinear(m, *x.shape[1:]) for m in maps) / 4
    tx, ty = (torch.from_numpy(a).float()[None] for a in (x, y))
    got = msgms_map(tx, ty)[0, 0].numpy()
    assert got.shape == (46, 58)
    np.testing.assert_allclose(got, expected_map, atol=2e-5)
    assert msgms_loss(tx, ty).item() == pytest.approx(np.mean([m.mean() for m in maps]), abs=1e-5)
    assert expected_map[20:30, 30:40].mean() > 2 * expected_map[:15, :15].mean()  # the pair is not trivial


def test_ssim_loss_matches_the_formula(image_pair):
    x, y = image_pair
    expected = _numpy_ssim(x, y)
    assert 0.2 < expected.mean() < 0.95  # neither identical nor unrelated
    tx, ty = (torch.from_numpy(a).float()[None] for a in (x, y))
    assert ssim_loss(tx, ty).item() == pytest.approx(1 - expected.mean(), abs=1e-5)
