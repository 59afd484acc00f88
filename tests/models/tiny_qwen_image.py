"""A tiny random-weight Qwen-Image pipeline folder, built offline from the real classes.

Every component is the class the released checkpoint uses — Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`)
as the text encoder with a byte-level BPE `Qwen2Tokenizer`, `AutoencoderKLQwenImage`, the real
`QwenImageTransformer2DModel`, a FlowMatchEulerDiscrete scheduler with Qwen-Image's dynamic shift and terminal
stretch — only with tiny configs (diffusers' own test sizes). The tokenizer is built here: every byte is a token,
plus merges that make each word of the pipeline's chat-template prefix one token, so the prefix is exactly the
34 tokens `QwenImagePipeline` drops (`prompt_template_encode_start_idx`), as with the real tokenizer.

Sizes: 32×32 images, a VAE with 4× spatial downsampling and 4 latent channels, so the transformer sees 4×4
packed tokens of 16 channels (image_seq_len 16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from tests.models.tiny_pipelines import bytes_to_unicode

RESOLUTION = 32
TEXT_LEN = 16  # model.max_sequence_length in the tests
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEMPLATE_DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx


def qwen_tokenizer(template: str):
    """A Qwen2 byte-level BPE tokenizer whose merges spell each word of `template` (the pipeline's chat template)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(bytes_to_unicode())}
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    pieces = []
    text = template.replace("{}", "")
    for special in SPECIAL:
        text = text.replace(special, "\0")
    for chunk in text.split("\0"):
        pieces += [piece for piece, _ in splitter.pre_tokenize_str(chunk)]
    merges = []
    for piece in dict.fromkeys(pieces):
        word = piece[0]
        for ch in piece[1:]:
            if (word, ch) not in merges:
                merges.append((word, ch))
            word += ch
            vocab.setdefault(word, len(vocab))
    for special in SPECIAL:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(s, special=True) for s in SPECIAL])
    return tok


def make_tiny_qwen_image_pipeline(directory: Union[str, Path], *, seed: int = 0) -> Path:
    """Write a tiny Qwen-Image-architecture pipeline folder and return its path."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
        vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 0.8, 1.2, 2.0])
        # Qwen-Image's scheduler: dynamic shift with its constants and the terminal stretch to σ = 0.02
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
        # the pipeline holds its chat template; the tokenizer is built for it
        probe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  transformer=transformer)
        tok = qwen_tokenizer(probe.prompt_template_encode)
        config = Qwen2_5_VLConfig(
            text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "vocab_size": len(tok),
                         "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
                         "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
                         "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         "rope_theta": 1000000.0},
            vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                           "out_hidden_size": 16},
            hidden_size=16, vocab_size=len(tok))
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                 transformer=transformer)
    pipe.save_pretrained(directory)
    return directory
