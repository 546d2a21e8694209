"""The browser studio (Gradio Blocks). A thin adapter: form values -> Shot -> engine -> files.

Every event function here is plain Python over named values, so tests call them without a browser. Errors a
user can fix (a bad field, a model that is not downloaded) become a Gradio message naming the field, never a
stack trace. The app serves files only from its own output folder.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from studio import engine, shot as shotlib
from studio.pipelines import ModelLoadError, studio_home
from studio.presets import list_model_presets, shot_preset_path

logger = logging.getLogger(__name__)

GAMMA_HELP = ("γ correlates the initial noise across frames: Cov(frame i, frame j) = γ^|i−j|. 0 = independent "
              "noise per frame (more motion, more flicker); near 1 = shared noise (steadier, less motion).")
MAX_SEED = 2**31 - 1
DEFAULT_SHOT = "toyworld-star"  # the shot the page opens with: presets/shots/<name>.yaml, on the embedded model


class UserError(Exception):
    """A problem the user can fix; shown as a message in the page."""


def output_dir() -> Path:
    """The only folder the app serves files from: this studio's renders."""
    d = studio_home() / "renders"
    d.mkdir(parents=True, exist_ok=True)
    return d


def shot_from_form(shot_yaml: str, model: str, prompt: str, negative_prompt: str, seed, steps, guidance_scale,
                   frames, gamma, cx=None, cy=None) -> shotlib.Shot:
    """The form's values laid over the shot file in the editor (which carries subjects, camera, background)."""
    base = shotlib.loads(shot_yaml, where="shot file")
    values = {"model": model, "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed,
              "steps": steps, "guidance_scale": guidance_scale, "frames": frames}
    data = shotlib.to_dict(base)
    for k, v in values.items():
        if v is not None and v != "":
            data[k] = v
    if gamma is not None:
        data["noise_prior"]["gamma"] = gamma
    for name, v in (("cx", cx), ("cy", cy)):
        if v is not None:
            data["camera"][name] = v
    for k in ("seed", "steps", "frames"):  # sliders and number boxes send floats
        if isinstance(data.get(k), float) and data[k].is_integer():
            data[k] = int(data[k])
    shot = shotlib.from_container(data)
    engine.prepare(shot)  # validate against the model preset now, before any work
    return shot


def render_event(shot_yaml: str, model: str, prompt: str, negative_prompt: str, seed, steps, guidance_scale,
                 frames, gamma, cx=None, cy=None, progress=None, manager=None, cancel: threading.Event | None = None):
    """Render the form's shot; returns (video path, sidecar path, shot file path, resolved shot YAML, status)."""
    try:
        shot = shot_from_form(shot_yaml, model, prompt, negative_prompt, seed, steps, guidance_scale, frames, gamma,
                              cx, cy)
        stem = time.strftime("%Y%m%d-%H%M%S") + f"-{shot.seed}"
        folder = output_dir()
        out = folder / f"{stem}.mp4"
        n = 1
        while out.exists():
            out, n = folder / f"{stem}-{n}.mp4", n + 1
        files = engine.render_to_files(shot, out, manager=manager, cancel=cancel,
                                       progress=(lambda i, total: progress((i, total), desc="denoising"))
                                       if progress else None)
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    except engine.RenderCancelled:
        raise UserError("render cancelled") from None
    r = files.result
    shot_file = shotlib.save(r.shot, out.with_suffix(".yaml"))
    status = (f"{r.shot.frames} frames {r.shot.width}×{r.shot.height} on {r.preset.name}, seed {r.shot.seed}: "
              f"{r.timings['total']:.2f} s (load {r.timings['load']:.2f} s)")
    return str(files.video), str(files.sidecar), str(shot_file), shotlib.dumps(r.shot), status


def load_shot_event(path: str | None) -> str:
    """An uploaded shot file -> the editor text (validated)."""
    if not path:
        raise UserError("shot file: no file given")
    try:
        return shotlib.dumps(shotlib.load(path))
    except shotlib.ShotError as e:
        raise UserError(str(e)) from None


def gamma_preview_event(gamma: float):
    """The prior's covariance as a heat map and a strip of sampled noise frames (uint8 images)."""
    import cv2
    import numpy as np

    from studio.controls import noise_prior

    try:
        cov, frames = noise_prior.preview(float(gamma), frames=8, size=32, seed=0)
    except ValueError as e:
        raise UserError(f"noise_prior.gamma: {e}") from None
    heat = cv2.applyColorMap((np.asarray(cov) * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    heat = cv2.resize(heat, (160, 160), interpolation=cv2.INTER_NEAREST)
    gap = np.ones((frames.shape[1], 2))  # white 2 px gap between frames
    strip = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)  # (size, F·size + gaps)
    strip = (strip * 255).round().astype(np.uint8)
    strip = cv2.resize(strip, (strip.shape[1] * 2, strip.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    return heat, strip


def preview_event(shot_yaml: str, model: str, prompt: str, frames, cx, cy):
    """Strips of the boxes' trajectory and of the camera pan over the shot's frames (no rendering)."""
    import numpy as np

    from studio import previews

    try:
        shot = shot_from_form(shot_yaml, model, prompt, "", None, None, None, frames, None, cx, cy)
        shot = engine.prepare(shot)[0]
    except (shotlib.ShotError, UserError) as e:
        raise UserError(str(e)) from None

    def strip(frames):  # (F, H, W, 3) -> (H, F·(W+2), 3)
        gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
        return np.concatenate([x for f in frames for x in (f, gap)][:-1], 1)

    return strip(previews.trajectory(shot, long_side=96)), strip(previews.camera(shot, long_side=96))


def build_app(manager=None):
    """The Blocks app. One pipeline manager for every event; one render at a time."""
    import gradio as gr

    manager = manager or engine.default_manager()
    example = shot_preset_path(DEFAULT_SHOT)
    default_yaml = example.read_text() if example.exists() else ""
    default_shot = shotlib.loads(default_yaml)

    def guarded(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
        run.__name__ = fn.__name__
        return run

    def do_render(shot_yaml, model, prompt, negative_prompt, seed, steps, guidance, frames, gamma, cx, cy,
                  progress=gr.Progress()):
        return guarded(render_event)(shot_yaml, model, prompt, negative_prompt, seed, steps, guidance, frames,
                                     gamma, cx, cy, progress=progress, manager=manager)

    with gr.Blocks(title="Shot Studio") as demo:
        gr.Markdown("# Shot Studio\nDescribe a shot, set the noise prior, render. The shot file below carries "
                    "subjects, boxes, camera and background; the form's values override it.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="prompt", value=default_shot.prompt)
                negative = gr.Textbox(label="negative prompt", value=default_shot.negative_prompt)
                with gr.Row():
                    model = gr.Dropdown(list_model_presets(), value=default_shot.model, label="model preset")
                    seed = gr.Number(value=default_shot.seed, precision=0, minimum=0, maximum=MAX_SEED,
                                     label="seed")
                    dice = gr.Button("🎲", scale=0, min_width=40)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=default_shot.steps or 20, step=1, label="steps")
                    guidance = gr.Slider(1.0, 20.0, value=default_shot.guidance_scale or 7.5, step=0.5,
                                         label="guidance scale")
                    frames = gr.Slider(1, 32, value=default_shot.frames or 8, step=1, label="frames")
                gamma = gr.Slider(0.0, 0.99, value=default_shot.noise_prior.gamma, step=0.01,
                                  label="noise correlation γ", info=GAMMA_HELP)
                with gr.Row():
                    heat = gr.Image(label="Cov(frame i, frame j)", height=160, interactive=False)
                    strip = gr.Image(label="sampled noise frames", height=160, interactive=False)
                with gr.Row():
                    cx = gr.Slider(-1.0, 1.0, value=default_shot.camera.cx, step=0.05, label="camera pan cx",
                                   info="fraction of the width travelled; > 0 pans right (content moves left)")
                    cy = gr.Slider(-1.0, 1.0, value=default_shot.camera.cy, step=0.05, label="camera pan cy",
                                   info="> 0 pans down (content moves up)")
                track = gr.Image(label="box trajectory per frame (from the shot file's boxes)", interactive=False)
                pan = gr.Image(label="camera pan per frame", interactive=False)
                render_btn = gr.Button("Render", variant="primary")
                status = gr.Markdown()
            with gr.Column(scale=2):
                video = gr.Video(label="video", autoplay=True, loop=True)
                with gr.Row():
                    sidecar = gr.File(label="sidecar (JSON)")
                    shot_file = gr.File(label="shot file (YAML)")
                shot_yaml = gr.Code(value=default_yaml, language="yaml", label="shot file")
                upload = gr.File(label="load a shot file", file_types=[".yaml", ".yml"], type="filepath")

        dice.click(lambda: int(time.time_ns() % MAX_SEED), outputs=seed, api_visibility="private")
        gamma.change(guarded(gamma_preview_event), gamma, [heat, strip], api_name="gamma_preview",
                     show_progress="hidden")
        demo.load(guarded(gamma_preview_event), gamma, [heat, strip], api_visibility="private")
        upload.upload(guarded(load_shot_event), upload, shot_yaml, api_name="load_shot")
        preview_inputs = [shot_yaml, model, prompt, frames, cx, cy]
        for component in (cx, cy, frames, model):
            component.change(guarded(preview_event), preview_inputs, [track, pan], api_visibility="private",
                             show_progress="hidden")
        shot_yaml.blur(guarded(preview_event), preview_inputs, [track, pan], api_name="preview", show_progress="hidden")
        demo.load(guarded(preview_event), preview_inputs, [track, pan], api_visibility="private")
        render_btn.click(do_render, [shot_yaml, model, prompt, negative, seed, steps, guidance, frames, gamma, cx, cy],
                         [video, sidecar, shot_file, shot_yaml, status], api_name="render", concurrency_limit=1,
                         concurrency_id="gpu")
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False):
    """Start the studio; files are served only from its output folder."""
    demo = build_app()
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(output_dir())],
                       max_file_size="20mb", prevent_thread_lock=prevent_thread_lock, footer_links=["api"])
