"""Random-weight Wan models built locally, for tests and plumbing (no download): the `tiny-wan` builtin, and the
published layouts of presets/configs at reduced size.

- TINY: diffusers' own tiny Wan test configs (tests/pipelines/wan/test_wan.py: 2 transformer layers of 2 heads × 12,
  a Wan VAE of base 3 that still downsamples ×8 and ×4 in time), a 2-layer UMT5 text encoder of width 32 (the
  transformer's text_dim) and the scheduler the Wan 2.1 hub repos ship (UniPC, flow prediction, flow_shift 3.0).
- published(name): a real preset's configs (transformer, vae, text_encoder, scheduler, model_index) from
  presets/configs/<name>; reduced(spec, text_layers) keeps the transformer and VAE as published and cuts the UMT5-xxl
  encoder to a few layers over the local tokenizer's vocabulary (the full one is 5.7 B parameters).
- build_tokenizer(): the UMT5 tokenizer's kind (transformers' T5Tokenizer: a sentencepiece-style unigram model,
  `</s>` appended, no BOS, `<pad>` = 0) over a small vocabulary made here: the toy world's words whole, a few English
  word endings, and single characters, so any other word is spelled in several pieces (multi-piece phrases, as on
  the real tokenizer). The real UMT5 vocabulary cannot be had offline.

Every build is deterministic for a seed (weights drawn inside a forked global RNG, which is left as it was).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY = {
    "transformer": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "text_encoder": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                         relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0),
    "model_index": dict(expand_timesteps=False),
}
SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 / UMT5
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
_ENDINGS = ("ing", "ed", "er", "s", "ly", "tion", "est")


def configs_root() -> Path:
    from studio.presets import presets_root

    return presets_root() / "configs"


def published(name: str) -> dict:
    """A real preset's published configs: {transformer, vae, text_encoder, scheduler, model_index} (dicts)."""
    folder = configs_root() / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no published configs for preset '{name}' in {configs_root()}")
    files = {"transformer": "transformer/config.json", "vae": "vae/config.json",
             "text_encoder": "text_encoder/config.json", "scheduler": "scheduler/scheduler_config.json",
             "model_index": "model_index.json"}
    return {k: json.loads((folder / f).read_text()) for k, f in files.items()}


def reduced(spec: dict, text_layers: int = 1) -> dict:
    """The spec with its text encoder cut to `text_layers` layers (same width, so the transformer's text_dim fits);
    its vocabulary becomes the local tokenizer's when built."""
    te = {**spec["text_encoder"], "num_layers": text_layers, "num_decoder_layers": text_layers, "dropout_rate": 0.0}
    return {**spec, "text_encoder": te}


def tokenizer_vocab(words=None) -> list[tuple[str, float]]:
    """(piece, log-probability) of the local unigram vocabulary: specials, whole words, word endings, characters.

    Scores make a whole word (one piece) beat its spelling; an unknown word is spelled with an ending when one fits.
    """
    if words is None:
        from studio.toyworld import world

        words = world.WORDS
    pieces: dict[str, float] = {t: 0.0 for t in SPECIAL}
    pieces["▁"] = -6.0
    for w in sorted(set(words)):
        pieces.setdefault("▁" + w, -4.0)
    for e in _ENDINGS:
        pieces.setdefault(e, -7.0)
    for c in _CHARS:
        pieces.setdefault("▁" + c, -9.0)
        pieces.setdefault(c, -9.0)
    return list(pieces.items())


def build_tokenizer(words=None, max_length: int = 512):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tokenizer_vocab(words), extra_ids=0, model_max_length=max_length)


def build_components(spec: dict = TINY, seed: int = 0) -> dict:
    """Freshly initialised WanPipeline components (float32, eval mode) for a spec (TINY, or reduced(published))."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _init_components(spec)


def _config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _init_components(spec: dict) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    te_cfg = {k: v for k, v in _config(spec["text_encoder"]).items() if k not in ("architectures", "tokenizer_class")}
    text_encoder = UMT5EncoderModel(UMT5Config(**{**te_cfg, "vocab_size": len(tokenizer)})).eval()
    vae = AutoencoderKLWan.from_config(_config(spec["vae"])).eval()
    transformer = WanTransformer3DModel.from_config(_config(spec["transformer"])).eval()
    scheduler = UniPCMultistepScheduler.from_config(_config(spec["scheduler"]))
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler,
                expand_timesteps=bool(spec.get("model_index", {}).get("expand_timesteps", False)))


def build_pipeline(spec: dict = TINY, seed: int = 0):
    from diffusers import WanPipeline

    pipe = WanPipeline(**build_components(spec, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def on_meta(spec: dict) -> dict:
    """The transformer, VAE and full text encoder of a spec on the `meta` device (shapes, no memory)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    te_cfg = {k: v for k, v in _config(spec["text_encoder"]).items() if k not in ("architectures", "tokenizer_class")}
    with torch.device("meta"):
        return {"transformer": WanTransformer3DModel.from_config(_config(spec["transformer"])),
                "vae": AutoencoderKLWan.from_config(_config(spec["vae"])),
                "text_encoder": UMT5EncoderModel(UMT5Config(**te_cfg))}


def spec_tag(spec: dict) -> str:
    """What determines a built model (its spec, the tokenizer's vocabulary, the libraries' versions), hashed."""
    import hashlib

    import diffusers
    import transformers

    text = json.dumps([spec, tokenizer_vocab(), diffusers.__version__, transformers.__version__], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def save_random_model(folder, spec: dict = TINY, seed: int = 0, dtype=None) -> Path:
    """Build a random-weight Wan model and save it as a diffusers WanPipeline folder (atomically)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe = build_pipeline(spec, seed)
    if dtype is not None:
        pipe.transformer.to(dtype)
        pipe.text_encoder.to(dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(tmp)  # another process won the race; its folder is identical
    else:
        tmp.rename(folder)
    return folder
