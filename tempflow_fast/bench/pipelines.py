"""Diffusers FLUX pipelines built from configs in memory, for the bench: the real classes (CLIP and T5 text
encoders with tokenizers whose vocabularies are built here, AutoencoderKL, FluxTransformer2DModel,
FlowMatchEulerDiscreteScheduler with FLUX.1-dev's config), random weights, nothing downloaded.

- `wide` (the default of the `official` subject): 7.2 M transformer parameters (2 double + 2 single blocks,
  4 heads × 64), 64 px images = 16 packed image tokens, 16 T5 tokens. Wide enough that a call of 6 rows costs
  close to 6 rows of compute on a CPU core (batch 6: 3.2 ms per row, batch 96: 2.7 ms, one row alone: 6.8 ms,
  OMP_NUM_THREADS=1), so the bench measures compute as FLUX on a GPU does, not Python call overhead.
- `narrow` (--quick): 1 + 1 blocks, 2 heads × 16, 32 px; a smoke run in seconds.

`flux_adapter(width)` wraps the pipeline in the FluxAdapter the trainer uses.
"""

from __future__ import annotations

import torch

WIDTHS = {
    # transformer config, resolution (px), T5 tokens
    "wide": (dict(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=64,
                  axes_dims_rope=(16, 24, 24)), 64, 16),
    "narrow": (dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                    axes_dims_rope=(4, 6, 6)), 32, 16),
}
TEXT_DIM = 64  # CLIP / T5 width = the transformer's joint_attention_dim and pooled_projection_dim
CLIP_LEN = 16


def _byte_symbols():
    """GPT-2 / CLIP byte → printable-character table (every byte gets one vocabulary symbol)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {}
    for s in _byte_symbols():
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = CLIP_LEN
    return tok


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars] + [("▁", -4.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def flux_pipeline(width: str = "wide", seed: int = 0):
    """A FluxPipeline of the given width (see module doc) with random weights from `seed`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if width not in WIDTHS:
        raise ValueError(f"width must be one of {', '.join(WIDTHS)}, got {width!r}")
    transformer_config, resolution, _ = WIDTHS[width]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
        n = len(tok)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=n, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=CLIP_LEN, projection_dim=TEXT_DIM, bos_token_id=n - 2,
            eos_token_id=n - 1, pad_token_id=n - 1))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=TEXT_DIM, d_kv=16, d_ff=2 * TEXT_DIM,
                                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                                 decoder_start_token_id=0))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 16),
                            layers_per_block=1, norm_num_groups=4, sample_size=resolution, scaling_factor=0.3611,
                            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64,
                                             joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                             guidance_embeds=True, **transformer_config)
        # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)


def flux_adapter(width: str = "wide", seed: int = 0, device="cpu"):
    """`FluxAdapter` over `flux_pipeline(width, seed)`, fp32, on `device`."""
    from tempflow_fast.models.flux import FluxAdapter

    pipe = flux_pipeline(width, seed)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.to(device).requires_grad_(False)
    pipe.transformer.to(device)
    _, resolution, text_len = WIDTHS[width]
    return FluxAdapter(pipe, resolution=resolution, max_sequence_length=text_len)


def transformer_parameters(model) -> int:
    return sum(p.numel() for p in model.module.parameters())
