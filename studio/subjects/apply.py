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
from studio.controls.base import TEMPORAL_MARKERS, BoxCache, Context, Control

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


def phrase_spans(prompt: str, phrases: dict[int, str], required=None) -> dict[int, tuple[int, int]]:
    """The character span (start, end) of each subject's own occurrence of its phrase {subject index: phrase}.

    The same rule as the box control's token assignment (studio.controls.boxes.assign_phrases): subjects sharing a
    phrase take its occurrences in order (the k-th subject with "dog" gets the k-th "dog"), and a phrase inside a
    longer one ("dog" in "black dog") gets an occurrence outside it: longer phrases (by words) choose first, each
    the first occurrence no earlier choice overlaps. Matching is shot.find_phrase's: whole words, any case.
    required: the subjects that must get a span (default all; ShotError naming the first without one); the others
    only take what is free, so that they keep the order of occurrences.
    """
    required = set(phrases) if required is None else set(required)
    taken: list[tuple[int, int, int]] = []  # (start, end, subject index)
    spans: dict[int, tuple[int, int]] = {}
    for k in sorted(phrases, key=lambda k: (-len(phrases[k].split()), -len(phrases[k]), k)):
        found = _occurrences(phrases[k], prompt)
        free = [(a, b) for a, b in found if not any(a < e and s < b for s, e, _ in taken)]
        if not free:
            if k in required:
                others = sorted({j for s, e, j in taken for a, b in found if a < e and s < b})
                why = (f"every occurrence of the phrase in the prompt ({len(found)}) is already taken by "
                       + ", ".join(f"subjects[{j}] ({phrases[j]!r})" for j in others)
                       + ": name this subject once more in the prompt, or give it a phrase of its own"
                       if found else f"the phrase is not in the prompt {prompt!r}")
                raise shotlib.ShotError(f"subjects[{k}].phrase", phrases[k], why)
            continue
        spans[k] = free[0]
        taken.append((*free[0], k))
    return spans


def _occurrences(phrase: str, prompt: str) -> list[tuple[int, int]]:
    """Spans of every non-overlapping whole-word, case-insensitive occurrence of the phrase, left to right."""
    out, start = [], 0
    while (m := shotlib.find_phrase(phrase, prompt[start:])) is not None:
        out.append((start + m.start(), start + m.end()))
        start += m.end()
    return out


def insert_words(prompt: str, spans: dict[int, tuple[int, int]], words: dict[int, str]) -> str:
    """The prompt with words[k] put before the span of subject k (spans from phrase_spans)."""
    for k in sorted(words, key=lambda k: spans[k][0], reverse=True):  # right to left: earlier spans stay valid
        a = spans[k][0]
        prompt = f"{prompt[:a]}{words[k]} {prompt[a:]}"
    return prompt


def plan(shot: shotlib.Shot, preset, library=None) -> tuple[SubjectPlan, list]:
    """Check the shot's `subjects[i].subject` names against the library and the model (ShotError naming the field),
    and rewrite prompt and phrases. Returns the plan and the library's Subject records (same order as adapters).

    Each subject's words go before its own occurrence of its phrase (phrase_spans: the k-th subject sharing a phrase
    takes the k-th occurrence, as the box control does), so the box control finds "words phrase" where it expects.
    """
    wanted = [(k, s) for k, s in enumerate(shot.subjects) if s.subject]
    if not wanted:
        return SubjectPlan(shot), []
    from studio.subjects.library import SubjectError, SubjectLibrary, check_base_model

    library = library or SubjectLibrary()
    subjects, records, names, words = list(shot.subjects), [], [], {}
    for k, s in wanted:
        where = f"subjects[{k}].subject"
        if s.subject in names:
            raise shotlib.ShotError(where, s.subject, "the same subject twice in one shot")
        try:
            rec = library.get(s.subject, field=where)
            check_base_model(rec, preset, field=where)
        except (SubjectError, ValueError) as e:
            raise shotlib.ShotError(where, s.subject, _reason(e)) from None
        words[k] = rec.trigger.strip()
        subjects[k] = dataclasses.replace(s, phrase=f"{words[k]} {s.phrase}")
        records.append((k, rec))
        names.append(s.subject)
    spans = phrase_spans(shot.prompt, {k: s.phrase for k, s in enumerate(shot.subjects)}, required=words)
    new = dataclasses.replace(shot, prompt=insert_words(shot.prompt, spans, words), subjects=subjects)
    adapters = [(adapter_name(rec), k) for k, rec in records if rec.lora_path is not None]
    return SubjectPlan(new, adapters, names), records


def _reason(e: Exception) -> str:
    msg = str(e)
    return msg.split(": ", 1)[1] if ": " in msg else msg


def load(pipe, records, library=None) -> None:
    """Make the subjects' weights present in `pipe` (once; a changed subject is reloaded). Loaded adapters rest
    switched off: `activated` turns them on for a render."""
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
                    _delete_adapter(pipe.unet, name)
                load_lora(pipe, library.load_lora(rec.name), name)
        except Exception as e:  # noqa: BLE001 - a corrupt or unsafe file becomes the shot's field error
            raise shotlib.ShotError(where, rec.name, f"cannot load its weights ({_reason(e)})") from None
        held.pop(name, None)
        held[name] = stamp
        logger.info("loaded subject %s into the pipeline", rec.name)
    while len([n for n in held if n in _adapters(pipe)]) > MAX_ADAPTERS:
        old = next(n for n in held if n in _adapters(pipe))
        _delete_adapter(pipe.unet, old)
        held.pop(old)
        logger.info("evicted subject adapter %s", old)
    if _adapters(pipe):
        _set_lora_enabled(pipe.unet, False)


def forget(pipe, name: str) -> None:
    """Drop a subject's adapter from a pipeline (it was retrained or removed)."""
    held: dict = pipe.__dict__.get("_studio_subjects", {})
    key = f"subject_{name}"
    if key in _adapters(pipe):
        _delete_adapter(pipe.unet, key)
    held.pop(key, None)


# --- LoRA adapters on any UNet ---------------------------------------------------------------------------------
# AnimateDiff's UNetMotionModel has diffusers' peft mixin (load_lora_adapter, set_adapters, ...); Zeroscope's
# UNet3DConditionModel has none, so TextToVideoSDPipeline.load_lora_weights fails on it (AttributeError: no
# load_lora_adapter). Loading there goes through peft directly (inject_adapter_in_model + set_peft_model_state_dict,
# what the mixin does inside), and switching, for both, through diffusers' model-agnostic peft helpers.


def load_lora(pipe, state_dict: dict, name: str) -> None:
    """Add a diffusers-format LoRA ("unet." keys, lora.down/lora.up) to pipe.unet as adapter `name`."""
    with keep_global_rng(pipe.unet):  # peft initialises the new layers from the global RNG; the file overwrites them
        if hasattr(pipe.unet, "load_lora_adapter"):
            pipe.load_lora_weights(state_dict, adapter_name=name)
        else:
            inject_lora(pipe.unet, state_dict, name)


def inject_lora(unet, state_dict: dict, name: str) -> None:
    """peft's own path for a UNet without diffusers' peft mixin. The rank comes from the weights and alpha = rank
    (the studio trains with lora_alpha = r; diffusers' loader assumes the same for files without alphas)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    sd = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    if not sd:
        raise ValueError("the LoRA file has no 'unet.' weights")
    sd = convert_unet_state_dict_to_peft(sd)
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    if not ranks or len(ranks) * 2 != len(sd):
        raise ValueError("the LoRA file is not a plain lora_A/lora_B (lora.down/lora.up) state dict")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: v for m, v in ranks.items() if v != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern,
                        alpha_pattern=dict(pattern))
    inject_adapter_in_model(config, unet, adapter_name=name)
    result = set_peft_model_state_dict(unet, sd, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        _delete_adapter(unet, name)
        raise ValueError(f"the LoRA file's weights do not fit this model ({unexpected[0]})")


def _delete_adapter(unet, name: str) -> None:
    if hasattr(unet, "delete_adapters"):
        unet.delete_adapters(name)
        return
    from diffusers.utils.peft_utils import delete_adapter_layers

    delete_adapter_layers(unet, name)
    cfg = getattr(unet, "peft_config", None)
    if cfg is not None:
        cfg.pop(name, None)
        if not cfg:
            del unet.peft_config


def _set_lora_enabled(unet, enabled: bool) -> None:
    from diffusers.utils.peft_utils import set_adapter_layers

    set_adapter_layers(unet, enabled=enabled)


def _activate(unet, names: list[str]) -> None:
    """These adapters on, at weight 1, and no other."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(unet, names, [1.0] * len(names))
    _set_lora_enabled(unet, True)


def _adapters(pipe) -> set[str]:
    from studio import families

    cfg = getattr(families.denoiser(pipe), "peft_config", None)
    return set(cfg or {})


@contextmanager
def keep_global_rng(module):
    """Restore torch's global RNG (CPU, and the module's CUDA device) after a library call that draws from it."""
    params = next(iter(module.parameters()), None)
    devices = [params.device] if params is not None and params.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def add_token_rows(tokenizer, text_encoder, tokens: list[str]) -> int:
    """Add tokens to the tokenizer and zero rows for them to the text encoder's embedding table; how many were new.

    transformers' resize draws the new rows from the global RNG (mean_resizing samples a multivariate normal; even
    without it, nn.Embedding initialises itself): mean_resizing is off and the global RNG is restored after, as the
    caller overwrites the rows anyway."""
    added = tokenizer.add_tokens(tokens)
    if added:
        with keep_global_rng(text_encoder):
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return added


def _load_tokens(pipe, embeds: dict) -> None:
    """New rows in the text encoder's embedding table for the subject's tokens (rows overwritten on reload)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    emb = te.get_input_embeddings().weight
    for t, v in embeds.items():
        if v.ndim != 1 or v.shape[0] != emb.shape[1]:
            raise ValueError(f"token {t} has shape {tuple(v.shape)}, the text encoder needs ({emb.shape[1]},)")
    missing = [t for t in embeds if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        add_token_rows(tok, te, missing)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        for t, v in embeds.items():
            emb[tok.convert_tokens_to_ids(t)] = v.to(emb)


@contextmanager
def activated(pipe, adapters: list[tuple[str, int]], regional: bool):
    """LoRA adapters on for one render (all at weight 1), off afterwards; plain renders see the base model."""
    if not _adapters(pipe):
        yield
        return
    unet = pipe.unet  # trained subjects exist on the UNet families only (studio.families: "subjects")
    try:
        if adapters:
            _activate(unet, [n for n, _ in adapters])
            if regional:
                _set_lora_enabled(unet, False)  # RegionalLora adds the updates itself, masked per subject
        else:
            _set_lora_enabled(unet, False)
        yield
    finally:
        _set_lora_enabled(unet, False)


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
        self.calls = 0  # hook calls (tests)
        self.builds = 0  # mask sets built (tests: once per layer size and batch while the boxes stay)
        self._cache = BoxCache(ctx)

    def hooks(self, unet) -> list:
        from peft.tuners.lora import LoraLayer

        handles = []
        for name, mod in unet.named_modules():
            if isinstance(mod, LoraLayer) and not any(m in name for m in TEMPORAL_MARKERS) and any(
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
        """Per boxed subject, (B·F, N, 1) 0/1 masks of x's tokens, or None when x is not a frame batch. Built once
        per layer size and batch while the boxes stay (the camera moves them between steps), not per LoRA layer."""
        if x.ndim != 3 or getattr(self.ctx, "side_pass", False):
            return None
        try:
            rows, cols = self.ctx.layer_size(x.shape[1])
        except ValueError:
            return None
        per = self.ctx.frames + getattr(self.ctx, "extra_frames", 0)
        if x.shape[0] % per:
            return None
        key = (rows, cols, per, x.shape[0], x.dtype, x.device)
        return self._cache.get(key, lambda: self._build_masks(rows, cols, per, x.shape[0], x.dtype, x.device))

    def _build_masks(self, rows: int, cols: int, per: int, batch: int, dtype, device) -> dict:
        from studio.controls.boxes import box_masks

        out = {}
        for _, k in self.adapters:
            boxes = self.ctx.boxes.get(k)
            if boxes is None:
                continue
            m = box_masks(boxes, rows, cols).to(dtype)  # (F, N)
            if per > self.ctx.frames:  # reference frames appended: no subject there
                m = torch.cat([m, m.new_zeros(per - self.ctx.frames, m.shape[1])])
            out[k] = m.repeat(batch // per, 1)[..., None].to(device)  # (B·F, N, 1)
        self.builds += 1
        return out

    def close(self) -> None:
        self._cache.clear()
