"""A subject taught to the shipped toy-world model from four photos is what it renders, where its box says.

The subject is a yellow-and-purple striped star: a look the model never saw (its training captions never hold
"striped", and no subject of its world has two colours), so words alone cannot produce it. The measurements live
in studio.toyworld.evaluate.

Marked slow (run with `-m slow`, ~3 min) because it is not yet reliable: with the toy-world defaults (LoRA, 80
steps, lr 6e-3) the tuned subject's colour-histogram L1 to the photos (untuned: 1.21; 0 = same colours, 2 =
disjoint) measured 0.67-0.96 over training seeds and runs before the LoRA init was seeded, but 1.48 once, and 1.38 at
120 steps (the subject drifts to red and yellow). Box adherence held in every run (hit rate 0.94-1.00).
"""

import pytest

from studio.pipelines import PipelineManager
from studio.subjects import tune
from studio.subjects.library import SubjectLibrary
from studio.toyworld import evaluate


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def striped(manager):
    """The striped star trained with the toy-world defaults (LoRA, 80 steps: ~65 s on 2 CPU cores)."""
    photos, masks = evaluate.subject_photos()
    lib = SubjectLibrary()
    if not lib.exists("stripy"):
        tune.add_subject("stripy", photos, masks, "toyworld", tune.TuneSettings(class_word="star"), library=lib,
                         manager=manager)
    return "stripy"


def test_tuned_subject_looks_like_its_photos_and_stays_in_its_box(manager, striped):
    # measured (4 seeds, left-to-right track): colour-histogram L1 to the photos untuned 1.21, tuned 0.79 (2 =
    # disjoint colours); the tuned subject's pattern pixels in the box: hit rate 1.00, IoU 0.81
    untuned = evaluate.measure_subject(manager, None)
    tuned = evaluate.measure_subject(manager, striped)
    assert tuned["l1"] <= untuned["l1"] - 0.2 and tuned["l1"] <= 1.0, (untuned, tuned)
    assert tuned["hit_rate"] >= 0.75 and tuned["iou"] >= 0.5, tuned


def test_a_fresh_manager_renders_the_subject_identically(manager, striped):
    # Reloading the subject's files into a new pipeline reproduces the render exactly.
    a = evaluate._render(manager, "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": striped}])
    b = evaluate._render(PipelineManager(1, "cpu"), "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": striped}])
    assert (a == b).all()
