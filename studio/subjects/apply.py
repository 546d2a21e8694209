"""Trained subjects in a shot: their words go into the prompt, their weights into the pipeline.

Weights load once per cached pipeline (LoRA as a named peft adapter, tokens as new embedding rows) and are then
switched per render by adapter weights, never reloaded: `load` records what a pipeline holds, keyed by the
subject's name and the stamp of its files, and evicts the least recently used adapter beyond MAX_ADAPTERS.

Several LoRA subjects with boxes would interfere if all were active everywhere; `RegionalLora` (a control) then
keeps peft's own LoRA path off and adds each subject's low-rank update itself, masked to that subject's box, in
every spatial projection whose input is image tokens. The text-side projections (cross-attention keys/values)
see no pixels, so there every active subject's update is added unmasked: each acts on its own trigger words.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from studio import shot as shotlib
from studio.controls.base import Context, Control

logger = logging.getLogger(__name__)

MAX_ADAPTERS = 8  # LoRA adapters kept loaded per pipeline (least recently used evicted)


@dataclass
class SubjectPlan:
    """What a shot's trained subjects do to one render."""

    shot: shotlib.Shot  # the shot with each subject's words inserted in the prompt and in its phrase
    adapters: list[tuple[str, int]] = field(default_factory=list)  # (adapter name, subject index) for LoRAs
    names: list[str] = field(default_factory=list)


def adapter_name(subject) -> str:
    return f"subject_{subject.name}"


def _stamp(subject) -> str:
    files = [p for p in (subject.lora_path, subject.embeds_path) if p is not None]
    return f"{subject.created}|" + "|".join(f"{p.stat().st_mtime_ns}" for p in files)


def insert_words(prompt: str, phrase: str, words: str) -> str:
    """Put `words` before the first whole-word occurrence of `phrase` in `prompt` (case-insensitive)."""
    m = shotlib.find_phrase(phrase, prompt)
    if m is None:  # validated before; a clear error all the same
        raise ValueError(f"phrase {phrase!r} not in prompt {prompt!r}")
    return f"{prompt[:m.start()]}{words} {prompt[m.start():]}"


def plan(shot: shotlib.Shot, preset, library=None) -> tuple[SubjectPlan, list]:
    """Check the shot's `subjects[i].subject` names against the library and the model (ShotError naming the field),
    and rewrite prompt and phrases. Returns the plan and the library's Subject records (same order as adapters)."""
    wanted = [(k, s) for k, s in enumerate(shot.subjects) if s.subject]
    if not wanted:
        return SubjectPlan(shot), []
    from studio.subjects.library import SubjectError, SubjectLibrary

    library = library or SubjectLibrary()
    prompt, subjects, records, names = shot.prompt, list(shot.subjects), [], []
    for k, s in wanted:
        where = f"subjects[{k}].subject"
        try:
            rec = library.get(s.subject, field=where)
        except (SubjectError, ValueError) as e:
            raise shotlib.ShotError(where, s.subject, _reason(e)) from None
        if rec.base_model != preset.name:
            raise shotlib.ShotError(where, s.subject, f"trained for base model '{rec.base_model}', not "
                                    f"'{preset.name}'; train it again for this model or change `model`")
        words = rec.trigger.strip()
        if s.subject in names:
            raise shotlib.ShotError(where, s.subject, "the same subject twice in one shot")
        prompt = insert_words(prompt, s.phrase, words)
        subjects[k] = dataclasses.replace(s, phrase=f"{words} {s.phrase}")
        records.append((k, rec))
        names.append(s.subject)
    new = dataclasses.replace(shot, prompt=prompt, subjects=subjects)
    adapters = [(adapter_name(rec), k) for k, rec in records if rec.lora_path is not None]
    return SubjectPlan(new, adapters, names), records


def _reason(e: Exception) -> str:
    msg = str(e)
    return msg.split(": ", 1)[1] if ": " in msg else msg


def load(pipe, records, library=None) -> None:
    """Make the subjects' weights present in `pipe` (once; a changed subject is reloaded)."""
    from studio.subjects.library import SubjectLibrary

    library = library or SubjectLibrary()
    held: dict = pipe.__dict__.setdefault("_studio_subjects", {})  # adapter name -> stamp, in use order
    for k, rec in records:
        name, stamp = adapter_name(rec), _stamp(rec)
        if held.get(name) == stamp:
            held[name] = held.pop(name)  # most recently used last
            continue
        where = f"subjects[{k}].subject"
        try:
            if rec.embeds_path is not None:
                _load_tokens(pipe, library.load_embeds(rec.name))
            if rec.lora_path is not None:
                if name in _adapters(pipe):
                    pipe.delete_adapters(name)
                pipe.load_lora_weights(library.load_lora(rec.name), adapter_name=name)
        except Exception as e:  # noqa: BLE001 - a corrupt or unsafe file becomes the shot's field error
            raise shotlib.ShotError(where, rec.name, f"cannot load its weights ({_reason(e)})") from None
        held.pop(name, None)
        held[name] = stamp
        logger.info("loaded subject %s into the pipeline", rec.name)
    while len([n for n in held if n in _adapters(pipe)]) > MAX_ADAPTERS:
        old = next(n for n in held if n in _adapters(pipe))
        pipe.delete_adapters(old)
        held.pop(old)
        logger.info("evicted subject adapter %s", old)


def forget(pipe, name: str) -> None:
    """Drop a subject's adapter from a pipeline (it was retrained or removed)."""
    held: dict = pipe.__dict__.get("_studio_subjects", {})
    key = f"subject_{name}"
    if key in _adapters(pipe):
        pipe.delete_adapters(key)
    held.pop(key, None)


def _adapters(pipe) -> set[str]:
    cfg = getattr(pipe.unet, "peft_config", None)
    return set(cfg or {})


def _load_tokens(pipe, embeds: dict) -> None:
    """New rows in the text encoder's embedding table for the subject's tokens (rows overwritten on reload)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    missing = [t for t in embeds if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_tokens(missing)
        te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    for t, v in embeds.items():
        if v.ndim != 1 or v.shape[0] != emb.shape[1]:
            raise ValueError(f"token {t} has shape {tuple(v.shape)}, the text encoder needs ({emb.shape[1]},)")
        with torch.no_grad():
            emb[tok.convert_tokens_to_ids(t)] = v.to(emb)


@contextmanager
def activated(pipe, adapters: list[tuple[str, int]], regional: bool):
    """LoRA adapters on for one render (all at weight 1), off afterwards; plain renders see the base model."""
    loaded = _adapters(pipe)
    if not loaded:
        yield
        return
    try:
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[1.0] * len(adapters))
            if regional:
                pipe.unet.disable_adapters()  # RegionalLora adds the updates itself, masked per subject
        else:
            pipe.disable_lora()
        yield
    finally:
        if regional:
            pipe.unet.enable_adapters()
        pipe.disable_lora()


def needs_regions(shot: shotlib.Shot, adapters: list[tuple[str, int]]) -> bool:
    """Several LoRA subjects, at least one with a box: each LoRA then acts inside its own box only."""
    return len(adapters) > 1 and any(shot.subjects[k].boxes for _, k in adapters)


_TEXT_SIDE = ("attn2.to_k", "attn2.to_v")


class RegionalLora(Control):
    """Each subject's LoRA update only inside its box (image-token projections), via forward hooks on peft's
    LoRA layers while peft's own LoRA path is disabled. Subjects without boxes act everywhere."""

    name = "regional_lora"

    def __init__(self, ctx: Context, adapters: list[tuple[str, int]]):
        self.ctx = ctx
        self.adapters = adapters
        self.calls = 0

    def hooks(self, unet) -> list:
        from peft.tuners.lora import LoraLayer

        handles = []
        for name, mod in unet.named_modules():
            if isinstance(mod, LoraLayer) and "motion_modules" not in name and any(
                    a in mod.lora_A for a, _ in self.adapters):
                handles.append(mod.register_forward_hook(self._hook(name.endswith(_TEXT_SIDE))))
        return handles

    def _hook(self, text_side: bool):
        def hook(mod, args, output):
            x = args[0]
            masks = None if text_side else self._masks(x)
            for a, k in self.adapters:
                if a not in mod.lora_A:
                    continue
                d = mod.lora_B[a](mod.lora_A[a](mod.lora_dropout[a](x.to(mod.lora_A[a].weight.dtype))))
                d = d * mod.scaling[a]
                if masks is not None and k in masks:
                    d = d * masks[k]
                output = output + d.to(output.dtype)
            self.calls += 1
            return output
        return hook

    def _masks(self, x) -> dict | None:
        """Per boxed subject, (B·F, N, 1) 0/1 masks of x's tokens, or None when x is not a frame batch."""
        from studio.controls.boxes import box_masks
        from studio.subjects.losses import grid_for

        if x.ndim != 3 or getattr(self.ctx, "side_pass", False):
            return None
        try:
            rows, cols = grid_for(x.shape[1], self.ctx.latent_h, self.ctx.latent_w)
        except ValueError:
            return None
        per = self.ctx.frames + getattr(self.ctx, "extra_frames", 0)
        if x.shape[0] % per:
            return None
        out = {}
        for _, k in self.adapters:
            boxes = self.ctx.boxes.get(k)
            if boxes is None:
                continue
            m = box_masks(boxes, rows, cols).to(x.dtype)  # (F, N)
            if per > self.ctx.frames:  # reference frames appended: no subject there
                m = torch.cat([m, m.new_zeros(per - self.ctx.frames, m.shape[1])])
            out[k] = m.repeat(x.shape[0] // per, 1)[..., None].to(x.device)  # (B·F, N, 1)
        return out
