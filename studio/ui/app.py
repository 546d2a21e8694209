"""The page: a Gradio Blocks layout wired to the event functions of studio.ui.events / trajectory / subjects.

Left, the tabs that direct the shot (Trajectory, Subjects, Background, Camera, Noise, Shot file); right, the
Render and History tabs. One pipeline manager serves every event; renders and subject training share one queue
slot ("gpu"), so one GPU job runs at a time. Input problems become Gradio messages naming the field.

The form's components travel as named values: `Page.form` maps the names of events.FORM to components, and each
handler turns the values back into that mapping (`named`) before calling an event function.
"""

import functools
import logging
import threading
import time

from studio import engine
from studio.ui import events as ev, subjects as sj, trajectory as tj
from studio.ui.gpu import RENDER_SECONDS, TRAIN_SECONDS, gpu

logger = logging.getLogger(__name__)

MAX_UPLOAD = "20mb"
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp"]
QUIET = dict(show_progress="hidden", api_visibility="private")  # internal events: no spinner, not in the API
TRAIN_POLL_S = 0.5  # how often the training event reports the loss


def guarded(fn):
    """fn with UserError shown as a Gradio message (no stack trace in the page)."""
    import gradio as gr

    @functools.wraps(fn)  # keeps the signature: Gradio still sees gr.Request / gr.Progress parameters
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ev.UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return run


def named(values) -> dict:
    """The form's values (in events.FORM order) as a mapping of names."""
    return dict(zip(ev.FORM, values))


class Jobs:
    """Per-session cancel flags for the running render or training."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            self._events[session] = threading.Event()
            return self._events[session]

    def cancel(self, session: str) -> bool:
        with self._lock:
            e = self._events.get(session)
        if e is None:
            return False
        e.set()
        return True


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


class Page:
    """The studio's components (attributes) and the wiring of their events."""

    def __init__(self, manager):
        self.manager = manager
        self.jobs = Jobs()
        self.default_yaml = ev.default_shot_yaml()
        self.start = ev.form_values(self.default_yaml)
        self.start_shot = ev.resolved(self.default_yaml)
        self.render_on_gpu = gpu(RENDER_SECONDS)(self._render)
        self.train_on_gpu = gpu(TRAIN_SECONDS)(self._train)

    def _render(self, shot_yaml, form, progress, cancel):
        return ev.render_event(shot_yaml, **form, progress=progress, manager=self.manager, cancel=cancel)

    def _train(self, photo_set, name, phrase, method, steps, model, progress, cancel):
        return sj.train_subject(photo_set, name, phrase, method, steps, model, progress=progress, cancel=cancel,
                                manager=self.manager)

    # --- layout ---------------------------------------------------------------------------------------------------

    def build(self):
        import gradio as gr

        with gr.Blocks(title="Shot Studio", fill_width=True) as demo:
            gr.Markdown("# Shot Studio\nDirect a short video: where each subject goes (Trajectory), who they are "
                        "(Subjects), the background, the camera pan and the noise correlation γ; then **Render**. "
                        "The page opens on a ready shot on the embedded toy-world model: press Render.")
            self.history, self.first_frame, self.photo_set = gr.State([]), gr.State(None), gr.State([])
            with gr.Row():
                self.prompt = gr.Textbox(label="prompt", value=self.start["prompt"], scale=4,
                                         info="name each subject with a phrase of the prompt")
                self.model = gr.Dropdown(_model_choices(), value=self.start["model"], label="model preset", scale=1)
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
                         "cx": self.cx, "cy": self.cy}
            self.form_list = [self.form[k] for k in ev.FORM]
            self.wire_views()
            self.wire_trajectory()
            self.wire_subjects()
            self.wire_training()
            self.wire_background()
            self.wire_shot_file()
            self.wire_render()
            demo.load(guarded(ev.gamma_preview_event), self.gamma, [self.heat, self.noise_strip], **QUIET)
            demo.load(guarded(self.refresh_views), self.views_in, self.views, **QUIET)
            demo.load(guarded(sj.slot_values), [self.shot_yaml, self.slot], self.slot_fields, **QUIET)
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
                        label_list=labels or ["subject"], label_colors=_colours(range(max(1, len(labels)))),
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
                self.lib_pick = gr.Dropdown([sj.NO_SUBJECT] + sj.library_names(), value=sj.NO_SUBJECT,
                                            label="library subject", scale=2)
            with gr.Row():
                self.reference = gr.Image(label="or a reference image (zero-shot)", type="filepath",
                                          sources=["upload"], height=160)
                self.ref_strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="reference strength")
            self.slot_fields = [self.phrase, self.lib_pick, self.reference, self.ref_strength]
            with gr.Row():
                self.set_subject = gr.Button("Set subject")
                self.remove_subject = gr.Button("Remove subject")
            with gr.Accordion("Teach the studio a new subject", open=False):
                self.training_panel()
            with gr.Accordion("Subject library", open=False):
                self.library = gr.Dataframe(sj.library_rows(), headers=sj.LIBRARY_COLUMNS, interactive=False)
                with gr.Row():
                    self.refresh_lib = gr.Button("Refresh", size="sm")
                    self.delete_lib = gr.Button("Delete the picked library subject", size="sm", variant="stop")

    def training_panel(self):
        import gradio as gr

        with gr.Row():
            self.train_name = gr.Textbox(label="name", placeholder="rex")
            self.train_phrase = gr.Textbox(label="trigger and class word", placeholder="sks dog")
            self.method = gr.Radio(["lora", "tokens", "both"], value="lora", label="method")
            self.train_steps = gr.Number(None, precision=0, minimum=1, maximum=5000,
                                         label="steps (empty: the model's default)")
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
            with gr.Row():
                self.heat = gr.Image(label="Cov(frame i, frame j)", height=180, interactive=False,
                                     elem_id="gamma-heat")
                self.noise_strip = gr.Image(label="sampled noise frames", height=180, interactive=False)

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
            with gr.Row():
                self.guidance = gr.Slider(0.0, 20.0, value=s["guidance_scale"], step=0.5, label="guidance scale")
                self.frames = gr.Slider(1, 32, value=s["frames"], step=1, label="frames")
            with gr.Row():
                self.width = gr.Number(s["width"], precision=0, minimum=8, step=8, label="width")
                self.height = gr.Number(s["height"], precision=0, minimum=8, step=8, label="height")
            with gr.Row():
                self.render_btn = gr.Button("Render", variant="primary", elem_id="render")
                self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            self.status = gr.Markdown(elem_id="status")
            self.video = gr.Video(label="video", autoplay=True, loop=True, interactive=False, height=320,
                                  elem_id="video")
            self.downloads = gr.File(label="downloads: MP4, GIF, PNG frames (zip), shot file, sidecar",
                                     file_count="multiple", interactive=False)

    def history_tab(self):
        import gradio as gr

        with gr.Tab("History", id="history"):
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
    def views_in(self):
        return [self.shot_yaml, self.first_frame] + self.form_list

    @property
    def canvas_in(self):
        return [self.shot_yaml, self.frame, self.subject_pick, self.first_frame] + self.form_list

    def refresh_views(self, shot_yaml, first_frame, *values):
        """Every preview, the subject lists and the keyframe slider's range, for the shot as it is now."""
        import gradio as gr

        f = named(values)
        gif, strip = tj.trajectory_preview_event(shot_yaml, first_frame, **f)
        pan_gif, pan = ev.camera_preview_event(shot_yaml, f["model"], f["prompt"], f["frames"], f["cx"], f["cy"],
                                               f["width"], f["height"])
        shot = ev.resolved(shot_yaml, **f)
        labels = tj.subject_labels(shot)
        return (gif, strip, pan_gif, pan, tj.keyframes_text(shot_yaml, **f), sj.subject_rows(shot_yaml),
                gr.update(choices=[(lb, i + 1) for i, lb in enumerate(labels)]),
                gr.update(maximum=max(shot.frames - 1, 1)), sj.background_preview_event(shot_yaml, **f))

    def canvas_for(self, shot_yaml, frame, pick, first_frame, *values):
        """The canvas for the keyframe; the picked subject's label first, so a new box takes it."""
        import gradio as gr

        shot = ev.resolved(shot_yaml, **named(values))
        labels = tj.subject_labels(shot)
        order = list(range(len(labels)))
        k = int(pick or 1) - 1
        if 0 <= k < len(order):
            order.insert(0, order.pop(k))
        frame = min(int(frame or 0), shot.frames - 1)
        return gr.update(value=tj.canvas_value(shot, frame, first_frame),
                         label_list=[labels[i] for i in order] or ["subject"], label_colors=_colours(order or [0]))

    def then_canvas(self, dependency):
        """After an event that changed the shot file: redraw the canvas."""
        dependency.success(guarded(self.canvas_for), self.canvas_in, self.canvas, **QUIET)

    def wire_views(self):
        refresh = guarded(self.refresh_views)
        self.shot_yaml.change(refresh, self.views_in, self.views, **QUIET, trigger_mode="always_last")
        for c in (self.frames, self.cx, self.cy, self.model, self.width, self.height):
            c.change(refresh, self.views_in, self.views, **QUIET, trigger_mode="always_last")
        self.prompt.blur(refresh, self.views_in, self.views, **QUIET)
        self.gamma.change(guarded(ev.gamma_preview_event), self.gamma, [self.heat, self.noise_strip],
                          api_name="gamma_preview", show_progress="hidden", trigger_mode="always_last")

    def wire_trajectory(self):
        def on_boxes(shot_yaml, value, frame, pick, *values):
            return tj.boxes_event(shot_yaml, value, frame, pick, **named(values))

        self.canvas.change(guarded(on_boxes), [self.shot_yaml, self.canvas, self.frame, self.subject_pick]
                           + self.form_list, self.shot_yaml, **QUIET, trigger_mode="always_last")
        self.subject_pick.change(guarded(self.canvas_for), self.canvas_in, self.canvas, **QUIET)
        self.frame.change(guarded(self.canvas_for), self.canvas_in, self.canvas, **QUIET, trigger_mode="always_last")
        actions = {  # button -> event(shot file, keyframe, subject, copy-to frame, preset, **form)
            self.clear_key: lambda y, f, p, t, pr, **kw: tj.clear_keyframe_event(y, f, p, **kw),
            self.clear_all: lambda y, f, p, t, pr, **kw: tj.clear_keyframe_event(y, f, p, every_frame=True, **kw),
            self.duplicate: lambda y, f, p, t, pr, **kw: tj.duplicate_keyframe_event(y, f, t, p, **kw),
            self.apply_preset: lambda y, f, p, t, pr, **kw: tj.path_preset_event(y, pr, p, **kw),
        }
        inputs = [self.shot_yaml, self.frame, self.subject_pick, self.to_frame, self.preset] + self.form_list
        for button, fn in actions.items():
            def run(shot_yaml, frame, pick, to_frame, preset, *values, fn=fn):
                return fn(shot_yaml, frame, pick, to_frame, preset, **named(values))

            self.then_canvas(button.click(guarded(run), inputs, self.shot_yaml, **QUIET))

    # --- subjects, training, background ---------------------------------------------------------------------------

    def library_views(self):
        import gradio as gr

        return sj.library_rows(), gr.update(choices=[sj.NO_SUBJECT] + sj.library_names())

    def wire_subjects(self):
        self.slot.change(guarded(sj.slot_values), [self.shot_yaml, self.slot], self.slot_fields, **QUIET)

        def on_set(shot_yaml, slot, phrase, library_subject, reference, strength, *values):
            return sj.set_subject_event(shot_yaml, slot, phrase, library_subject, reference, strength,
                                        **named(values))

        self.then_canvas(self.set_subject.click(guarded(on_set), [self.shot_yaml, self.slot] + self.slot_fields
                                                + self.form_list, self.shot_yaml, **QUIET))
        self.then_canvas(self.remove_subject.click(guarded(sj.remove_subject_event), [self.shot_yaml, self.slot],
                                                   self.shot_yaml, **QUIET))
        self.refresh_lib.click(self.library_views, None, [self.library, self.lib_pick], **QUIET)

        def on_delete(name):
            sj.delete_subject_event(name, manager=self.manager)
            return self.library_views()

        self.delete_lib.click(guarded(on_delete), self.lib_pick, [self.library, self.lib_pick], **QUIET)

    def wire_training(self):
        import gradio as gr

        self.photos.upload(guarded(sj.photos_event), [self.photos, self.train_phrase],
                           [self.photo_set, self.masks_view], api_visibility="private")
        self.replace_mask.click(guarded(sj.replace_mask_event), [self.photo_set, self.mask_for, self.mask_file],
                                [self.photo_set, self.masks_view], api_visibility="private")

        def do_train(photo_set, name, phrase, method, steps, model, request: gr.Request, progress=gr.Progress()):
            yield from self.train_progress(photo_set, name, phrase, method, steps, model, request, progress)

        self.train.click(do_train, [self.photo_set, self.train_name, self.train_phrase, self.method,
                                    self.train_steps, self.model],
                         [self.train_status, self.loss_plot, self.library, self.lib_pick], concurrency_limit=1,
                         concurrency_id="gpu", api_visibility="private")

        def do_cancel_train(request: gr.Request):
            return "cancelling…" if self.jobs.cancel(_session(request)) else "nothing to cancel"

        self.cancel_train.click(do_cancel_train, None, self.train_status, queue=False, api_visibility="private")

    def train_progress(self, photo_set, name, phrase, method, steps, model, request, progress):
        """Train in a worker thread; yield (status, loss curve, library table, library choices) as it goes."""
        import gradio as gr
        import pandas as pd

        cancel = self.jobs.start(_session(request))
        losses, out, err = [], {}, []

        def on_step(i, n, loss, left):
            losses.append((i, float(loss)))
            progress((i, n), desc=f"training: loss {loss:.4f}, {left:.0f} s left")

        def work():
            try:
                out["subject"], out["result"] = self.train_on_gpu(photo_set, name, phrase, method, steps, model,
                                                                  on_step, cancel)
            except ev.UserError as e:
                err.append(str(e))
            except Exception as e:  # one line in the page; the log has the trace
                logger.exception("training failed")
                err.append(f"training failed: {type(e).__name__}: {e}")

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(TRAIN_POLL_S)
            if losses:
                i, loss = losses[-1]
                yield (f"step {i}: loss {loss:.4f}", pd.DataFrame(losses, columns=["step", "loss"]),
                       *self.library_views())
        if err:
            raise gr.Error(err[0], print_exception=False)
        subject, result = out["subject"], out["result"]
        yield (f"**{subject.name}** trained ({', '.join(subject.methods)}) in {result.seconds:.0f} s; put it in a "
               f"shot with the phrase '{subject.class_word}' and library subject '{subject.name}'.",
               pd.DataFrame(losses, columns=["step", "loss"]), *self.library_views())

    def wire_background(self):
        inputs = [self.shot_yaml, self.bg_image, self.bg_strength]
        self.then_canvas(self.bg_image.upload(guarded(sj.set_background_event), inputs, self.shot_yaml, **QUIET))
        self.bg_strength.release(guarded(lambda y, img, s: sj.set_background_event(y, img, s) if img else y),
                                 inputs, self.shot_yaml, **QUIET)
        cleared = self.bg_clear.click(guarded(lambda y, s: sj.set_background_event(y, None, s)),
                                      [self.shot_yaml, self.bg_strength], self.shot_yaml, **QUIET)
        self.then_canvas(cleared.success(lambda: None, None, self.bg_image, **QUIET))

    # --- shot file and render -------------------------------------------------------------------------------------

    @staticmethod
    def to_form(shot_yaml):
        values = ev.form_values(shot_yaml)
        return [values[k] for k in ev.FORM]

    def wire_shot_file(self):
        to_form = guarded(self.to_form)
        loaded = self.upload.upload(guarded(ev.load_shot_event), self.upload, self.shot_yaml, api_name="load_shot")
        self.then_canvas(loaded.success(to_form, self.shot_yaml, self.form_list, **QUIET))
        self.then_canvas(self.shot_yaml.blur(to_form, self.shot_yaml, self.form_list, **QUIET))
        self.shot_tab.select(guarded(lambda y, *v: ev.apply_form_event(y, **named(v))),
                             [self.shot_yaml] + self.form_list, self.shot_yaml, **QUIET)
        self.save.click(guarded(lambda y, name, *v: ev.save_shot_event(y, name, **named(v))),
                        [self.shot_yaml, self.save_name] + self.form_list, self.saved, api_name="save_shot")

    def wire_render(self):
        import gradio as gr

        picked = ["frames", "width", "height", "steps", "guidance_scale"]

        def on_model(model):  # a model picked by the user brings its own size, length and steps
            d = ev.preset_defaults_event(model)
            return [d[k] for k in picked]

        self.model.input(guarded(on_model), self.model, [self.form[k] for k in picked], **QUIET)
        self.dice.click(lambda: int(time.time_ns() % ev.MAX_SEED), outputs=self.seed, api_visibility="private")

        def do_render(shot_yaml, model, prompt, negative_prompt, seed, steps, guidance_scale, frames, width, height,
                      gamma, cx, cy, history, request: gr.Request, progress=gr.Progress()):
            form = dict(model=model, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                        guidance_scale=guidance_scale, frames=frames, width=width, height=height, gamma=gamma,
                        cx=cx, cy=cy)
            cancel = self.jobs.start(_session(request))
            try:
                r = self.render_on_gpu(shot_yaml, form, lambda i, n: progress((i, n), desc="denoising"), cancel)
            except ev.Cancelled as e:  # not an error: the outputs keep the last render
                keep = gr.update()
                return keep, keep, keep, f"{e}.", keep, keep, keep
            history = history + [r.entry]
            return r.video, r.downloads, r.shot_yaml, r.status, history, ev.history_rows(history), r.first_frame

        rendered = self.render_btn.click(
            guarded(do_render), [self.shot_yaml] + self.form_list + [self.history],
            [self.video, self.downloads, self.shot_yaml, self.status, self.history, self.history_table,
             self.first_frame], api_name="render", concurrency_limit=1, concurrency_id="gpu")
        self.then_canvas(rendered)
        rendered.success(guarded(self.refresh_views), self.views_in, self.views, **QUIET)

        def do_cancel(request: gr.Request):
            return "cancelling…" if self.jobs.cancel(_session(request)) else "nothing to cancel"

        self.cancel_btn.click(do_cancel, None, self.status, queue=False, api_visibility="private")

        def on_load_back(history, number):
            h = ev.history_entry(history, number)
            return [h["shot_yaml"], h["video"], *self.to_form(h["shot_yaml"])]

        self.then_canvas(self.load_back.click(guarded(on_load_back), [self.history, self.pick],
                                              [self.shot_yaml, self.video] + self.form_list, **QUIET))


def _model_choices() -> list[str]:
    from studio.presets import list_model_presets

    return list_model_presets()


def _colours(indices) -> list[tuple[int, int, int]]:
    from studio.previews import COLOURS

    return [COLOURS[i % len(COLOURS)] for i in indices]


def build_app(manager=None):
    """The Blocks app. One pipeline manager for every event; one GPU job (render or training) at a time."""
    return Page(manager or engine.default_manager()).build()


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False,
           manager=None, quiet: bool = False):
    """Start the studio; files are served only from its output folder; uploads at most MAX_UPLOAD."""
    demo = build_app(manager)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ev.output_dir())],
                       max_file_size=MAX_UPLOAD, prevent_thread_lock=prevent_thread_lock, footer_links=["api"],
                       quiet=quiet)
