"""The page: a Gradio Blocks layout wired to the event functions of studio.ui.events / trajectory / subjects.

Left, the tabs that direct the shot (Trajectory, Subjects, Background, Camera, Noise, Shot file); right, the
Render and History tabs. One pipeline manager serves every event; renders and subject training share one queue
slot ("gpu"), so one GPU job runs at a time. Input problems become Gradio messages naming the field.
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


def build_app(manager=None):
    """The Blocks app. One pipeline manager for every event; one GPU job (render or training) at a time."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    from studio.presets import list_model_presets
    from studio.previews import COLOURS

    manager = manager or engine.default_manager()
    jobs = Jobs()
    default_yaml = ev.default_shot_yaml()
    start = ev.form_values(default_yaml)
    start_shot = ev.resolved(default_yaml)
    labels = tj.subject_labels(start_shot)

    @gpu(RENDER_SECONDS)
    def render_on_gpu(shot_yaml, form, progress, cancel):
        return ev.render_event(shot_yaml, **form, progress=progress, manager=manager, cancel=cancel)

    @gpu(TRAIN_SECONDS)
    def train_on_gpu(photo_set, name, phrase, method, steps, model, progress, cancel):
        return sj.train_subject(photo_set, name, phrase, method, steps, model, progress=progress, cancel=cancel,
                                manager=manager)

    with gr.Blocks(title="Shot Studio", fill_width=True) as demo:
        gr.Markdown("# Shot Studio\nDirect a short video: where each subject goes (Trajectory), who they are "
                    "(Subjects), the background, the camera pan and the noise correlation γ; then **Render**. "
                    "The page opens on a ready shot on the embedded toy-world model: press Render.")
        history = gr.State([])
        first_frame = gr.State(None)
        photo_set = gr.State([])
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=start["prompt"], scale=4,
                                info="name each subject with a phrase of the prompt")
            model = gr.Dropdown(list_model_presets(), value=start["model"], label="model preset", scale=1)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Tabs():
                    # --- Trajectory ------------------------------------------------------------------------
                    with gr.Tab("Trajectory", id="trajectory"):
                        gr.Markdown("Pick a subject and a keyframe, then drag a box on the canvas. Frames between "
                                    "keyframes follow the interpolated path.")
                        with gr.Row():
                            subject_pick = gr.Dropdown([(lb, i + 1) for i, lb in enumerate(labels)],
                                                       value=1 if labels else None, label="subject", scale=2)
                            frame = gr.Slider(0, start["frames"] - 1, value=0, step=1, label="keyframe", scale=3)
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3):
                                canvas = image_annotator(
                                    tj.canvas_value(start_shot, 0), label="canvas (boxes of this keyframe)",
                                    label_list=labels or ["subject"],
                                    label_colors=[COLOURS[i % len(COLOURS)] for i in range(max(1, len(labels)))],
                                    use_default_label=True, image_type="numpy", sources=[], box_min_size=6,
                                    show_download_button=False, show_clear_button=False, elem_id="canvas")
                            with gr.Column(scale=2):
                                keyframes = gr.Markdown(tj.keyframes_text(default_yaml))
                                with gr.Row():
                                    clear_key = gr.Button("Clear keyframe", size="sm")
                                    clear_all = gr.Button("Clear all", size="sm")
                                with gr.Row():
                                    to_frame = gr.Number(start["frames"] - 1, precision=0, label="copy box to frame",
                                                         minimum=0)
                                    duplicate = gr.Button("Copy", size="sm")
                                with gr.Row():
                                    preset = gr.Dropdown(list(tj.PATH_PRESETS), value=tj.PATH_PRESETS[0],
                                                         label="path preset")
                                    apply_preset = gr.Button("Apply path", size="sm")
                        with gr.Row():
                            track_gif = gr.Image(label="interpolated boxes (animated)", type="filepath",
                                                 interactive=False, height=200, elem_id="track-gif")
                            track = gr.Image(label="boxes per frame", interactive=False, elem_id="track-strip")
                    # --- Subjects --------------------------------------------------------------------------
                    with gr.Tab("Subjects", id="subjects"):
                        subjects_table = gr.Dataframe(sj.subject_rows(default_yaml), headers=sj.SUBJECT_COLUMNS,
                                                      interactive=False, label="subjects in this shot")
                        with gr.Row():
                            slot = gr.Dropdown(list(range(1, 5)), value=1, label="subject #", scale=1)
                            phrase = gr.Textbox(label="phrase (words of the prompt)", scale=3)
                            lib_pick = gr.Dropdown([sj.NO_SUBJECT] + sj.library_names(), value=sj.NO_SUBJECT,
                                                   label="library subject", scale=2)
                        with gr.Row():
                            reference = gr.Image(label="or a reference image (zero-shot)", type="filepath",
                                                 sources=["upload"], height=160)
                            ref_strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="reference strength")
                        with gr.Row():
                            set_subject = gr.Button("Set subject", variant="secondary")
                            remove_subject = gr.Button("Remove subject")
                        with gr.Accordion("Teach the studio a new subject", open=False):
                            with gr.Row():
                                train_name = gr.Textbox(label="name", placeholder="rex")
                                train_phrase = gr.Textbox(label="trigger and class word", placeholder="sks dog")
                                method = gr.Radio(["lora", "tokens", "both"], value="lora", label="method")
                                train_steps = gr.Number(None, precision=0, minimum=1, maximum=5000,
                                                        label="steps (empty: the model's default)")
                            photos = gr.File(label="photos (1-10)", file_count="multiple", file_types=IMAGE_TYPES,
                                             type="filepath")
                            masks_view = gr.Gallery(label="automatic masks (subject tinted)", columns=5, height=200)
                            with gr.Row():
                                mask_for = gr.Number(1, precision=0, minimum=1, maximum=10, label="replace mask of photo")
                                mask_file = gr.File(label="mask (white = subject)", file_types=IMAGE_TYPES,
                                                    type="filepath")
                                replace_mask = gr.Button("Replace mask", size="sm")
                            with gr.Row():
                                train = gr.Button("Train subject", variant="primary")
                                cancel_train = gr.Button("Cancel training")
                            train_status = gr.Markdown()
                            loss_plot = gr.LinePlot(x="step", y="loss", label="training loss", height=200)
                        with gr.Accordion("Subject library", open=False):
                            library = gr.Dataframe(sj.library_rows(), headers=sj.LIBRARY_COLUMNS, interactive=False)
                            with gr.Row():
                                refresh_lib = gr.Button("Refresh", size="sm")
                                delete_lib = gr.Button("Delete the picked library subject", size="sm",
                                                       variant="stop")
                    # --- Background ------------------------------------------------------------------------
                    with gr.Tab("Background", id="background"):
                        with gr.Row():
                            bg_image = gr.Image(label="background reference", type="filepath", sources=["upload"],
                                                height=240)
                            bg_preview = gr.Image(label="as the model sees it (with the first boxes)",
                                                  interactive=False, height=240)
                        bg_strength = gr.Slider(0.0, 3.0, value=1.0, step=0.1, label="background strength")
                        bg_clear = gr.Button("Remove background")
                    # --- Camera ----------------------------------------------------------------------------
                    with gr.Tab("Camera", id="camera"):
                        with gr.Row():
                            cx = gr.Slider(-1.0, 1.0, value=start["cx"], step=0.05, label="camera pan cx",
                                           info="fraction of the width travelled; > 0 pans right (content moves left)")
                            cy = gr.Slider(-1.0, 1.0, value=start["cy"], step=0.05, label="camera pan cy",
                                           info="> 0 pans down (content moves up)")
                        with gr.Row():
                            pan_gif = gr.Image(label="the pan (animated)", type="filepath", interactive=False,
                                               height=200)
                            pan = gr.Image(label="camera pan per frame", interactive=False)
                    # --- Noise -----------------------------------------------------------------------------
                    with gr.Tab("Noise", id="noise"):
                        gamma = gr.Slider(0.0, 0.99, value=start["gamma"], step=0.01, label="noise correlation γ",
                                          elem_id="gamma")
                        gr.Markdown(ev.GAMMA_HELP)
                        with gr.Row():
                            heat = gr.Image(label="Cov(frame i, frame j)", height=180, interactive=False,
                                            elem_id="gamma-heat")
                            noise_strip = gr.Image(label="sampled noise frames", height=180, interactive=False)
                    # --- Shot file -------------------------------------------------------------------------
                    with gr.Tab("Shot file", id="shotfile") as shot_tab:
                        gr.Markdown("The shot file `studio render` takes: what you make here renders identically "
                                    "headless. Edits apply when the editor loses focus.")
                        shot_yaml = gr.Code(value=default_yaml, language="yaml", label="shot file", elem_id="shot-yaml")
                        with gr.Row():
                            upload = gr.File(label="load a shot file", file_types=[".yaml", ".yml"], type="filepath")
                            with gr.Column():
                                save_name = gr.Textbox(label="file name", placeholder="my-shot")
                                save = gr.Button("Save shot file")
                                saved = gr.File(label="saved shot file", interactive=False)
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Render", id="render"):
                        negative = gr.Textbox(label="negative prompt", value=start["negative_prompt"])
                        with gr.Row():
                            seed = gr.Number(value=start["seed"], precision=0, minimum=0, maximum=ev.MAX_SEED,
                                             label="seed", scale=3)
                            dice = gr.Button("random", scale=0, min_width=90, elem_id="dice")
                            steps = gr.Slider(1, 100, value=start["steps"], step=1, label="steps", scale=4)
                        with gr.Row():
                            guidance = gr.Slider(0.0, 20.0, value=start["guidance_scale"], step=0.5,
                                                 label="guidance scale")
                            frames = gr.Slider(1, 32, value=start["frames"], step=1, label="frames")
                        with gr.Row():
                            width = gr.Number(start["width"], precision=0, minimum=8, step=8, label="width")
                            height = gr.Number(start["height"], precision=0, minimum=8, step=8, label="height")
                        with gr.Row():
                            render_btn = gr.Button("Render", variant="primary", elem_id="render")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        status = gr.Markdown(elem_id="status")
                        video = gr.Video(label="video", autoplay=True, loop=True, interactive=False, height=320,
                                         elem_id="video")
                        downloads = gr.File(label="downloads: MP4, GIF, PNG frames (zip), shot file, sidecar",
                                            file_count="multiple", interactive=False)
                    with gr.Tab("History", id="history"):
                        history_table = gr.Dataframe([], headers=ev.HISTORY_COLUMNS, interactive=False,
                                                     label="this session's renders", elem_id="history-table")
                        with gr.Row():
                            pick = gr.Number(1, precision=0, minimum=1, label="render #")
                            load_back = gr.Button("Load this render's shot")

        form = {"model": model, "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps,
                "guidance_scale": guidance, "frames": frames, "width": width, "height": height, "gamma": gamma,
                "cx": cx, "cy": cy}
        form_in = [form[k] for k in ev.FORM]
        form_out = [form[k] for k in ev.FORM]

        def named(values) -> dict:
            return dict(zip(ev.FORM, values))

        quiet = dict(show_progress="hidden", api_visibility="private")

        # --- previews that follow the shot ----------------------------------------------------------------------
        def refresh_views(shot_yaml_, ff, *values):
            f = named(values)
            gif, strip_ = tj.trajectory_preview_event(shot_yaml_, ff, **f)
            pan_gif_, pan_ = ev.camera_preview_event(shot_yaml_, f["model"], f["prompt"], f["frames"], f["cx"],
                                                      f["cy"], f["width"], f["height"])
            shot = ev.resolved(shot_yaml_, **f)
            labels_ = tj.subject_labels(shot)
            return (gif, strip_, pan_gif_, pan_, tj.keyframes_text(shot_yaml_, **f), sj.subject_rows(shot_yaml_),
                    gr.update(choices=[(lb, i + 1) for i, lb in enumerate(labels_)]),
                    gr.update(maximum=max(shot.frames - 1, 1)), sj.background_preview_event(shot_yaml_, **f))

        views = [track_gif, track, pan_gif, pan, keyframes, subjects_table, subject_pick, frame, bg_preview]
        views_in = [shot_yaml, first_frame] + form_in

        def canvas_for(shot_yaml_, frame_, pick_, ff, *values):
            f = named(values)
            shot = ev.resolved(shot_yaml_, **f)
            labels_ = tj.subject_labels(shot)
            order = list(range(len(labels_)))
            k = int(pick_ or 1) - 1
            if 0 <= k < len(order):  # the picked subject's label first: new boxes take it
                order.insert(0, order.pop(k))
            frame_ = min(int(frame_ or 0), shot.frames - 1)
            return gr.update(value=tj.canvas_value(shot, frame_, ff),
                             label_list=[labels_[i] for i in order] or ["subject"],
                             label_colors=[COLOURS[i % len(COLOURS)] for i in order] or [COLOURS[0]])

        canvas_in = [shot_yaml, frame, subject_pick, first_frame] + form_in

        def on_boxes(shot_yaml_, value, frame_, pick_, *values):
            return tj.boxes_event(shot_yaml_, value, frame_, pick_, **named(values))

        canvas.change(guarded(on_boxes), [shot_yaml, canvas, frame, subject_pick] + form_in, shot_yaml,
                      **quiet, trigger_mode="always_last")
        subject_pick.change(guarded(canvas_for), canvas_in, canvas, **quiet)
        frame.change(guarded(canvas_for), canvas_in, canvas, **quiet, trigger_mode="always_last")
        shot_yaml.change(guarded(refresh_views), views_in, views, **quiet, trigger_mode="always_last")
        for c in (frames, cx, cy, model, width, height):
            c.change(guarded(refresh_views), views_in, views, **quiet, trigger_mode="always_last")
        prompt.blur(guarded(refresh_views), views_in, views, **quiet)

        def keyframe_action(fn):
            def run(shot_yaml_, frame_, pick_, to_, preset_, *values):
                return fn(shot_yaml_, frame_, pick_, to_, preset_, **named(values))
            return guarded(run)

        action_in = [shot_yaml, frame, subject_pick, to_frame, preset] + form_in
        actions = {
            clear_key: lambda y, f, p, t, pr, **kw: tj.clear_keyframe_event(y, f, p, **kw),
            clear_all: lambda y, f, p, t, pr, **kw: tj.clear_keyframe_event(y, f, p, every_frame=True, **kw),
            duplicate: lambda y, f, p, t, pr, **kw: tj.duplicate_keyframe_event(y, f, t, p, **kw),
            apply_preset: lambda y, f, p, t, pr, **kw: tj.path_preset_event(y, pr, p, **kw),
        }
        for button, fn in actions.items():
            button.click(keyframe_action(fn), action_in, shot_yaml, **quiet).success(
                guarded(canvas_for), canvas_in, canvas, **quiet)

        # --- noise ------------------------------------------------------------------------------------------------
        gamma.change(guarded(ev.gamma_preview_event), gamma, [heat, noise_strip], api_name="gamma_preview",
                     show_progress="hidden", trigger_mode="always_last")

        # --- subjects ---------------------------------------------------------------------------------------------
        slot.change(guarded(sj.slot_values), [shot_yaml, slot], [phrase, lib_pick, reference, ref_strength], **quiet)

        def on_set_subject(shot_yaml_, slot_, phrase_, lib_, ref_, strength_, *values):
            return sj.set_subject_event(shot_yaml_, slot_, phrase_, lib_, ref_, strength_, **named(values))

        set_subject.click(guarded(on_set_subject), [shot_yaml, slot, phrase, lib_pick, reference, ref_strength]
                          + form_in, shot_yaml, **quiet).success(guarded(canvas_for), canvas_in, canvas, **quiet)
        remove_subject.click(guarded(sj.remove_subject_event), [shot_yaml, slot], shot_yaml, **quiet).success(
            guarded(canvas_for), canvas_in, canvas, **quiet)
        photos.upload(guarded(sj.photos_event), [photos, train_phrase], [photo_set, masks_view],
                      api_visibility="private")
        replace_mask.click(guarded(sj.replace_mask_event), [photo_set, mask_for, mask_file], [photo_set, masks_view],
                           api_visibility="private")

        def library_views():
            return sj.library_rows(), gr.update(choices=[sj.NO_SUBJECT] + sj.library_names())

        def do_train(photo_set_, name_, phrase_, method_, steps_, model_, request: gr.Request,
                     progress=gr.Progress()):
            import pandas as pd

            cancel = jobs.start(request.session_hash if request else "local")
            losses, box, err = [], {}, []

            def on_step(i, n, loss, left):
                losses.append((i, float(loss)))
                progress((i, n), desc=f"training: loss {loss:.4f}, {left:.0f} s left")

            def work():
                try:
                    box["out"] = train_on_gpu(photo_set_, name_, phrase_, method_, steps_, model_, on_step, cancel)
                except ev.UserError as e:
                    err.append(str(e))
                except Exception as e:  # shown as one line; the log has the trace
                    logger.exception("training failed")
                    err.append(f"training failed: {type(e).__name__}: {e}")

            t = threading.Thread(target=work, daemon=True)
            t.start()
            while t.is_alive():
                t.join(0.5)
                if losses:
                    i, loss = losses[-1]
                    yield (f"step {i}: loss {loss:.4f}", pd.DataFrame(losses, columns=["step", "loss"]),
                           *library_views())
            if err:
                raise gr.Error(err[0], print_exception=False)
            subject, result = box["out"]
            yield (f"**{subject.name}** trained ({', '.join(subject.methods)}) in {result.seconds:.0f} s; put it in "
                   f"a shot with the phrase '{subject.class_word}' and library subject '{subject.name}'.",
                   pd.DataFrame(losses, columns=["step", "loss"]), *library_views())

        train.click(do_train, [photo_set, train_name, train_phrase, method, train_steps, model],
                    [train_status, loss_plot, library, lib_pick], concurrency_limit=1, concurrency_id="gpu",
                    api_visibility="private")
        def do_cancel_train(request: gr.Request):
            return "cancelling…" if jobs.cancel(request.session_hash) else "nothing to cancel"

        cancel_train.click(do_cancel_train, None, train_status, queue=False, api_visibility="private")
        refresh_lib.click(library_views, None, [library, lib_pick], **quiet)

        def on_delete(name):
            sj.delete_subject_event(name, manager=manager)
            return library_views()

        delete_lib.click(guarded(on_delete), lib_pick, [library, lib_pick], **quiet)

        # --- background -------------------------------------------------------------------------------------------
        bg_image.upload(guarded(sj.set_background_event), [shot_yaml, bg_image, bg_strength], shot_yaml,
                        **quiet).success(guarded(canvas_for), canvas_in, canvas, **quiet)
        bg_strength.release(guarded(lambda y, img, s: sj.set_background_event(y, img, s) if img else y),
                            [shot_yaml, bg_image, bg_strength], shot_yaml, **quiet)
        bg_clear.click(guarded(lambda y, s: sj.set_background_event(y, None, s)), [shot_yaml, bg_strength],
                       shot_yaml, **quiet).success(lambda: None, None, bg_image, **quiet).success(
            guarded(canvas_for), canvas_in, canvas, **quiet)

        # --- shot file ------------------------------------------------------------------------------------------
        def to_form(shot_yaml_):
            values = ev.form_values(shot_yaml_)
            return [values[k] for k in ev.FORM]

        upload.upload(guarded(ev.load_shot_event), upload, shot_yaml, api_name="load_shot").success(
            guarded(to_form), shot_yaml, form_out, **quiet).success(guarded(canvas_for), canvas_in, canvas, **quiet)
        shot_yaml.blur(guarded(to_form), shot_yaml, form_out, **quiet).success(
            guarded(canvas_for), canvas_in, canvas, **quiet)
        shot_tab.select(guarded(lambda y, *v: ev.apply_form_event(y, **named(v))), [shot_yaml] + form_in,
                        shot_yaml, **quiet)
        save.click(guarded(lambda y, name, *v: ev.save_shot_event(y, name, **named(v))),
                   [shot_yaml, save_name] + form_in, saved, api_name="save_shot")

        # --- render -------------------------------------------------------------------------------------------------
        picked_defaults = ["frames", "width", "height", "steps", "guidance_scale"]

        def on_model(model_):  # a model picked by the user brings its own size, length and steps
            d = ev.preset_defaults_event(model_)
            return [d[k] for k in picked_defaults]

        model.input(guarded(on_model), model, [form[k] for k in picked_defaults], **quiet)
        dice.click(lambda: int(time.time_ns() % ev.MAX_SEED), outputs=seed, api_visibility="private")

        def do_render(shot_yaml_, model_, prompt_, negative_, seed_, steps_, guidance_, frames_, width_, height_,
                      gamma_, cx_, cy_, history_, request: gr.Request, progress=gr.Progress()):
            values = (model_, prompt_, negative_, seed_, steps_, guidance_, frames_, width_, height_, gamma_, cx_, cy_)
            cancel = jobs.start(request.session_hash if request else "local")
            try:
                r = render_on_gpu(shot_yaml_, named(values), lambda i, n: progress((i, n), desc="denoising"), cancel)
            except ev.Cancelled as e:  # not an error: the outputs keep the last render
                keep = gr.update()
                return keep, keep, keep, f"{e}.", keep, keep, keep
            history_ = history_ + [r.entry]
            return (r.video, r.downloads, r.shot_yaml, r.status, history_, ev.history_rows(history_), r.first_frame)

        render_btn.click(guarded(do_render), [shot_yaml] + form_in + [history],
                         [video, downloads, shot_yaml, status, history, history_table, first_frame],
                         api_name="render", concurrency_limit=1, concurrency_id="gpu").success(
            guarded(canvas_for), canvas_in, canvas, **quiet).success(guarded(refresh_views), views_in, views,
                                                                     **quiet)

        def do_cancel(request: gr.Request):
            return "cancelling…" if jobs.cancel(request.session_hash) else "nothing to cancel"

        cancel_btn.click(do_cancel, None, status, queue=False, api_visibility="private")

        def on_load_back(history_, number):
            h = ev.history_entry(history_, number)
            return [h["shot_yaml"], h["video"], *to_form(h["shot_yaml"])]

        load_back.click(guarded(on_load_back), [history, pick], [shot_yaml, video] + form_out,
                        **quiet).success(guarded(canvas_for), canvas_in, canvas, **quiet)

        # --- first paint ------------------------------------------------------------------------------------------
        demo.load(guarded(ev.gamma_preview_event), gamma, [heat, noise_strip], **quiet)
        demo.load(guarded(refresh_views), views_in, views, **quiet)
        demo.load(guarded(sj.slot_values), [shot_yaml, slot], [phrase, lib_pick, reference, ref_strength], **quiet)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, prevent_thread_lock: bool = False,
           manager=None, quiet: bool = False):
    """Start the studio; files are served only from its output folder; uploads at most MAX_UPLOAD."""
    demo = build_app(manager)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ev.output_dir())],
                       max_file_size=MAX_UPLOAD, prevent_thread_lock=prevent_thread_lock, footer_links=["api"],
                       quiet=quiet)
