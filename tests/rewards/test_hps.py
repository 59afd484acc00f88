"""HPSv2 through open_clip with a tiny architecture config, checkpoint saved the way HPSv2 ships it
({"state_dict": ...}, DDP "module." prefixes), compared with HPSv2's own scoring recipe (open_clip's
PIL preprocessing, normalised features, diagonal of image @ text). Skipped where open_clip cannot be
imported (it needs a torchvision matching the installed torch; none exists for torch 2.13.0+cpu)."""

import json

import pytest
import torch

from tempflow_fast.rewards import RewardConfig, build_reward

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
PROMPTS = ["a red square", "two blue circles", "a green triangle above a red square"]


def test_hps_matches_the_reference_recipe(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-hps-test.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    model, _, preprocess_val = open_clip.create_model_and_transforms("tiny-hps-test", pretrained=None)
    ckpt = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)

    reward = build_reward(RewardConfig(name="hps", path=str(ckpt), arch="tiny-hps-test", device="cpu"))
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.equal(scores, reward(images, PROMPTS))
    assert reward(images[:1].expand(3, -1, -1, -1), PROMPTS).unique().numel() == 3

    tokenizer = open_clip.get_tokenizer("tiny-hps-test")
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess_val(p) for p in pil]), normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (img @ txt.T).diagonal(), atol=1e-5, rtol=1e-5)
