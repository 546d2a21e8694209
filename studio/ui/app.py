"""The page: a Gradio Blocks layout wired to the event functions of studio.ui.events / trajectory / subjects.

Left, the tabs that direct the shot (Trajectory, Subjects, Background, Camera, Noise, Shot file); right, the
Render and History tabs. One pipeline manager serves every event; renders and subject training share one queue
slot ("gpu"), so one GPU job runs at a time. Every failure shows as one line in the page, naming the field when
the input was at fault (`guarded`); never a stack trace.

Values travel by name: each event passes its components as keyword arguments (Gradio's `inputs_kwargs`), the form
as `Page.form` (the names of events.FORM -> components), and handlers with several outputs return them as a
mapping of components, so no list order has to match anything.

Only picklable values cross into the GPU-side functions (`render_job`, `train_job`; on ZeroGPU `spaces.GPU`
runs them in a forked worker): the shot text, the form's values, a job key and the trust policy. The job's progress
callback, cancel flag and pipeline manager are looked up by that key in this process (`JOBS`).

Every event, public or private (the browser can call them all), runs under the web trust policy (`guarded`,
studio.trust): its shots may name only preset names, uploaded or rendered images, library subjects and detector
model names, within the operator's caps and permissions (studio.settings). The public API endpoints (/render,
/save_shot) take the form's values from hidden stand-ins whose value is None ("not sent": keep the shot file's), so
a client that leaves a value out renders the shot file as written; the page's own buttons send the page's form.
"""

import functools
import inspect
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from studio import engine, shot as shotlib, trust
from studio.settings import Settings
from studio.ui import events as ev, subjects as sj, trajectory as tj
from studio.ui.gpu import RENDER_SECONDS, TRAIN_SECONDS, gpu

logger = logging.getLogger(__name__)

MAX_UPLOAD = "20mb"
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp"]
QUIET = dict(show_progress="hidden", api_visibility="private")  # internal events: no spinner, not in the API
TRAIN_POLL_S = 0.5  # how often the training event reports the loss
# Gradio's own cache (its copies of uploads and outputs): checked hourly, files older than a day removed. The
# studio keeps what a shot file names (uploads, renders) in its output folder, which this does not touch.
CACHE_CLEANUP = (3600, 24 * 3600)


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def web_trust(settings: Settings | None = None) -> trust.Trust:
    """The trust policy of every event of the page: images from the studio's output folder (its uploads and
    renders), uploads from Gradio's upload folder, the operator's settings (the environment's unless given)."""
    from gradio.utils import get_upload_folder

    return trust.web(images=(ev.output_dir(),), uploads=(get_upload_folder(),), settings=settings)


def guarded(fn, what: str | None = None):
    """fn (a function or generator function) run under the web trust policy, with every failure shown as a Gradio
    message, never a stack trace.

    Input problems (events.user_errors: UserError, ShotError, a ValueError naming the field) show as they are;
    anything else as one line, "<what> failed: Type: message", with the trace in the log.
    """
    import gradio as gr

    checked = ev.user_errors(fn)
    what = what or fn.__name__.removesuffix("_event").strip("_").replace("_", " ")

    def shown(e: Exception) -> Exception:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, ev.UserError):
            return gr.Error(str(e), print_exception=False)
        logger.exception("%s failed", what)  # called inside the except block: the log has the trace
        return gr.Error(f"{what} failed: {_one_line(e)}", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)  # keeps the signature: Gradio still sees gr.Request / gr.Progress / keyword parameters
        def run_generator(*args, **kwargs):
            # Gradio may run each step in another thread (another context): the policy is set around every step
            gen = checked(*args, **kwargs)
            try:
                policy = web_trust()
                while True:
                    with trust.using(policy):
                        value = next(gen)
                    yield value
            except StopIteration as stop:
                return stop.value
            except Exception as e:
                raise shown(e) from None
            finally:
                gen.close()

        return run_generator

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            with trust.using(web_trust()):
                return checked(*args, **kwargs)
        except Exception as e:
            raise shown(e) from None

    return run


# --- jobs: what Cancel stops, and what the GPU side finds by key ---------------------------------------------------


@dataclass
class Job:
    """One running render or training: what its GPU-side function needs besides its (picklable) arguments."""

    key: str
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Callable | None = None
    manager: object = None  # the pipeline manager; None: the engine's default


class Jobs:
    """The running job of each (session, kind), kind "render" or "train". A job is registered only while it runs,
    so Cancel after it finished finds nothing, and a render's Cancel never stops a training or the other way."""

    def __init__(self):
        self._running: dict[tuple[str, str], Job] = {}
        self._by_key: dict[str, Job] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str, kind: str, progress: Callable | None = None, manager=None):
        job = Job(f"{kind}-{uuid.uuid4().hex}", progress=progress, manager=manager)
        with self._lock:
            self._running[(session, kind)] = job
            self._by_key[job.key] = job
        try:
            yield job
        finally:
            with self._lock:
                if self._running.get((session, kind)) is job:
                    del self._running[(session, kind)]
                self._by_key.pop(job.key, None)

    def find(self, key: str) -> Job:
        """The running job of that key; in another process (a ZeroGPU worker forked before it started), a job
        without progress or cancel on the default pipeline manager."""
        with self._lock:
            job = self._by_key.get(key)
        if job is None:
            logger.info("job %s is not registered in this process: no progress, no cancel, default pipelines", key)
            job = Job(key)
        return job

    def cancel(self, session: str, kind: str) -> bool:
        """Ask the session's running job of that kind to stop; False when none runs."""
        with self._lock:
            job = self._running.get((session, kind))
        if job is None:
            return False
        job.cancel.set()
        return True


JOBS = Jobs()


def _render_job(key: str, shot_yaml: str, form: dict, policy: trust.Trust) -> ev.Rendered:
    """Render the form's shot under the caller's trust policy (the GPU side: picklable arguments and result)."""
    job = JOBS.find(key)
    with trust.using(policy):
        return ev.render_event(shot_yaml, progress=job.progress, manager=job.manager, cancel=job.cancel, **form)


def _train_job(key: str, settings: dict, policy: trust.Trust):
    """Train a subject (the GPU side): settings are train_subject's photo_set, name, phrase, method, steps, model."""
    job = JOBS.find(key)
    with trust.using(policy):
        return sj.train_subject(**settings, progress=job.progress, cancel=job.cancel, manager=job.manager)


render_job = gpu(RENDER_SECONDS)(_render_job)
train_job = gpu(TRAIN_SECONDS)(_train_job)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _library_choices(rows: list[list]) -> list[str]:
    return [sj.NO_SUBJECT] + [r[0] for r in rows]


def random_seed() -> int:
    return int(time.time_ns() % ev.MAX_SEED)


class Page:
    """The studio's components (attributes) and the wiring of their events."""

    def __init__(self, manager, settings: Settings | None = None):
        self.manager = manager
        self.settings = settings or Settings.from_env()  # what the page shows; every event checks at call time
        self.jobs = JOBS  # the GPU-side functions find the page's jobs there
        self.default_yaml = ev.default_shot_yaml()
        self.start = ev.form_values(self.default_yaml)
        self.start_shot = ev.resolved(self.default_yaml)

    def with_form(self, **named) -> dict:
        """Keyword inputs of an event: the named components and the form's."""
        return {**named, **self.form}

    # --- layout ---------------------------------------------------------------------------------------------------

    def build(self):
        import gradio as gr

        with gr.Blocks(title="Shot Studio", fill_width=True, delete_cache=CACHE_CLEANUP) as demo:
            gr.Markdown("# Shot Studio\nDirect a short video: where each subject goes (Trajectory), who they are "
                        "(Subjects), the background, the camera pan and the noise correlation γ; then **Render**. "
                        "The page opens on a ready shot on the embedded toy-world model: press Render.")
            self.history, self.first_frame, self.photo_set = gr.State([]), gr.State(None), gr.State([])
            with gr.Row():
                self.prompt = gr.Textbox(label="prompt", value=self.start["prompt"], scale=4,
                                         info="name each subject with a phrase of the prompt")
                self.model = gr.Dropdown(web_trust(self.settings).models(), value=self.start["model"],
                                         label="model preset", scale=1)  # the presets strangers may name
            with gr.Row(equal_height=False):
                with gr.Column(scale=3), gr.Tabs():
                    self.trajectory_tab()
                    self.subjects_tab()
                    self.background_tab()
                    self.camera_tab()
                    self.noise_tab()
                    self.shot_file_tab()
                with gr.Column(scale=2), gr.Tabs():
                    self.render_tab()
                    self.history_tab()
            self.form = {"model": self.model, "prompt": self.prompt, "negative_prompt": self.negative,
                         "seed": self.seed, "steps": self.steps, "guidance_scale": self.guidance,
                         "frames": self.frames, "width": self.width, "height": self.height, "gamma": self.gamma,
                         "cx": self.cx, "cy": self.cy, "refine_face": self.refine_face,
                         "refine_face_strength": self.refine_face_strength,
                         "refine_face_detector": self.refine_face_detector, "refine_tiled": self.refine_tiled,
                         "refine_tiled_strength": self.refine_tiled_strength,
                         "refine_tiled_scale": self.refine_tiled_scale}
            if tuple(self.form) != ev.FORM:
                raise RuntimeError(f"Page.form must name the fields of events.FORM in order, not {tuple(self.form)}")
            with gr.Column(visible=False):  # the API's inputs: the form's stand-ins, all None, and /upload_image's
                self.api_form = {name: _api_twin(c) for name, c in self.form.items()}
                self.api_image = gr.File(label="image", file_types=IMAGE_TYPES, type="filepath")
                self.api_handle = gr.Textbox(label="the image's name for a shot")
            self.wire_views()
            self.wire_trajectory()
            self.wire_subjects()
            self.wire_training()
            self.wire_background()
            self.wire_shot_file()
            self.wire_render()
            demo.load(guarded(ev.gamma_preview_event), inputs_kwargs=self.noise_in,
                      outputs=[self.heat, self.noise_strip], **QUIET)
            demo.load(guarded(ev.gamma_caption_event), inputs_kwargs=self.noise_in, outputs=self.noise_caption,
                      **QUIET)
            demo.load(guarded(self.refresh_views, "preview"), inputs_kwargs=self.views_in, outputs=self.views,
                      **QUIET)
            demo.load(guarded(self.slot_view), inputs_kwargs={"shot_yaml": self.shot_yaml, "slot": self.slot},
                      outputs=list(self.slot_fields.values()), **QUIET)
        return demo

    def trajectory_tab(self):
        import gradio as gr
        from gradio_image_annotation import image_annotator

        labels = tj.subject_labels(self.start_shot)
        last = self.start["frames"] - 1
        with gr.Tab("Trajectory", id="trajectory"):
            gr.Markdown("Pick a subject and a keyframe, press the box tool under the canvas and drag where the "
                        "subject is on that frame. Frames between keyframes follow the interpolated path.")
            with gr.Row():
                self.subject_pick = gr.Dropdown([(lb, i + 1) for i, lb in enumerate(labels)],
                                                value=1 if labels else None, label="subject", scale=2)
                self.frame = gr.Slider(0, max(last, 1), value=0, step=1, label="keyframe", scale=3)
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self.canvas = image_annotator(
                        tj.canvas_value(self.start_shot, 0), label="canvas (boxes of this keyframe)",
                        label_list=labels or ["subject"], label_colors=tj.colours(range(max(1, len(labels)))),
                        use_default_label=True, image_type="numpy", sources=[], box_min_size=6,
                        show_download_button=False, show_clear_button=False, elem_id="canvas")
                with gr.Column(scale=2):
                    self.keyframes = gr.Markdown(tj.keyframes_text(self.default_yaml))
                    with gr.Row():
                        self.clear_key = gr.Button("Clear keyframe", size="sm")
                        self.clear_all = gr.Button("Clear all", size="sm")
                    with gr.Row():
                        self.to_frame = gr.Number(last, precision=0, label="copy box to frame", minimum=0)
                        self.duplicate = gr.Button("Copy", size="sm")
                    with gr.Row():
                        self.preset = gr.Dropdown(list(tj.PATH_PRESETS), value=tj.PATH_PRESETS[0],
                                                  label="path preset")
                        self.apply_preset = gr.Button("Apply path", size="sm")
            with gr.Row():
                self.track_gif = gr.Image(label="interpolated boxes (animated)", type="filepath", interactive=False,
                                          height=200, elem_id="track-gif")
                self.track = gr.Image(label="boxes per frame", interactive=False, elem_id="track-strip")

    def subjects_tab(self):
        import gradio as gr

        with gr.Tab("Subjects", id="subjects"):
            self.subjects_table = gr.Dataframe(sj.subject_rows(self.default_yaml), headers=sj.SUBJECT_COLUMNS,
                                               interactive=False, label="subjects in this shot")
            with gr.Row():
                self.slot = gr.Dropdown(list(range(1, 5)), value=1, label="subject #", scale=1)
                self.phrase = gr.Textbox(label="phrase (words of the prompt)", scale=3)
                self.lib_pick = gr.Dropdown(_library_choices(sj.library_rows()), value=sj.NO_SUBJECT,
                                            label="library subject", scale=2)
            with gr.Row():
                self.reference = gr.Image(label="or a reference image (zero-shot)", type="filepath",
                                          sources=["upload"], height=160)
                self.ref_strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="reference strength")
            # the subject's fields, by the names set_subject_event takes and slot_values gives
            self.slot_fields = {"phrase": self.phrase, "library_subject": self.lib_pick,
                                "reference": self.reference, "strength": self.ref_strength}
            with gr.Row():
                self.set_subject = gr.Button("Set subject")
                self.remove_subject = gr.Button("Remove subject")
            with gr.Accordion("Teach the studio a new subject", open=False,
                              visible=web_trust(self.settings).allows("train")) as self.teach:
                self.training_panel()
            with gr.Accordion("Subject library", open=False):
                self.library = gr.Dataframe(sj.library_rows(), headers=sj.LIBRARY_COLUMNS, interactive=False)
                with gr.Row():
                    self.refresh_lib = gr.Button("Refresh", size="sm")
                    self.delete_lib = gr.Button("Delete the picked library subject", size="sm", variant="stop",
                                                visible=web_trust(self.settings).allows("delete"))

    def training_panel(self):
        import gradio as gr

        start = self.training_start(self.start["model"])
        with gr.Row():
            self.train_name = gr.Textbox(label="name", placeholder="rex")
            self.train_phrase = gr.Textbox(label="trigger and class word", placeholder="sks dog")
            self.method = gr.Radio(["lora", "tokens", "both"], value=start["method"], label="method")
            self.train_steps = gr.Number(None, precision=0, minimum=1, maximum=5000,
                                         label=f"steps (empty: the model's default, {start['steps']})")
        self.method_note = gr.Markdown(start["note"])
        self.photos = gr.File(label="photos (1-10)", file_count="multiple", file_types=IMAGE_TYPES, type="filepath")
        self.masks_view = gr.Gallery(label="automatic masks (subject tinted)", columns=5, height=200)
        with gr.Row():
            self.mask_for = gr.Number(1, precision=0, minimum=1, maximum=10, label="replace mask of photo")
            self.mask_file = gr.File(label="mask (white = subject)", file_types=IMAGE_TYPES, type="filepath")
            self.replace_mask = gr.Button("Replace mask", size="sm")
        with gr.Row():
            self.train = gr.Button("Train subject", variant="primary")
            self.cancel_train = gr.Button("Cancel training")
        self.train_status = gr.Markdown()
        self.loss_plot = gr.LinePlot(x="step", y="loss", label="training loss", height=200)

    def background_tab(self):
        import gradio as gr

        with gr.Tab("Background", id="background"):
            with gr.Row():
                self.bg_image = gr.Image(label="background reference", type="filepath", sources=["upload"],
                                         height=240)
                self.bg_preview = gr.Image(label="as the model sees it (with the first boxes)", interactive=False,
                                           height=240)
            self.bg_strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="background strength")
            self.bg_clear = gr.Button("Remove background")

    def camera_tab(self):
        import gradio as gr

        with gr.Tab("Camera", id="camera"):
            with gr.Row():
                self.cx = gr.Slider(-1.0, 1.0, value=self.start["cx"], step=0.05, label="camera pan cx",
                                    info="fraction of the width travelled; > 0 pans right (content moves left)")
                self.cy = gr.Slider(-1.0, 1.0, value=self.start["cy"], step=0.05, label="camera pan cy",
                                    info="> 0 pans down (content moves up)")
            with gr.Row():
                self.pan_gif = gr.Image(label="the pan (animated)", type="filepath", interactive=False, height=200)
                self.pan = gr.Image(label="camera pan per frame", interactive=False)

    def noise_tab(self):
        import gradio as gr

        with gr.Tab("Noise", id="noise"):
            self.gamma = gr.Slider(0.0, 0.99, value=self.start["gamma"], step=0.01, label="noise correlation γ",
                                   elem_id="gamma")
            gr.Markdown(ev.GAMMA_HELP)
            self.noise_caption = gr.Markdown(elem_id="gamma-caption")
            with gr.Row():
                self.heat = gr.Image(label="Cov(noise frame i, noise frame j), as the model gets it", height=180,
                                     interactive=False, elem_id="gamma-heat")
                self.noise_strip = gr.Image(label="sampled noise frames (the model's latent frames)", height=180,
                                            interactive=False)

    def shot_file_tab(self):
        import gradio as gr

        with gr.Tab("Shot file", id="shotfile") as self.shot_tab:
            gr.Markdown("The shot file `studio render` takes: what you make here renders identically headless. "
                        "Edits apply when the editor loses focus.")
            self.shot_yaml = gr.Code(value=self.default_yaml, language="yaml", label="shot file", elem_id="shot-yaml")
            with gr.Row():
                self.upload = gr.File(label="load a shot file", file_types=[".yaml", ".yml"], type="filepath")
                with gr.Column():
                    self.save_name = gr.Textbox(label="file name", placeholder="my-shot")
                    self.save = gr.Button("Save shot file")
                    self.saved = gr.File(label="saved shot file", interactive=False)

    def render_tab(self):
        import gradio as gr

        s = self.start
        with gr.Tab("Render", id="render"):
            self.negative = gr.Textbox(label="negative prompt", value=s["negative_prompt"])
            with gr.Row():
                self.seed = gr.Number(value=s["seed"], precision=0, minimum=0, maximum=ev.MAX_SEED, label="seed",
                                      scale=3)
                self.dice = gr.Button("random", scale=0, min_width=90, elem_id="dice")
                self.steps = gr.Slider(1, 100, value=s["steps"], step=1, label="steps", scale=4)
            rules = ev.preset_rules_event(s["model"])  # the start model's valid frames and sizes (see slider_rules)
            top = _slider_maxima()
            with gr.Row():
                self.guidance = gr.Slider(0.0, 20.0, value=s["guidance_scale"], step=0.5, label="guidance scale")
                self.frames = gr.Slider(rules["frames"]["minimum"], top["frames"], value=s["frames"],
                                        step=rules["frames"]["step"], label="frames", elem_id="frames",
                                        info="snaps to the frame counts the model takes")
            with gr.Row():
                self.width = gr.Slider(rules["size"]["minimum"], top["size"], value=s["width"],
                                       step=rules["size"]["step"], label="width", elem_id="width")
                self.height = gr.Slider(rules["size"]["minimum"], top["size"], value=s["height"],
                                        step=rules["size"]["step"], label="height", elem_id="height")
            self.refine_panel()
            with gr.Row():
                self.render_btn = gr.Button("Render", variant="primary", elem_id="render")
                self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            self.status = gr.Markdown(elem_id="status")
            self.video = gr.Video(label="video", autoplay=True, loop=True, interactive=False, height=320,
                                  elem_id="video")
            self.downloads = gr.File(label="downloads: MP4, GIF, PNG frames (zip), shot file, sidecar",
                                     file_count="multiple", interactive=False)

    def refine_panel(self):
        import gradio as gr

        s = self.start
        with gr.Group():
            gr.Markdown("**Refinement** after the render: video-to-video passes with the same model and prompt "
                        "(Magic-Me's Face VCD and Tiled VCD; `refine.face`, `refine.tiled` in the shot file).",
                        padding=True)
            with gr.Row():
                self.refine_face = gr.Checkbox(s["refine_face"], label="Face VCD", scale=1, elem_id="refine-face",
                                               info="re-denoise each face's crop over all frames")
                self.refine_face_strength = gr.Slider(0.0, 1.0, value=s["refine_face_strength"], step=0.05,
                                                      label="face strength", scale=2)
                self.refine_face_detector = gr.Dropdown(
                    list(shotlib.FACE_DETECTORS), value=s["refine_face_detector"], label="face detector", scale=2,
                    info="boxes: the subjects' box tracks (any model, and OpenCV builds without face cascades)")
            with gr.Row():
                self.refine_tiled = gr.Checkbox(s["refine_tiled"], label="Tiled VCD", scale=1,
                                                elem_id="refine-tiled", info="upscale, then re-denoise in tiles")
                self.refine_tiled_strength = gr.Slider(0.0, 1.0, value=s["refine_tiled_strength"], step=0.05,
                                                       label="tiled strength", scale=2)
                self.refine_tiled_scale = gr.Slider(1, 4, value=s["refine_tiled_scale"], step=1,
                                                    label="tiled scale (video size ×)", scale=2)

    def history_tab(self):
        import gradio as gr

        with gr.Tab("History", id="history") as self.history_tab_item:
            self.history_table = gr.Dataframe([], headers=ev.HISTORY_COLUMNS, interactive=False,
                                              label="this session's renders", elem_id="history-table")
            with gr.Row():
                self.pick = gr.Number(1, precision=0, minimum=1, label="render #")
                self.load_back = gr.Button("Load this render's shot")

    # --- previews and the canvas, which follow the shot --------------------------------------------------------

    @property
    def views(self):
        return [self.track_gif, self.track, self.pan_gif, self.pan, self.keyframes, self.subjects_table,
                self.subject_pick, self.frame, self.bg_preview]

    @property
    def views_in(self) -> dict:
        return self.with_form(shot_yaml=self.shot_yaml, first_frame=self.first_frame)

    @property
    def canvas_in(self) -> dict:
        return self.with_form(shot_yaml=self.shot_yaml, frame=self.frame, subject=self.subject_pick,
                              first_frame=self.first_frame)

    def refresh_views(self, shot_yaml, first_frame, **form) -> dict:
        """Every preview, the subject lists and the keyframe slider's range, for the shot as it is now."""
        import gradio as gr

        gif, strip = tj.trajectory_preview_event(shot_yaml, first_frame, **form)
        pan_gif, pan = ev.camera_preview_event(shot_yaml, **form)
        shot = ev.resolved(shot_yaml, **form)
        labels = tj.subject_labels(shot)
        return {self.track_gif: gif, self.track: strip, self.pan_gif: pan_gif, self.pan: pan,
                self.keyframes: tj.keyframes_text(shot_yaml, **form), self.subjects_table: sj.subject_rows(shot_yaml),
                self.subject_pick: gr.update(choices=[(lb, i + 1) for i, lb in enumerate(labels)]),
                self.frame: gr.update(maximum=max(shot.frames - 1, 1)),
                self.bg_preview: sj.background_preview_event(shot_yaml, **form)}

    def canvas_for(self, shot_yaml, frame, subject, first_frame, **form):
        """The canvas for the keyframe, the picked subject's label first."""
        import gradio as gr

        return gr.update(**tj.canvas_event(shot_yaml, frame, subject, first_frame, **form))

    def then_canvas(self, dependency):
        """After an event that changed the shot file: redraw the canvas."""
        dependency.success(guarded(self.canvas_for, "canvas"), inputs_kwargs=self.canvas_in, outputs=self.canvas,
                           **QUIET)

    def wire_views(self):
        """The previews follow the shot file (whatever changed it, a render too) and the form fields they show."""
        refresh = guarded(self.refresh_views, "preview")
        for c in (self.shot_yaml, self.frames, self.cx, self.cy, self.model, self.width, self.height):
            c.change(refresh, inputs_kwargs=self.views_in, outputs=self.views, **QUIET, trigger_mode="always_last")
        self.prompt.blur(refresh, inputs_kwargs=self.views_in, outputs=self.views, **QUIET)
        self.gamma.change(guarded(ev.gamma_preview_event), inputs_kwargs=self.noise_in,
                          outputs=[self.heat, self.noise_strip], api_name="gamma_preview", show_progress="hidden",
                          trigger_mode="always_last")
        for c in (self.model, self.frames):  # the latent frames the model gets follow the model and the length
            c.change(guarded(ev.gamma_preview_event), inputs_kwargs=self.noise_in,
                     outputs=[self.heat, self.noise_strip], **QUIET, trigger_mode="always_last")
        for c in (self.gamma, self.model, self.frames):
            c.change(guarded(ev.gamma_caption_event), inputs_kwargs=self.noise_in, outputs=self.noise_caption,
                     **QUIET, trigger_mode="always_last")

    @property
    def noise_in(self) -> dict:
        return {"gamma": self.gamma, "model": self.model, "frames": self.frames}

    def wire_trajectory(self):
        self.canvas.change(guarded(tj.boxes_event), inputs_kwargs=self.with_form(
            shot_yaml=self.shot_yaml, value=self.canvas, frame=self.frame, subject=self.subject_pick),
            outputs=self.shot_yaml, **QUIET, trigger_mode="always_last")
        canvas = guarded(self.canvas_for, "canvas")
        self.subject_pick.change(canvas, inputs_kwargs=self.canvas_in, outputs=self.canvas, **QUIET)
        self.frame.change(canvas, inputs_kwargs=self.canvas_in, outputs=self.canvas, **QUIET,
                          trigger_mode="always_last")

        def clear_all_keyframes(shot_yaml, subject, **form):
            return tj.clear_keyframe_event(shot_yaml, frame=None, subject=subject, every_frame=True, **form)

        picked = dict(shot_yaml=self.shot_yaml, subject=self.subject_pick)
        actions = [  # button, event, its inputs besides the form
            (self.clear_key, tj.clear_keyframe_event, {**picked, "frame": self.frame}),
            (self.clear_all, clear_all_keyframes, picked),
            (self.duplicate, tj.duplicate_keyframe_event, {**picked, "frame": self.frame, "to_frame": self.to_frame}),
            (self.apply_preset, tj.path_preset_event, {**picked, "preset": self.preset}),
        ]
        for button, event, inputs in actions:
            self.then_canvas(button.click(guarded(event), inputs_kwargs=self.with_form(**inputs),
                                          outputs=self.shot_yaml, **QUIET))

    # --- subjects, training, background ---------------------------------------------------------------------------

    def slot_view(self, shot_yaml, slot) -> dict:
        """The subject fields of the picked slot."""
        return {self.slot_fields[name]: v for name, v in sj.slot_values(shot_yaml, slot).items()}

    def library_views(self) -> dict:
        """The library table and the library-subject choices, from one read of the library."""
        import gradio as gr

        rows = sj.library_rows()
        return {self.library: rows, self.lib_pick: gr.update(choices=_library_choices(rows))}

    def wire_subjects(self):
        slot = {"shot_yaml": self.shot_yaml, "slot": self.slot}
        self.slot.change(guarded(self.slot_view), inputs_kwargs=slot, outputs=list(self.slot_fields.values()),
                         **QUIET)
        self.then_canvas(self.set_subject.click(guarded(sj.set_subject_event),
                                                inputs_kwargs=self.with_form(**slot, **self.slot_fields),
                                                outputs=self.shot_yaml, **QUIET))
        self.then_canvas(self.remove_subject.click(guarded(sj.remove_subject_event), inputs_kwargs=slot,
                                                   outputs=self.shot_yaml, **QUIET))
        library = [self.library, self.lib_pick]
        self.refresh_lib.click(guarded(self.library_views, "library"), outputs=library, **QUIET)

        def delete_library_subject(name):
            sj.delete_subject_event(name, manager=self.manager)
            return self.library_views()

        self.delete_lib.click(guarded(delete_library_subject), inputs_kwargs={"name": self.lib_pick},
                              outputs=library, **QUIET)

    @staticmethod
    def training_start(model: str) -> dict:
        """The training panel's method, steps and method line for a model (sj.training_defaults; the CLI resolves
        the same table); blanks for a model that cannot be read."""
        try:
            return sj.training_defaults(model)
        except Exception as e:  # noqa: BLE001 - a custom preset the page cannot read: no defaults to show
            logger.info("training defaults of %r: %s", model, e)
            return {"method": None, "steps": None, "note": ""}

    def wire_training(self):
        import gradio as gr

        def on_model(model):  # another model: its training defaults and the line saying why
            d = self.training_start(model)
            return {self.method: d["method"], self.method_note: d["note"],
                    self.train_steps: gr.Number(label=f"steps (empty: the model's default, {d['steps']})")}

        self.model.change(guarded(on_model, "model preset"), inputs_kwargs={"model": self.model},
                          outputs=[self.method, self.method_note, self.train_steps], **QUIET)

        self.photos.upload(guarded(sj.photos_event), inputs_kwargs={"files": self.photos, "phrase": self.train_phrase},
                           outputs=[self.photo_set, self.masks_view], api_visibility="private")
        self.replace_mask.click(guarded(sj.replace_mask_event), inputs_kwargs={
            "photo_set": self.photo_set, "number": self.mask_for, "mask_path": self.mask_file},
            outputs=[self.photo_set, self.masks_view], api_visibility="private")
        settings = {"photo_set": self.photo_set, "name": self.train_name, "phrase": self.train_phrase,
                    "method": self.method, "steps": self.train_steps, "model": self.model}

        def train(request: gr.Request, progress=gr.Progress(), **settings):
            trust.current().require("train")
            yield from self.train_progress(settings, _session(request), progress)

        self.train.click(guarded(train, "training"), inputs_kwargs=settings,
                         outputs=[self.train_status, self.loss_plot, self.library, self.lib_pick],
                         concurrency_limit=1, concurrency_id="gpu", api_visibility="private")
        self.cancel_train.click(self.canceller("train"), outputs=self.train_status, queue=False,
                                api_visibility="private")

    def canceller(self, kind: str):
        """The Cancel button's event for jobs of that kind ("render" or "train") in the clicking session."""
        import gradio as gr

        def cancel(request: gr.Request) -> str:
            return "cancelling…" if self.jobs.cancel(_session(request), kind) else "nothing to cancel"

        return cancel

    def train_progress(self, settings: dict, session: str, progress):
        """Train in a worker thread; yield the status and loss curve as new losses come, the library at the end."""
        import pandas as pd

        losses, out, failed = [], {}, []
        policy = trust.current()  # the training thread (and a ZeroGPU worker) gets the caller's policy explicitly

        def on_step(i, n, loss, left, stage="training"):
            if stage == "preservation":  # the frozen model makes its preservation clips first (once per model)
                progress((i, n), desc=f"preservation clip {i}/{n}")
                return
            losses.append((i, float(loss)))
            progress((i, n), desc=f"training: loss {loss:.4f}, {left:.0f} s left")

        with self.jobs.running(session, "train", on_step, self.manager) as job:
            def work():
                try:
                    out["subject"], out["result"] = train_job(job.key, settings, policy)
                except Exception as e:  # raised again below, in the event (guarded shows and logs it)
                    failed.append(e)

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            shown = 0
            while worker.is_alive():
                worker.join(TRAIN_POLL_S)
                if len(losses) > shown:
                    shown = len(losses)
                    i, loss = losses[-1]
                    yield {self.train_status: f"step {i}: loss {loss:.4f}",
                           self.loss_plot: pd.DataFrame(losses, columns=["step", "loss"])}
        if failed:
            raise failed[0]
        subject, result = out["subject"], out["result"]
        yield {self.train_status: f"**{subject.name}** trained ({', '.join(subject.methods)}) in "
                                  f"{result.seconds:.0f} s; put it in a shot with the phrase '{subject.class_word}' "
                                  f"and library subject '{subject.name}'.",
               self.loss_plot: pd.DataFrame(losses, columns=["step", "loss"]), **self.library_views()}

    def wire_background(self):
        import gradio as gr

        def set_strength(shot_yaml, image, strength):
            return sj.set_background_event(shot_yaml, image, strength) if image else shot_yaml

        def remove_background(shot_yaml, strength):
            return sj.set_background_event(shot_yaml, None, strength)

        inputs = {"shot_yaml": self.shot_yaml, "image": self.bg_image, "strength": self.bg_strength}
        self.then_canvas(self.bg_image.upload(guarded(sj.set_background_event), inputs_kwargs=inputs,
                                              outputs=self.shot_yaml, **QUIET))
        self.bg_strength.release(guarded(set_strength, "background strength"), inputs_kwargs=inputs,
                                 outputs=self.shot_yaml, **QUIET)
        cleared = self.bg_clear.click(guarded(remove_background), inputs_kwargs={
            "shot_yaml": self.shot_yaml, "strength": self.bg_strength}, outputs=self.shot_yaml, **QUIET)
        self.then_canvas(cleared.success(lambda: gr.update(value=None), outputs=self.bg_image, **QUIET))

    # --- shot file and render -------------------------------------------------------------------------------------

    def to_form(self, shot_yaml) -> dict:
        """The form's components, filled from a shot file."""
        return {self.form[name]: v for name, v in ev.form_values(shot_yaml).items()}

    def wire_shot_file(self):
        import gradio as gr

        to_form = guarded(self.to_form, "shot file")
        form = list(self.form.values())
        loaded = self.upload.upload(guarded(ev.load_shot_event), inputs_kwargs={"path": self.upload},
                                    outputs=self.shot_yaml, api_name="load_shot")
        self.then_canvas(loaded.success(to_form, inputs_kwargs={"shot_yaml": self.shot_yaml}, outputs=form,
                                        **QUIET))
        self.then_canvas(self.shot_yaml.blur(to_form, inputs_kwargs={"shot_yaml": self.shot_yaml}, outputs=form,
                                             **QUIET))
        self.shot_tab.select(guarded(ev.apply_form_event), inputs_kwargs=self.with_form(shot_yaml=self.shot_yaml),
                             outputs=self.shot_yaml, **QUIET)
        save = guarded(ev.save_shot_event)
        named = {"shot_yaml": self.shot_yaml, "name": self.save_name}
        self.save.click(save, inputs_kwargs=self.with_form(**named), outputs=self.saved, api_name="save_shot_form",
                        api_visibility="private")
        gr.on([], guarded(_not_sent(ev.save_shot_event)), inputs_kwargs={**named, **self.api_form}, outputs=self.saved,
              api_name="save_shot")

    def wire_render(self):
        import gradio as gr

        picked = ["frames", "width", "height", "steps", "guidance_scale"]

        def on_model(model):  # a model picked by the user brings its own size, length and steps
            return {self.form[k]: v for k, v in ev.preset_defaults_event(model).items()}

        self.model.input(guarded(on_model, "model preset"), inputs_kwargs={"model": self.model},
                         outputs=[self.form[k] for k in picked], **QUIET)
        sized = [self.frames, self.width, self.height]
        # the sliders take the model's steps (frames 4k+1 on Wan, sizes its multiple), however the model changed
        self.model.change(guarded(self.slider_rules, "model preset"), inputs_kwargs={"model": self.model},
                          outputs=sized, **QUIET)
        # a value typed into a slider's box (or left over from another model) moves to the nearest valid one
        for c in sized:
            c.input(guarded(self.snap, "frames and size"), inputs_kwargs={
                "model": self.model, "frames": self.frames, "width": self.width, "height": self.height},
                outputs=sized, **QUIET, trigger_mode="always_last")
        self.dice.click(random_seed, outputs=self.seed, api_visibility="private")
        def render(shot_yaml, history, request: gr.Request, progress=gr.Progress(), **form):
            return self.render(shot_yaml, history, _session(request), progress, **form)

        outputs = [self.video, self.downloads, self.shot_yaml, self.status, self.history, self.history_table,
                   self.first_frame]
        rendered = self.render_btn.click(
            guarded(render), inputs_kwargs=self.with_form(shot_yaml=self.shot_yaml, history=self.history),
            outputs=outputs, api_name="render_form", api_visibility="private", concurrency_limit=1,
            concurrency_id="gpu")
        # the API's /render: the form's values from the stand-ins (None unless the client sends them)
        gr.on([], guarded(_not_sent(render)), inputs_kwargs={"shot_yaml": self.shot_yaml, "history": self.history,
                                                             **self.api_form},
              outputs=outputs, api_name="render", concurrency_limit=1, concurrency_id="gpu")
        gr.on([], guarded(ev.upload_image_event), inputs_kwargs={"image": self.api_image}, outputs=self.api_handle,
              api_name="upload_image")
        self.then_canvas(rendered)  # the new first frame behind the boxes; the previews follow the shot file's change
        self.cancel_btn.click(self.canceller("render"), outputs=self.status, queue=False, api_visibility="private")

        # the History tab says, whenever it is opened, which renders' weights changed since
        self.history_tab_item.select(guarded(ev.history_rows, "history"), inputs_kwargs={"history": self.history},
                                     outputs=self.history_table, **QUIET)

        def load_back(history, number):
            h = ev.history_entry(history, number)
            return {self.shot_yaml: h["shot_yaml"], self.video: h["video"], **self.to_form(h["shot_yaml"])}

        self.then_canvas(self.load_back.click(guarded(load_back, "history"), inputs_kwargs={
            "history": self.history, "number": self.pick}, outputs=[self.shot_yaml, self.video, *self.form.values()],
            **QUIET))

    def slider_rules(self, model) -> dict:
        """The frames and size sliders' ranges and steps for a model preset (values unchanged)."""
        import gradio as gr

        rules = ev.preset_rules_event(model)
        # the slider's grid is minimum + k·step, so the minimum is the model's; the maximum stays the widest
        # preset's, so that a value of the next model is never out of bounds while the ranges catch up (snapping
        # moves a value past the model's own maximum back to it)
        frames, size = ({"minimum": rules[k]["minimum"], "step": rules[k]["step"]} for k in ("frames", "size"))
        return {self.frames: gr.update(**frames), self.width: gr.update(**size), self.height: gr.update(**size)}

    def snap(self, model, frames, width, height) -> dict:
        """frames, width and height moved to the nearest values the model takes (unchanged ones skipped)."""
        import gradio as gr

        snapped = ev.snap_event(model, frames=frames, width=width, height=height)
        now = {"frames": frames, "width": width, "height": height}
        return {self.form[k]: gr.skip() if now[k] is None or v == now[k] else v for k, v in snapped.items()}

    def render(self, shot_yaml, history, session: str, progress, **form) -> dict:
        """The Render button: the shot on the GPU side, progress per step labelled by stage, Cancel by session.

        The shot is checked here first (trust: permission, names, caps), so a refused one never asks for the GPU;
        the GPU side checks it again under the same policy."""
        def report(i, n, stage):
            progress((i, n), desc=stage)

        ev.render_ready(shot_yaml, **form)
        policy = trust.current()
        with self.jobs.running(session, "render", report, self.manager) as job:
            try:
                r = render_job(job.key, shot_yaml, form, policy)
            except ev.Cancelled as e:  # not an error: the outputs keep the last render
                return {self.status: f"{e}."}
        history = history + [r.entry]
        return {self.video: r.video, self.downloads: r.downloads, self.shot_yaml: r.shot_yaml, self.status: r.status,
                self.history: history, self.history_table: ev.history_rows(history), self.first_frame: r.first_frame}


def _slider_maxima() -> dict:
    """The largest frame count and size of any model preset: the frames and size sliders' maximum."""
    from studio.presets import list_model_presets

    rules = [ev.preset_rules_event(m) for m in list_model_presets()]
    return {k: max(r[k]["maximum"] for r in rules) for k in ("frames", "size")}


def _not_sent(fn):
    """fn with a signature that names every form field, defaulting to None: Gradio then advertises None ("not
    sent") for each, and gradio_client fills a left-out value with it (fn itself takes them as **form)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ev.FORM]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__signature__ = sig.replace(parameters=params)
    return call


def _api_twin(component):
    """A hidden stand-in of a form component for the API: the same kind of value and label, its value None."""
    import gradio as gr

    kw = dict(label=component.label, value=None)
    if isinstance(component, gr.Checkbox):  # a Checkbox's value cannot be None
        return gr.Radio([True, False], **kw)
    if isinstance(component, gr.Dropdown):
        return gr.Dropdown(component.choices, **kw)
    if isinstance(component, (gr.Slider, gr.Number)):  # a Slider's value cannot be None
        return gr.Number(**kw)
    return gr.Textbox(**kw)


def build_app(manager=None):
    """The Blocks app. One pipeline manager for every event; one GPU job (render or training) at a time."""
    return Page(manager or engine.default_manager()).build()


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False,
           manager=None, quiet: bool = False, threads=None):
    """Start the studio; files are served only from its output folder; uploads at most MAX_UPLOAD; at most
    SHOT_STUDIO_MAX_QUEUE jobs wait in the queue. `threads`: torch CPU threads (studio.threads; None: as already
    chosen in this process, else SHOT_STUDIO_THREADS or auto)."""
    from studio import threads as threadlib

    settings = Settings.from_env()  # a bad SHOT_STUDIO_* value stops the start, naming the variable
    if threads is not None or threadlib.current() is None:
        threadlib.apply(threads)
    demo = build_app(manager)
    demo.queue(default_concurrency_limit=1, max_size=settings.max_queue or None)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ev.output_dir())],
                       max_file_size=MAX_UPLOAD, prevent_thread_lock=prevent_thread_lock, footer_links=["api"],
                       quiet=quiet)
