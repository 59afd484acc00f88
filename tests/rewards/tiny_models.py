"""Tiny random-weight reward-model folders built offline from the real classes: a CLIPModel with a
CLIPProcessor (a locally built byte-level BPE tokenizer, 32-px image processor) — the PickScore /
CLIP-score architecture — and a LAION-layout aesthetic MLP head."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.models.tiny_pipelines import bytes_to_unicode

IMAGE_SIZE = 32
PROJECTION_DIM = 16


def clip_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    symbols = bytes_to_unicode()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges = [("r", "e</w>"), ("s", "q"), ("sq", "u")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIPModel + CLIPProcessor folder, loadable with from_pretrained(folder)."""
    from transformers import CLIPConfig, CLIPModel

    processor = clip_processor()
    v = len(processor.tokenizer)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=PROJECTION_DIM)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_aesthetic_head(path: Path, in_features: int = PROJECTION_DIM, seed: int = 0) -> Path:
    """A LAION-layout head (Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear), saved as
    a torch state dict."""
    g = torch.Generator().manual_seed(seed)
    sizes = [in_features, 12, 8, 6, 4, 1]
    state = {}
    for i, idx in enumerate((0, 2, 4, 6, 7)):
        state[f"layers.{idx}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=g) / sizes[i] ** 0.5
        state[f"layers.{idx}.bias"] = torch.randn(sizes[i + 1], generator=g) * 0.1
    torch.save(state, path)
    return Path(path)
