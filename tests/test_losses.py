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
