import torch

from ssm.masks import cell_sizes, complementary_masks, image_keys, multiscale_masks, random_keys


def test_complementary_and_balanced():
    keys = random_keys(4)
    for cell in (2, 4, 8):
        m = complementary_masks(keys, 128, cell, n=3)
        assert m.shape == (4, 3, 128, 128)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        hidden = 1 - m
        assert torch.equal(hidden.sum(1), torch.ones(4, 128, 128))  # each pixel hidden in exactly one mask
        cells_hidden = hidden[:, :, ::cell, ::cell].sum((2, 3))  # per mask, in cells
        n_cells = (128 // cell) ** 2
        assert (cells_hidden >= n_cells // 3).all() and (cells_hidden <= n_cells // 3 + 1).all()


def test_masks_are_cell_aligned():
    m = complementary_masks(torch.tensor([7]), 64, 8, n=3)[0, 0]
    blocks = m.view(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    assert ((blocks == blocks[:, :1]).all())  # constant within every 8 x 8 cell


def test_per_image_masks_differ_and_depend_only_on_key():
    keys = torch.tensor([1, 2, 3])
    m = complementary_masks(keys, 64, 4)
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[1], m[2])
    alone = complementary_masks(keys[1:2], 64, 4)
    assert torch.equal(alone[0], m[1])


def test_scales_and_sizes():
    assert cell_sizes(128) == [2, 4, 8]
    assert cell_sizes(256) == [4, 8, 16]
    assert cell_sizes(64) == [1, 2, 4]
    m = multiscale_masks(torch.tensor([5, 6]), 96, cell_sizes(96))
    assert m.shape == (2, 3, 3, 96, 96)
    assert torch.equal((1 - m).sum(2), torch.ones(2, 3, 96, 96))


def test_image_keys_are_content_keys():
    x = torch.rand(3, 3, 32, 32)
    k = image_keys(x, seed=0)
    assert len(set(k.tolist())) == 3
    assert torch.equal(image_keys(x[1:2], seed=0), k[1:2])
    assert not torch.equal(image_keys(x, seed=1), k)
