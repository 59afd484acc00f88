"""Tiny random-weight FLUX and SD3 pipeline folders, built offline from the real classes.

Every component is the class the released checkpoints use (CLIP text model with a BPE tokenizer,
T5 encoder with a unigram tokenizer, AutoencoderKL, the real transformer, FlowMatchEulerDiscrete
scheduler), only with tiny configs; the tokenizers' vocabularies are built here, so nothing is
downloaded. `save_pretrained` writes a folder that `FluxPipeline.from_pretrained(dir)` /
`StableDiffusion3Pipeline.from_pretrained(dir)` — and so `load_adapter("flux" | "sd3", dir)` —
loads like a real one.

Sizes: 32×32 images, a VAE with 8× downsampling and 4 latent channels, so FLUX sees 2×2 packed
tokens of 16 channels (image_seq_len 4) and SD3 a 4×4×4 latent in 2×2 patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

RESOLUTION = 32
TEXT_LEN = 16  # CLIP context length (and T5 max_sequence_length in the tests)


def bytes_to_unicode():
    """GPT-2 / CLIP byte → printable-character table (every byte gets one vocab symbol)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    """A CLIP BPE tokenizer over single byte-symbols (plus their word-final forms) and a few merges."""
    from transformers import CLIPTokenizer

    symbols = bytes_to_unicode()
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges = [("r", "e</w>"), ("s", "q"), ("sq", "u"), ("a", "re</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = TEXT_LEN
    return tok


def t5_tokenizer():
    """A T5 unigram tokenizer over lower-case letters, digits and word-initial forms."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces += [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars] + [("▁", -4.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_config(vocab_size: int, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LEN,
                          projection_dim=projection, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1)


def _t5(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))


def _vae(latent_channels: int, flux: bool):
    from diffusers import AutoencoderKL

    # Four blocks = 8× downsampling, as in the released VAEs; FLUX's has no quant convs.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         sample_size=RESOLUTION, scaling_factor=0.3611 if flux else 1.5305,
                         shift_factor=0.1159 if flux else 0.0609, use_quant_conv=not flux,
                         use_post_quant_conv=not flux)


def make_tiny_flux_pipeline(directory: Union[str, Path], *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX.1-dev-architecture pipeline folder (guidance embedding on) and return its path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok = clip_tokenizer()
        tok2 = t5_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(len(tok), 32, 32))
        text_encoder_2 = _t5(len(tok2), 32)
        vae = _vae(4, flux=True)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                            text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


def make_tiny_sd3_pipeline(directory: Union[str, Path], *, seed: int = 0) -> Path:
    """Write a tiny SD3.5-architecture pipeline folder (two CLIP-with-projection + T5) and return its path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok = clip_tokenizer()
        tok2 = clip_tokenizer()
        tok3 = t5_tokenizer()
        text_encoder = CLIPTextModelWithProjection(_clip_config(len(tok), 16, 16))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok2), 16, 16))
        # T5 width = joint_attention_dim; the two CLIP hidden states (16 + 16) are zero-padded up to it.
        text_encoder_3 = _t5(len(tok3), 32)
        vae = _vae(4, flux=False)
        # SD3.5-style: RMS qk-norm and one dual-attention block.
        transformer = SD3Transformer2DModel(
            sample_size=RESOLUTION // 8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            pooled_projection_dim=32, pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                        text_encoder_2=text_encoder_2, tokenizer_2=tok2,
                                        text_encoder_3=text_encoder_3, tokenizer_3=tok3, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory
