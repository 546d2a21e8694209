"""Renders from several threads on one pipeline manager (the UI's server thread, the eval harness, scripts): each
render holds its pipeline, so one render's controls never leak into another's and the pipeline ends up restored."""

import threading
import time

import numpy as np

from studio import engine, shot as shotlib


def test_concurrent_renders_on_one_pipeline_do_not_mix(manager):
    plain = shotlib.from_container({"model": "tiny", "prompt": "a red circle on grass", "seed": 2, "steps": 4})
    boxed = shotlib.from_container({
        "model": "tiny", "prompt": "a red circle on grass", "seed": 2, "steps": 4, "camera": {"cx": 0.5},
        "subjects": [{"phrase": "red circle", "boxes": {0: [0.0, 0.0, 0.4, 0.4], 7: [0.6, 0.6, 1.0, 1.0]}}]})
    want_plain, want_boxed = engine.render(plain, manager).frames, engine.render(boxed, manager).frames
    assert not np.array_equal(want_plain, want_boxed)
    got, errors = {}, []

    def run(key, shot, **kw):
        try:
            got[key] = engine.render(shot, manager, **kw).frames
        except Exception as e:  # reported below
            errors.append(e)

    other = threading.Thread(target=run, args=("plain", plain))

    def start_the_other(i, n):  # mid-way through the boxed render, a plain one is asked for on the same pipeline
        if i == 1:
            other.start()
            time.sleep(0.3)

    run("boxed", boxed, progress=start_the_other)
    other.join(60)
    assert not errors, errors
    np.testing.assert_array_equal(got["boxed"], want_boxed)
    np.testing.assert_array_equal(got["plain"], want_plain)
    np.testing.assert_array_equal(engine.render(plain, manager).frames, want_plain)  # restored afterwards
