"""The browser studio (Gradio Blocks): a thin adapter, form values -> Shot -> engine -> files.

    events      the shot file and the form, render, history, noise and camera previews, uploads
    trajectory  the box canvas (pixels) <-> the shot's keyframes (0..1), path presets, trajectory preview
    subjects    subject photos, masks, training, the library; the shot's subjects and background
    app         the page: layout and wiring (build_app, launch)
    gpu         spaces.GPU on Hugging Face ZeroGPU, a no-op elsewhere

Importing this package imports neither Gradio nor a model.
"""

from studio.ui.events import (  # noqa: F401  (the package's public names)
    Cancelled, DEFAULT_SHOT, FORM, FORM_FIELDS, GAMMA_HELP, MAX_SEED, Rendered, UserError, camera_preview_event,
    form_values, gamma_preview_event, history_entry, history_rows, load_shot_event, output_dir, render_event,
    save_shot_event, shot_from_form, user_errors,
)


def build_app(manager=None):
    """The Blocks app (see studio.ui.app)."""
    from studio.ui.app import build_app as build

    return build(manager)


def launch(*args, **kwargs):
    """Start the studio (see studio.ui.app.launch)."""
    from studio.ui.app import launch as start

    return start(*args, **kwargs)
