"""Hugging Face Space / local entry point: `python app.py` starts the studio on the embedded default model.

On a Space (SPACE_ID set) it listens on 0.0.0.0 and loads the default model before serving, as ZeroGPU wants
(weights loaded in the main process; studio.ui.gpu runs renders and training under `spaces.GPU`).
"""

import logging
import os

import studio  # noqa: F401  (first: sets the OpenMP wait policy of torch's threads before anything loads torch)

try:  # ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    spaces = None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from studio import engine
    from studio.presets import load_model_preset
    from studio.shot import DEFAULT_MODEL
    from studio.ui import launch

    on_space = bool(os.environ.get("SPACE_ID"))
    if on_space:
        engine.default_manager().get(load_model_preset(DEFAULT_MODEL))
    launch(host="0.0.0.0" if on_space else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
