"""PickScore, CLIP score and the aesthetic predictor from tiny folders built offline, loaded by path."""

import pytest
import torch

from tempflow_fast.rewards import RewardConfig, build_reward
from tempflow_fast.rewards.aesthetic import AestheticReward
from tempflow_fast.rewards.clip_score import pickscore
from tempflow_fast.rewards.preprocess import ImageTransform

from .tiny_models import IMAGE_SIZE, save_aesthetic_head, save_tiny_clip

PROMPTS = ["a red square", "two blue circles", "a green triangle above a red square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    return save_aesthetic_head(tmp_path_factory.mktemp("head") / "head.pth")


def _images(b=3, h=IMAGE_SIZE, w=IMAGE_SIZE, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_pickscore_matches_reference_formula_and_is_deterministic(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    reward = pickscore(str(clip_dir), device="cpu")
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.equal(scores, reward(images, PROMPTS))  # determinism (second call uses the text cache)

    # PickScore's reference code, on the processor's own PIL path: logit_scale.exp() * text @ image.T, diagonal
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pil = [(img.permute(1, 2, 0) * 255).round().byte().numpy() for img in images]
    with torch.no_grad():
        i = model.get_image_features(**proc(images=pil, return_tensors="pt")).pooler_output
        t = model.get_text_features(**proc(text=PROMPTS, padding=True, truncation=True, max_length=77,
                                           return_tensors="pt")).pooler_output
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        ref = model.logit_scale.exp() * (t @ i.T).diagonal()
    quantised = (images * 255).round() / 255  # the PIL path sees uint8 images
    torch.testing.assert_close(reward(quantised, PROMPTS), ref, atol=1e-4, rtol=1e-4)


def test_scores_depend_on_prompt_and_image(clip_dir):
    reward = pickscore(str(clip_dir), device="cpu")
    images = _images()
    same_image = images[:1].expand(3, -1, -1, -1)
    by_prompt = reward(same_image, PROMPTS)
    assert by_prompt.unique().numel() == 3
    by_image = reward(images, [PROMPTS[0]] * 3)
    assert by_image.unique().numel() == 3


def test_repeated_prompts_and_chunks_match_one_by_one(clip_dir):
    reward = pickscore(str(clip_dir), device="cpu", batch_size=2)
    images = _images(b=5, h=48, w=40, seed=1)  # non-square: resize + crop path
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    together = reward(images, prompts)
    single = torch.cat([pickscore(str(clip_dir), device="cpu")(images[i:i + 1], prompts[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)


def test_clip_score_scale_and_builder(clip_dir):
    images = _images()
    raw = build_reward(RewardConfig(name="clip", path=str(clip_dir), device="cpu"))
    scaled = build_reward(RewardConfig(name="clip", path=str(clip_dir), device="cpu", scale=1 / 30))
    assert raw.name == "clip_score"
    torch.testing.assert_close(scaled(images, PROMPTS), raw(images, PROMPTS) / 30)
    pick = build_reward(RewardConfig(name="pickscore", path=str(clip_dir), processor_path=str(clip_dir), device="cpu"))
    assert pick.name == "pickscore"
    torch.testing.assert_close(pick(images, PROMPTS), raw(images, PROMPTS))  # same model, same formula


def test_uint8_images_score_as_their_float_values(clip_dir):
    """Real-model rollouts hand rewards uint8 images on the host: the same pixels as floats give the same score."""
    from tempflow_fast.images import to_uint8

    reward = pickscore(str(clip_dir), device="cpu")
    u8 = to_uint8(_images())
    torch.testing.assert_close(reward(u8, PROMPTS), reward(u8.float() / 255, PROMPTS))


def test_bad_inputs_raise_value_error(clip_dir):
    reward = pickscore(str(clip_dir), device="cpu")
    with pytest.raises(ValueError, match="prompts has 2 entries but images has 3 rows"):
        reward(_images(), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        reward(torch.rand(3, 1, 8, 8), PROMPTS)
    with pytest.raises(ValueError, match="float tensor in \[0, 1\] or uint8"):
        reward(torch.zeros(3, 3, 8, 8, dtype=torch.int32), PROMPTS)
    with pytest.raises(ValueError, match="dtype must be one of"):
        pickscore(str(clip_dir), device="cpu", dtype="float64")


def test_tensor_preprocessing_follows_the_processor(clip_dir):
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(clip_dir).image_processor
    transform = ImageTransform.from_hf_processor(proc)
    assert transform.shortest_edge == IMAGE_SIZE and transform.crop_hw == (IMAGE_SIZE, IMAGE_SIZE)
    for h, w, tol in ((IMAGE_SIZE, IMAGE_SIZE, 1e-5), (IMAGE_SIZE, 48, 1e-5), (64, 80, 0.03), (40, 33, 0.03)):
        # smooth images: the resampling kernels (PIL bicubic a=-0.5 on uint8, torch a=-0.75 on floats)
        # differ by ~1e-2 there (measured 0.010 and 0.013); exact where no resize happens
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        img = torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)
        img = (img * 255).round() / 255
        ref = proc(images=[(img[0].permute(1, 2, 0) * 255).round().byte().numpy()], return_tensors="pt")["pixel_values"]
        ours = transform(img)
        assert ours.shape == ref.shape
        assert float((ours - ref).abs().max()) < tol, (h, w)


def test_aesthetic_predictor(clip_dir, head_file):
    from transformers import CLIPModel

    from tempflow_fast.rewards.aesthetic import AestheticHead

    reward = AestheticReward(str(clip_dir), str(head_file), device="cpu")
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.equal(scores, reward(images, ["anything"] * 3))  # the prompt plays no part
    assert scores.unique().numel() == 3
    # reference: CLIP image embedding, unit norm, through the head
    model = CLIPModel.from_pretrained(clip_dir)
    head = AestheticHead(torch.load(head_file, weights_only=True)).eval()
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=reward.transform(images)).pooler_output
        ref = head(emb / emb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    built = build_reward(RewardConfig(name="aesthetic", path=str(clip_dir), head_path=str(head_file), device="cpu"))
    torch.testing.assert_close(built(images, PROMPTS), scores)


def test_aesthetic_head_mismatch_is_a_clear_error(clip_dir, tmp_path):
    wrong = save_aesthetic_head(tmp_path / "wrong.pth", in_features=24)
    with pytest.raises(ValueError, match="expects 24-d embeddings"):
        AestheticReward(str(clip_dir), str(wrong), device="cpu")
    torch.save({"layers.0.weight": torch.zeros(1, 16)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="state dict must have keys"):
        AestheticReward(str(clip_dir), str(tmp_path / "partial.pth"), device="cpu")
    with pytest.raises(ValueError, match="no such file"):
        AestheticReward(str(clip_dir), str(tmp_path / "missing.pth"), device="cpu")


def test_bfloat16_weights_score_close_to_float32(clip_dir):
    images = _images()
    full = pickscore(str(clip_dir), device="cpu")(images, PROMPTS)
    half = pickscore(str(clip_dir), device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    low = half(images, PROMPTS)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.1 * float(full.abs().max()), rtol=0)


def test_pickscore_processor_defaults(clip_dir, tmp_path, monkeypatch):
    from tempflow_fast.rewards import clip_score as module

    seen = []
    monkeypatch.setattr(module, "ClipSimilarityReward", lambda path, processor_path, **kw: seen.append(processor_path))
    module.pickscore(str(clip_dir))  # the folder holds its processor
    module.pickscore(str(tmp_path))  # model only, as yuvalkirstain/PickScore_v1 ships
    module.pickscore("yuvalkirstain/PickScore_v1")
    module.pickscore(str(tmp_path), processor_path="/elsewhere")
    assert seen == [str(clip_dir), module.PICKSCORE_PROCESSOR, module.PICKSCORE_PROCESSOR, "/elsewhere"]
