"""Box trajectories by cross-attention editing (MotionBooth §1.2, Direct-A-Video).

Each subject has a phrase in the prompt and keyframed boxes. In every spatial cross-attention layer, on the
conditional pass only, the pre-softmax logits S (B·F rows, N pixels, L text tokens) get an additive bias:

    S'[f, i, j] = S + α·(1 − |B_f|/N)   if i ∈ B_f and j ∈ P_k and step < amplify_steps      (amplify)
                    − ∞                   if j ∈ W and not (i ∈ B_f^k and j ∈ P_k)               (suppress)

P_k = the tokens of subject k's phrase, B_f^k its box in frame f at the layer's resolution, W = the suppressed
word tokens: every word of the prompt ("all_words", the method's choice) or only the subjects' phrases
("subject_words"). The bias goes into scaled-dot-product attention as a float mask: one fused call per layer,
the bias built once per layer size and kept while the boxes and the amplify phase stay the same.

Shapes: F frames, N = rows·cols tokens of a layer, L = 77 text tokens, K subjects.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from typing import NamedTuple

from studio.controls.base import (BoxCache, Context, Control, attend, edits_unsupported, plain_processor,
                                  spatial_cross_attention_names)

logger = logging.getLogger(__name__)

NEG = -1e4  # "−∞" that stays finite in fp16 (exp(-1e4) == 0): the start token is never suppressed, so no row is empty


# --- keyframes ---------------------------------------------------------------------------------------------


def interpolate(keyframes: dict[int, list[float]], frames: int, mode: str = "linear") -> np.ndarray:
    """(F, 4) boxes for every frame from keyframes {frame: [x0, y0, x1, y1]}.

    Between keyframes: linear, or 'smooth' (smoothstep easing: the box eases out of one keyframe into the next).
    Before the first and after the last keyframe the box holds still.
    """
    if not keyframes:
        raise ValueError("no keyframes")
    if mode not in ("linear", "smooth"):
        raise ValueError(f"interpolation must be linear or smooth, got {mode!r}")
    keys = sorted(int(k) for k in keyframes)
    vals = np.array([keyframes[k] for k in keys], np.float64)  # (K, 4)
    t = np.arange(frames, dtype=np.float64)
    out = np.empty((frames, 4))
    if len(keys) == 1:
        out[:] = vals[0]
        return out.astype(np.float32)
    seg = np.clip(np.searchsorted(keys, t, side="right") - 1, 0, len(keys) - 2)  # segment index per frame
    k0, k1 = np.asarray(keys)[seg], np.asarray(keys)[seg + 1]
    u = np.clip((t - k0) / (k1 - k0), 0.0, 1.0)
    if mode == "smooth":
        u = u * u * (3 - 2 * u)
    out = vals[seg] * (1 - u)[:, None] + vals[seg + 1] * u[:, None]
    return out.astype(np.float32)


def box_masks(boxes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(F, rows·cols) bool masks of normalised boxes (F, 4) at a layer's resolution.

    Edges are rounded to the layer's grid as MotionBooth does; a box always covers at least one token.
    """
    x0 = (boxes[:, 0] * cols).round().clamp(0, cols - 1)
    y0 = (boxes[:, 1] * rows).round().clamp(0, rows - 1)
    x1 = torch.maximum((boxes[:, 2] * cols).round(), x0 + 1).clamp(max=cols)
    y1 = torch.maximum((boxes[:, 3] * rows).round(), y0 + 1).clamp(max=rows)
    xs = torch.arange(cols, dtype=boxes.dtype, device=boxes.device)
    ys = torch.arange(rows, dtype=boxes.dtype, device=boxes.device)
    in_x = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])  # (F, cols)
    in_y = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])  # (F, rows)
    return (in_y[:, :, None] & in_x[:, None, :]).flatten(1)  # (F, rows·cols)


# --- tokens ------------------------------------------------------------------------------------------------


def phrase_occurrences(tokenizer, prompt: str, phrase: str) -> list[list[int]]:
    """Token positions of every non-overlapping occurrence of the phrase in the tokenized prompt (BOS at 0), left
    to right, every piece of multi-piece words.

    Only whole words count: with a BPE vocabulary a phrase's pieces can also end a longer word ("bara" is the last
    piece of "capybara": cap + y + bara), so a match must start and end at word boundaries of the prompt's text
    (read from the tokenizer's character offsets, where it gives them)."""
    enc = _encode(tokenizer, prompt)
    ids, spans = enc["input_ids"], enc.get("offset_mapping")
    piece = tokenizer(phrase, add_special_tokens=False).input_ids
    n = len(piece)
    if n == 0:
        raise ValueError(f"the phrase {phrase!r} has no tokens")
    found, i = [], 0
    while i <= len(ids) - n:
        if ids[i:i + n] == piece and (spans is None or _whole_words(prompt, spans[i][0], spans[i + n - 1][1])):
            found.append(list(range(i, i + n)))
            i += n
        else:
            i += 1
    return found


def _encode(tokenizer, prompt: str) -> dict:
    """input_ids (and offset_mapping, character spans per token, when the tokenizer gives them) of the prompt."""
    kw = dict(truncation=True, max_length=tokenizer.model_max_length)
    try:
        return dict(tokenizer(prompt, return_offsets_mapping=True, **kw))
    except (NotImplementedError, ValueError, TypeError):  # a tokenizer without offsets: ids only
        return {"input_ids": tokenizer(prompt, **kw).input_ids}


def _whole_words(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] begins and ends at word boundaries (no letter or digit just outside it)."""
    return (start == 0 or not text[start - 1].isalnum()) and (end >= len(text) or not text[end].isalnum())


def phrase_token_indices(tokenizer, prompt: str, phrase: str, occurrence: int = 0) -> list[int]:
    """Positions of the phrase's tokens in the tokenized prompt (BOS at 0): its `occurrence`-th non-overlapping
    occurrence (0 = the first).

    Raises ValueError if the phrase's tokens do not occur that often in the (possibly truncated) prompt.
    """
    found = phrase_occurrences(tokenizer, prompt, phrase)
    if occurrence < len(found):
        return found[occurrence]
    if not found:
        raise ValueError(f"the phrase {phrase!r} is not among the prompt's first {tokenizer.model_max_length} tokens")
    raise ValueError(f"the phrase {phrase!r} occurs {len(found)} time(s) among the prompt's first "
                     f"{tokenizer.model_max_length} tokens, not {occurrence + 1}")


class PhraseError(ValueError):
    """A subject's phrase that cannot be given tokens of its own; `index` is the subject's position."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def assign_phrases(tokenizer, prompt: str, phrases: dict[int, str], required=None) -> dict[int, list[int]]:
    """Token positions of each subject's phrase {subject index: phrase}, no token given to two subjects.

    Subjects sharing a phrase take its occurrences in order: the k-th subject with "red circle" gets the k-th
    "red circle" of the prompt. A phrase inside another ("circle" in "red circle") gets an occurrence outside the
    longer one: longer phrases choose first, each the first occurrence no earlier choice has touched.
    required: the subjects that must get tokens (default all); the others only take what is free, so that they
    keep the order of occurrences, and are left out of the result when nothing is.
    Raises PhraseError naming the first required subject left without tokens of its own.
    """
    required = set(phrases) if required is None else set(required)
    claimed: dict[int, int] = {}  # token position -> subject index
    tracks: dict[int, list[int]] = {}
    order = sorted(phrases, key=lambda k: (-len(tokenizer(phrases[k], add_special_tokens=False).input_ids), k))
    for k in order:
        try:
            found = phrase_occurrences(tokenizer, prompt, phrases[k])
        except ValueError as e:
            if k not in required:
                continue
            raise PhraseError(k, str(e)) from None
        free = [pos for pos in found if not any(j in claimed for j in pos)]
        if not free and k not in required:
            continue
        if not free:
            if not found:
                raise PhraseError(k, f"the phrase {phrases[k]!r} is not among the prompt's first "
                                     f"{tokenizer.model_max_length} tokens")
            others = sorted({claimed[j] for pos in found for j in pos if j in claimed})
            taken = ", ".join(f"subjects[{o}] ({phrases[o]!r})" for o in others)
            raise PhraseError(k, f"every occurrence of the phrase {phrases[k]!r} in the prompt ({len(found)}) is "
                                 f"already taken by {taken}: name this subject once more in the prompt, or give it "
                                 f"a phrase of its own")
        tracks[k] = free[0]
        claimed.update({j: k for j in free[0]})
    return {k: tracks[k] for k in sorted(tracks)}


def word_token_indices(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's word tokens: everything between the start and end tokens."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return list(range(1, len(ids) - 1))


# --- the control -------------------------------------------------------------------------------------------


class _BiasKey(NamedTuple):
    """What one (F, N, L) bias depends on besides the boxes."""

    n_tokens: int
    n_text: int
    amplify: bool
    dtype: torch.dtype
    device: str


class _BatchKey(NamedTuple):
    """What one (rows, 1, N, L) batch mask depends on besides the boxes."""

    rows: int
    bias: _BiasKey
    extra_frames: int


class BoxAttention(Control):
    """Cross-attention editing that places each subject's phrase inside its box track.

    tracks: subject index -> phrase token positions; the boxes come from ctx.boxes (the camera may move them).
    The biases and masks are built once per layer size and kept while the boxes and the amplify phase stay the same.
    """

    name = "boxes"

    def __init__(self, ctx: Context, tracks: dict[int, list[int]], words: list[int], strength: float = 10.0,
                 amplify_steps: int = 15, suppress: str = "all_words"):
        if suppress not in ("all_words", "subject_words"):
            raise ValueError(f"suppress must be all_words or subject_words, got {suppress!r}")
        self.ctx, self.tracks, self.strength, self.amplify_steps = ctx, tracks, strength, amplify_steps
        subject_tokens = sorted({j for pos in tracks.values() for j in pos})
        self.suppressed = sorted(set(words) | set(subject_tokens)) if suppress == "all_words" else subject_tokens
        self._cache = BoxCache(ctx)

    def processors(self, unet) -> dict:
        names = spatial_cross_attention_names(unet)
        if not names:
            raise ValueError("this model has no spatial cross-attention layers")
        proc = BoxAttnProcessor(self)
        return {n: proc for n in names}

    def _key(self, n_tokens: int, n_text: int, dtype, device) -> _BiasKey:
        amplify = self.ctx.step < self.amplify_steps and self.strength > 0
        return _BiasKey(n_tokens, n_text, amplify, dtype, str(device))

    def bias(self, n_tokens: int, n_text: int, dtype, device) -> torch.Tensor:
        """(F, N, L) additive logit bias for the conditional rows at the current step (F' latent frames on Wan)."""
        key = self._key(n_tokens, n_text, dtype, device)
        return self._cache.get(key, lambda: self._make_bias(key).to(device=device, dtype=dtype))

    def _make_bias(self, key: _BiasKey) -> torch.Tensor:
        ctx, n_tokens, n_text = self.ctx, key.n_tokens, key.n_text
        rows, cols = ctx.layer_size(n_tokens)
        frames = ctx.attention_frames  # F (one latent per frame), or F' latent frames (Wan)
        bias = torch.zeros(frames, n_tokens, n_text)
        allowed = torch.zeros(frames, n_tokens, n_text, dtype=torch.bool)  # phrase tokens inside their box
        for k, pos in self.tracks.items():
            inside = ctx.box_masks(k, rows, cols)  # (F, N): the box per (latent) frame
            idx = torch.tensor(pos)
            allowed[:, :, idx] |= inside[:, :, None]
            if key.amplify:
                area = inside.float().sum(1, keepdim=True) / n_tokens  # (F, 1) |B_f| / N
                boost = self.strength * (1 - area) * inside.float()  # (F, N)
                bias[:, :, idx] += boost[:, :, None]
        sup = torch.zeros(n_text, dtype=torch.bool)
        sup[torch.tensor(self.suppressed, dtype=torch.long)] = True
        return bias.masked_fill(sup[None, None, :] & ~allowed, NEG)

    def batch_mask(self, rows: int, n: int, n_text: int, dtype, device) -> torch.Tensor:
        """(rows, 1, N, L) attention mask of a whole UNet batch: the bias on conditional rows, zeros elsewhere.

        Rows are video-major, frame-minor; frames appended after the F generated ones (references in temporal
        mode) are not edited.
        """
        ctx = self.ctx
        key = _BatchKey(rows, self._key(n, n_text, dtype, device), ctx.extra_frames)

        def make():
            bias = self.bias(n, n_text, dtype, device)  # (F, N, L)
            if ctx.extra_frames:
                bias = torch.cat([bias, bias.new_zeros(ctx.extra_frames, n, n_text)])
            cond = ctx.cond_slice(rows)
            mask = torch.zeros(rows, 1, n, n_text, dtype=dtype, device=device)
            mask[cond] = bias.repeat((cond.stop - cond.start) // (ctx.frames + ctx.extra_frames), 1, 1)[:, None]
            return mask

        return self._cache.get(key, make)

    def close(self) -> None:
        self._cache.clear()


class BoxAttnProcessor:
    """Spatial cross-attention with the box bias on the conditional rows (plain attention elsewhere)."""

    def __init__(self, control: BoxAttention):
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if (encoder_hidden_states is None or isinstance(encoder_hidden_states, tuple) or self.control.ctx.side_pass
                or edits_unsupported(attn, hidden_states, attention_mask)):
            return plain_processor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        rows, n, _ = hidden_states.shape  # (B·[2]·F, N, C)
        n_text = encoder_hidden_states.shape[1]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        mask = self.control.batch_mask(rows, n, n_text, hidden_states.dtype, hidden_states.device)
        return attend(attn, hidden_states, encoder_hidden_states, mask)
