"""Hugging Face Space / local entry point: `python app.py` starts the studio on the embedded default model."""

import logging
import os

from studio.ui import launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    on_space = bool(os.environ.get("SPACE_ID"))
    launch(host="0.0.0.0" if on_space else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
