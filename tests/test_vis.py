"""vis: pictures of merged tokens from the source map."""
import pytest
import torch

import tokenslim
from conftest import images, make_model
from tokenslim.vis import merge_picture, patch_tokens, token_counts


def test_merge_picture_fills_each_token_with_its_mean_colour_and_outlines_it():
    image = torch.zeros(3, 4, 4)
    image[0, :, :2] = 1.0  # left half red
    tokens = torch.tensor([[0, 1], [0, -1]])  # two patches share token 0, one patch dropped
    pic = merge_picture(image, tokens, (2, 2))
    # Token 0 holds the two left patches (both red): its fill is red, darkened only on its outline.
    assert torch.allclose(pic[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(pic[:, 3, 3], torch.tensor([0.5, 0.5, 0.5]))  # dropped patch: grey
    assert pic[0, 0, 1] < 0.5  # the border between token 0 and token 1 is drawn
    assert pic[0, 1, 0] == 1.0  # no border between the two patches of token 0


def test_patch_tokens_follow_the_trace_and_count_the_tokens():
    model = tokenslim.patch(make_model("vit"), r=8)
    trace = tokenslim.trace_merges(model, images(2))
    tokens = patch_tokens(trace.source, model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    assert tokens.shape == (2, 8, 8)
    assert token_counts(tokens) == [trace.tokens.shape[1] - 1] * 2
    with pytest.raises(ValueError, match="expected 1 prefix tokens"):
        patch_tokens(trace.source, 1, (4, 4))


def test_vis_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from conftest import SMALL
    from tokenslim.cli import main
    from tokenslim.loading import save_checkpoint

    ckpt = tmp_path / "m.pth"
    save_checkpoint(make_model("vit"), str(ckpt), "vit_tiny_patch16_224", SMALL,
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 30, 90)).save(tmp_path / "a" / f"{i}.png")
    out = tmp_path / "vis.png"
    main(["vis", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--settings", "r=6", "r=6,method=pitome",
          "--images", "2", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
