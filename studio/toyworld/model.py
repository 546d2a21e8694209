"""The embedded model's architecture: an AnimateDiff-layout pipeline small enough to train and run on a CPU.

The components are the ones of the real AnimateDiff preset (AutoencoderKL, UNetMotionModel built from a
UNet2DConditionModel and a MotionAdapter, CLIPTextModel, CLIPTokenizer, DDIMScheduler) at a tiny size, so a
folder saved from here loads with `AnimateDiffPipeline.from_pretrained(folder)` like any diffusers model.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from studio.toyworld import world

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


@dataclass(frozen=True)
class ToyArch:
    """Sizes of the embedded model (defaults from the CPU probe in the model's issue)."""

    size: int = world.SIZE  # pixels; the VAE halves it, so latents are size/2
    vae_channels: tuple[int, ...] = (32, 64)  # two levels: vae_scale_factor 2
    unet_channels: tuple[int, ...] = (32, 64, 64)
    heads: int = 2
    text_dim: int = 64  # CLIP hidden size = UNet cross-attention dim
    text_layers: int = 2
    max_tokens: int = 77  # as CLIP, so prompts and padding behave as on the real models
    max_frames: int = 32  # motion module positional length
    norm_groups: int = 16


# The `tiny` preset's random-weight model: the same layout at the smallest size that exercises every
# code path (spatial and motion attention, cross-attention, the VAE), for plumbing tests only.
TINY_ARCH = ToyArch(size=64, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32), heads=2, text_dim=16, text_layers=1,
                    norm_groups=4)


def tokenizer_vocab(words=world.WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of `words` is a single token.

    Single characters (with and without the end-of-word mark) make any other word encodable piece by piece.
    Each word gets the chain of merges that builds it left to right. A word whose chain another word's merge
    would cut (e.g. "triangle"'s t+r inside "striped") has its chain promoted ahead, until every word is whole.
    """
    vocab: dict[str, int] = {}
    for tok in [*_CHARS, *(c + "</w>" for c in _CHARS)]:
        vocab.setdefault(tok, len(vocab))
    chains: dict[str, list[tuple[str, str]]] = {}
    for word in sorted(set(words)):
        pieces, chain = [*word[:-1], word[-1] + "</w>"], []
        left = pieces[0]
        for right in pieces[1:]:
            chain.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
        vocab.setdefault(word + "</w>", len(vocab))  # one-letter words
        chains[word] = chain
    order = sorted(chains, key=lambda w: (-len(w), w))
    for _ in range(len(order)):
        merges = list(dict.fromkeys(m for w in order for m in chains[w]))
        broken = [w for w in order if len(_bpe(w, merges)) != 1]
        if not broken:
            break
        order = broken + [w for w in order if w not in broken]
    else:
        raise RuntimeError(f"no merge order keeps these words whole: {broken}")
    for tok in SPECIAL:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word as CLIP applies it: always merge the best-ranked adjacent pair."""
    rank = {m: i for i, m in enumerate(merges)}
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(arch: ToyArch = ToyArch()):
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=arch.max_tokens,
                         bos_token=SPECIAL[0], eos_token=SPECIAL[1], pad_token=SPECIAL[1], unk_token=SPECIAL[1])


def build_components(arch: ToyArch = ToyArch(), seed: int = 0) -> dict:
    """Freshly initialised components (deterministic by seed) for `AnimateDiffPipeline(**components)`."""
    import torch

    # diffusers/transformers initialise weights from the global RNG only: seed it inside a fork, so the caller's
    # global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _init_components(arch)


def _init_components(arch: ToyArch) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(arch)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=arch.vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(arch.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(arch.vae_channels),
        layers_per_block=1, norm_num_groups=arch.norm_groups, sample_size=arch.size,
    )
    n = len(arch.unet_channels)
    unet2d = UNet2DConditionModel(
        sample_size=arch.size // 2, in_channels=4, out_channels=4, block_out_channels=arch.unet_channels,
        layers_per_block=1, cross_attention_dim=arch.text_dim, attention_head_dim=arch.heads,
        norm_num_groups=arch.norm_groups,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )
    adapter = MotionAdapter(
        block_out_channels=arch.unet_channels, motion_layers_per_block=1, motion_num_attention_heads=arch.heads,
        motion_norm_num_groups=arch.norm_groups, motion_max_seq_length=arch.max_frames, use_motion_mid_block=True,
        motion_transformer_layers_per_mid_block=1,
    )
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=arch.text_dim, intermediate_size=arch.text_dim * 4, num_attention_heads=arch.heads,
        num_hidden_layers=arch.text_layers, vocab_size=len(tokenizer), max_position_embeddings=arch.max_tokens,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=arch.text_dim,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
        timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False,
    )
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=None,
                scheduler=scheduler, feature_extractor=None, image_encoder=None)


def save_random_model(folder, arch: ToyArch = TINY_ARCH, seed: int = 0):
    """Build a random-weight model and save it as a diffusers AnimateDiff folder (atomically)."""
    from diffusers import AnimateDiffPipeline

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    AnimateDiffPipeline(**build_components(arch, seed)).save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(tmp)  # another process won the race; its folder is identical
    else:
        tmp.rename(folder)
    return folder
