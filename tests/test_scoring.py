import pytest
import torch

from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig, normal_cells


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SSMUNet(ModelConfig(width=8)).eval()


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


def test_normal_cells_follow_ratio():
    heat = torch.zeros(1, 16, 16)
    heat[0, 0, :8] = 1.0
    heat[0, 1, :2] = 1.0  # 10 of 64 pixels above tau: 84 % below -> normal
    heat[0, 8:10, 8:16] = 1.0
    heat[0, 10, 8:12] = 1.0  # 20 of 64 above: 69 % below -> suspicious
    cells = normal_cells(heat, tau=0.5, cell=8, ratio=0.8)
    assert cells[0, :8, :8].all() and cells[0, :8, 8:].all() and cells[0, 8:, :8].all()
    assert not cells[0, 8:, 8:].any()


def test_refinement_reveals_normal_cells(model):
    """Pass 2 feeds the model masks where every normal cell is visible; only suspicious cells are hidden."""
    x = _images(2)
    seen = []
    hook = model.register_forward_hook(lambda mod, inp, out: seen.append(inp[1].detach().clone()))
    try:
        scorer = Scorer(model, ScoringConfig(tau=0.0))  # nothing is below tau: every cell stays suspicious
        scorer.score(x)
        first, second = seen
        assert torch.equal(first, second)  # no cell revealed
        seen.clear()
        scorer.config.tau = float("inf")  # everything normal: all revealed, early exit skips pass 2
        out = scorer.score(x)
        assert len(seen) == 1 and out.passes == [2, 0]
        assert torch.count_nonzero(out.heatmaps) == 0 and torch.count_nonzero(out.recon_error) == 0
        seen.clear()
        first_map = Scorer(model, ScoringConfig(tau=0.0)).score(x, passes=1).first_pass
        tau = float(first_map.quantile(0.5))
        seen.clear()
        out = Scorer(model, ScoringConfig(tau=tau, ratio=0.5)).score(x)
        expect = normal_cells(first_map, tau, 4, 0.5)  # refinement cell: 8 px at 128 px is 4 px at 64 px
        assert 0 < expect.float().mean() < 1 and out.passes == [2, 2]
        masks2 = seen[1].view(2, 3, 3, 64, 64)  # (B, scales, n, H, W)
        revealed = masks2.amin(dim=(1, 2)).bool()  # visible in every mask of every scale
        assert torch.equal(revealed, expect)
    finally:
        hook.remove()


def test_batch_independence_and_determinism(model):
    x = _images(5)
    scorer = Scorer(model, ScoringConfig(tau=0.05))
    full = scorer.score(x)
    again = scorer.score(x)
    assert torch.equal(full.image_scores, again.image_scores)
    for i in (0, 3):
        alone = scorer.score(x[i : i + 1])
        assert torch.allclose(alone.image_scores, full.image_scores[i : i + 1], rtol=1e-4, atol=1e-5)
        assert torch.allclose(alone.heatmaps, full.heatmaps[i : i + 1], atol=1e-5)
    shuffled = scorer.score(x[[4, 2, 0, 1, 3]])
    assert torch.allclose(shuffled.image_scores, full.image_scores[[4, 2, 0, 1, 3]], rtol=1e-4, atol=1e-5)


def test_seed_changes_masks(model):
    x = _images(2)
    a = Scorer(model, ScoringConfig(tau=0.05, seed=0)).score(x).heatmaps
    b = Scorer(model, ScoringConfig(tau=0.05, seed=1)).score(x).heatmaps
    assert not torch.allclose(a, b)


def test_early_exit_is_exact(model):
    x = _images(6, seed=3)
    x[3:] = 0.5 + 0.01 * x[3:]  # three flat images: low anomaly maps
    first = Scorer(model, ScoringConfig(tau=0.0)).score(x, passes=1).first_pass
    tau = float(first[3:].max()) * 1.001  # the flat images get no suspicious cell at all
    assert float(first[:3].amax(dim=(1, 2)).min()) > tau
    fast = Scorer(model, ScoringConfig(tau=tau, early_exit=True)).score(x)
    plain = Scorer(model, ScoringConfig(tau=tau, early_exit=False)).score(x)
    assert fast.passes[1] == 3 and plain.passes[1] == 6
    assert torch.allclose(fast.image_scores, plain.image_scores, atol=1e-5)
    assert torch.allclose(fast.heatmaps, plain.heatmaps, atol=1e-5)


def test_refinement_needs_tau(model):
    with pytest.raises(ValueError, match="tau"):
        Scorer(model, ScoringConfig()).score(_images(1))
