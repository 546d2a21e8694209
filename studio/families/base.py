"""The family interface: one stateless object per base-model family, asked instead of assuming a UNet.

Loading        pipeline, video_to_video (class names), auto_dtype(device), weight_refs(preset),
               load(preset, base, kw, note), check_pipeline(pipe, preset)
Components     denoiser_attr / denoiser(pipe), text_encoder(pipe), tokenizer(pipe), text_length(pipe)
Latent layout  spatial_factor(pipe), temporal_factor(pipe | preset), latent_channels(pipe), latent_dtype(pipe),
               latent_frames(frames, temporal), latent_times(frames, temporal), latent_shape(pipe, F, H, W)
Denoising      cfg_batched (one call on [uncond, cond] or two calls, cond first), scheduler_kind(pipe),
               call_kwargs(pipe, on_step_end, check_cancel): how the per-step callback attaches
Controls       cross_attention_names / self_attention_names / temporal_attention_names(denoiser): the attention
               processors controls replace; `latents=` (initial noise) and the step-end callback (latent edits)
               are the other two hook points, the same on every family. What differs per architecture:
               phrase_tokens / word_tokens (the prompt's tokens as the denoiser sees them), box_control,
               reference_problem / encode_reference / reference_control (the controls' family classes; their
               logic is shared, studio.controls)
Shot rules     supports: the shot settings the family takes; check_shot(shot, preset) refuses the others (ShotError
               naming the field and what is valid); frame and size rules are preset fields (frame_step,
               frame_offset, size_multiple), checked by shot validation

Shapes: B videos, C latent channels, F video frames, F' latent frames, H×W pixels, h×w latent size.
"""

from __future__ import annotations

from typing import Callable

# Shot settings a family may or may not take (the controls and passes that exist on the UNet families).
SETTINGS = ("boxes", "camera", "references", "subjects", "refine", "subject_tuning")
SETTING_WORDS = {"boxes": "box trajectories", "camera": "camera pan", "references": "reference images",
                 "subjects": "trained subjects", "refine": "refinement passes", "subject_tuning": "subject tuning"}


def latent_times(frames: int, temporal: int) -> list[float]:
    """The video-frame time each latent frame stands for: the centre of the frames it encodes.

    A causal video VAE with temporal factor T encodes frame 0 alone into latent 0 and frames T·k−T+1 .. T·k into
    latent k >= 1, so latent k stands at t_k = T·k − (T−1)/2 (t_0 = 0). With T = 1 (the UNet families: one latent
    per frame) t_k = k. Wan (T = 4): 0, 2.5, 6.5, 10.5, ...
    """
    n = (frames - 1) // temporal + 1
    return [0.0] + [temporal * k - (temporal - 1) / 2 for k in range(1, n)]


class Family:
    """Base class: what every family shares. Subclasses set the class attributes and override what differs."""

    name = ""
    pipeline = ""  # the diffusers text-to-video pipeline class (by name)
    video_to_video: str | None = None  # its video-to-video twin (refinement), None: none yet
    denoiser_attr = "unet"  # the pipeline attribute holding the denoising network
    cfg_batched = True  # True: one denoiser call on the batch [uncond, cond]; False: two calls, cond first
    supports: frozenset = frozenset(SETTINGS)

    # --- loading ---------------------------------------------------------------------------------------------

    def auto_dtype(self, device: str) -> str:
        """The weights' dtype for a preset's `dtype: auto`."""
        return "float16" if device == "cuda" else "float32"

    def weight_refs(self, preset) -> list[str]:
        """The weight references (Hugging Face ids or folders) a preset loads besides its base, in load order."""
        return []

    def load(self, preset, base: str, kw: dict, note: Callable[[str], None]):
        """The pipeline from its weights: `kw` holds dtype, revision, variant; note(ref) names the reference about
        to load (for the error when its weights are missing)."""
        import diffusers

        note(preset.base)
        return getattr(diffusers, self.pipeline).from_pretrained(base, **kw)

    def check_pipeline(self, pipe, preset) -> None:
        """Refuse a preset whose frame/size rules do not fit the loaded model (ShotError naming `model`)."""

    # --- components ------------------------------------------------------------------------------------------

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    def text_encoder(self, pipe):
        return pipe.text_encoder

    def tokenizer(self, pipe):
        return pipe.tokenizer

    def text_length(self, pipe) -> int:
        """Text tokens per prompt the denoiser's cross-attention sees (L)."""
        return pipe.tokenizer.model_max_length

    # --- latent layout ---------------------------------------------------------------------------------------

    def spatial_factor(self, pipe) -> int:
        """Pixels per latent pixel, a side."""
        return pipe.vae_scale_factor

    def temporal_factor(self, pipe_or_preset) -> int:
        """Video frames per latent frame (after the first)."""
        return 1

    def latent_channels(self, pipe) -> int:
        return self.denoiser(pipe).config.in_channels

    def latent_dtype(self, pipe):
        """The dtype of the initial noise handed to the pipeline (`latents=`)."""
        return self.denoiser(pipe).dtype

    def latent_frames(self, frames: int, temporal: int = 1) -> int:
        """F' for F video frames."""
        return (frames - 1) // temporal + 1

    def latent_times(self, frames: int, temporal: int = 1) -> list[float]:
        return latent_times(frames, temporal)

    def latent_shape(self, pipe, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """(B, C, F', h, w) of one video's latents."""
        s = self.spatial_factor(pipe)
        return (1, self.latent_channels(pipe), self.latent_frames(frames, self.temporal_factor(pipe)),
                height // s, width // s)

    # --- denoising -------------------------------------------------------------------------------------------

    def scheduler_kind(self, pipe) -> str:
        """'flow' (flow matching: the model predicts a velocity, noise is not scaled) or 'diffusion'."""
        c = pipe.scheduler.config
        flow = c.get("prediction_type") == "flow_prediction" or c.get("use_flow_sigmas") or \
            type(pipe.scheduler).__name__.startswith("FlowMatch")
        return "flow" if flow else "diffusion"

    def call_kwargs(self, pipe, on_step_end, check_cancel: Callable[[], None]) -> dict:
        """The pipeline-call arguments that run `on_step_end(pipe, i, t, {"latents": ...}) -> {"latents": new}`
        after every denoising step (diffusers' callback_on_step_end)."""
        return dict(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])

    # --- where controls hook in ------------------------------------------------------------------------------

    def cross_attention_names(self, denoiser) -> list[str]:
        """Processor names of the attention layers whose keys are the prompt's tokens."""
        raise NotImplementedError

    def self_attention_names(self, denoiser) -> list[str]:
        """Processor names of the attention layers among the video's own tokens (spatial, or joint 3D)."""
        raise NotImplementedError

    def temporal_attention_names(self, denoiser) -> list[str]:
        """Processor names of the frame-to-frame attention layers (none when self-attention is joint 3D)."""
        return []

    # --- the controls' architecture-specific parts (the controls' logic is shared: studio.controls) -----------

    def phrase_tokens(self, pipe, prompt: str, phrases: dict[int, str], required=None) -> dict[int, list[int]]:
        """Token positions of each subject's own occurrence of its phrase in the prompt the denoiser sees
        (boxes.PhraseError or ShotError naming the subject when a required one has none)."""
        from studio.controls.boxes import assign_phrases

        return assign_phrases(pipe.tokenizer, prompt, phrases, required=required)

    def word_tokens(self, pipe, prompt: str) -> list[int]:
        """Token positions of the prompt's words (what box control's all_words suppresses)."""
        from studio.controls.boxes import word_token_indices

        return word_token_indices(pipe.tokenizer, prompt)

    def box_control(self, ctx, tracks, words, strength, amplify_steps, suppress):
        from studio.controls.boxes import BoxAttention

        return BoxAttention(ctx, tracks, words, strength, amplify_steps, suppress)

    def reference_problem(self, pipe, shot, ctx, references: int, model: str):
        """Why this model cannot take the shot's references (a message for the first reference's field, or a
        (field, value, message) tuple), or None."""
        from studio.controls import reference

        unet = self.denoiser(pipe)
        if not reference.supports(unet):
            return f"reference injection does not support {model}'s UNet ({type(unet).__name__})"
        limit = getattr(unet.config, "motion_max_seq_length", None)
        if shot.reference_control.temporal_attention and limit and shot.frames + references > limit:
            return ("reference_control.temporal_attention", True,
                    f"{shot.frames} frames + {references} reference frames exceed the {limit} frames {model}'s "
                    f"motion modules take; use fewer frames or temporal_attention: false")
        return None

    def encode_reference(self, pipe, path, width: int, height: int):
        """The clean latent (1, C, h, w) of a reference image at the shot's size."""
        from studio.controls import reference

        return reference.encode_reference(pipe, path, width, height)

    def reference_control(self, pipe, ctx, items, rc):
        from studio.controls import reference

        return reference.ReferenceInjection(ctx, items, rc.temporal_attention, rc.refresh_every, rc.max_tokens,
                                            schedule=lambda: pipe.scheduler.timesteps,
                                            unconditional=rc.unconditional, token_ratio=rc.token_ratio)

    # --- shot rules ------------------------------------------------------------------------------------------

    def check_shot(self, shot, preset) -> None:
        """Refuse the shot settings this family does not take (ShotError naming the first field and what is
        valid). Frame and size rules are the preset's and checked by studio.shot.validate."""
        from studio.shot import ShotError

        where = f"the {self.name} family (model '{preset.name}')"

        def refuse(field: str, value, setting: str, valid: str):
            raise ShotError(field, value, f"{where} has no {SETTING_WORDS[setting]} yet; valid here: {valid}")

        for k, s in enumerate(shot.subjects):
            if s.boxes and "boxes" not in self.supports:
                refuse(f"subjects[{k}].boxes", "…", "boxes", "no boxes ({})")
            if s.reference is not None and "references" not in self.supports:
                refuse(f"subjects[{k}].reference", s.reference, "references", "null")
            if s.subject is not None and "subjects" not in self.supports:
                refuse(f"subjects[{k}].subject", s.subject, "subjects", "null")
        if shot.background.reference is not None and "references" not in self.supports:
            refuse("background.reference", shot.background.reference, "references", "null")
        if "camera" not in self.supports:
            for name in ("cx", "cy"):
                if getattr(shot.camera, name):
                    refuse(f"camera.{name}", getattr(shot.camera, name), "camera", "0")
        if "refine" not in self.supports:
            for name in ("face", "tiled"):
                if getattr(shot.refine, name).enabled:
                    refuse(f"refine.{name}.enabled", True, "refine", "false")

    def require(self, setting: str, field: str, preset) -> None:
        """ValueError naming `field` when this family does not take `setting` (e.g. subject tuning)."""
        if setting not in self.supports:
            others = ", ".join(sorted(n for n in _takers(setting)))
            raise ValueError(f"{field}: {SETTING_WORDS[setting]} is not available on the {self.name} family yet "
                             f"(model '{preset.name}'); valid: a model of the {others} family (got {preset.name!r})")


def _takers(setting: str) -> list[str]:
    from studio import families

    return [n for n in families.NAMES if setting in families.get(n).supports]
