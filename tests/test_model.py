import pytest
import torch

from ssm.model import ModelConfig, SSMUNet, count_parameters, forward_flops


def test_paper_width_parameters_and_flops():
    cfg = ModelConfig(width=64)
    params = count_parameters(SSMUNet(cfg))
    assert 32e6 < params < 34.5e6  # paper: about 33 M
    flops = forward_flops(cfg)
    assert 33e9 < flops < 37e9  # about 35 GFLOP per forward at 128 x 128


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
def test_shapes_and_output_range(channels, upsample):
    net = SSMUNet(ModelConfig(width=8, channels=channels, upsample=upsample)).eval()
    x = torch.rand(2, channels, 64, 64)
    m = (torch.rand(2, 1, 64, 64) > 0.5).float()
    recon, mask_pred = net(x * m, m)
    assert recon.shape == (2, channels, 64, 64)
    assert mask_pred.shape == (2, 1, 64, 64)
    assert recon.abs().max() <= 1 and mask_pred.abs().max() <= 1  # tanh head


def test_mask_conditions_the_output():
    torch.manual_seed(0)
    net = SSMUNet(ModelConfig(width=8)).eval()
    x = torch.rand(1, 3, 64, 64)
    a = net(x, torch.ones(1, 1, 64, 64))[0]
    b = net(x, torch.zeros(1, 1, 64, 64))[0]
    assert not torch.allclose(a, b)


def test_width_scales_parameters():
    assert count_parameters(SSMUNet(ModelConfig(width=16))) < count_parameters(SSMUNet(ModelConfig(width=32)))


@pytest.mark.parametrize("bad", [dict(width=0), dict(channels=2), dict(upsample="bilinear"), dict(img_size=100)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)
