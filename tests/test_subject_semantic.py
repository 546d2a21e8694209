"""A subject taught to the shipped toy-world model from four photos is what it renders, where its box says.

The subject is a star whose right half is yellow and left half purple (world.HALVES): a colour combination no subject
of the model's world has and no word names, so words alone cannot produce it. It is trained with the toy-world
defaults (LoRA, 80 steps, lr 6e-3; ~40 s on 2 CPU cores) and rendered by name in a new scene, "a star on sky", with a
left-to-right box track. The measurements live in studio.toyworld.evaluate.measure_subject.

Measured over six training seeds (0-5; 6 render seeds each, one CPU thread):
- colour balance of yellow and purple (2·min/sum; the photos 0.99): untuned 0.00 in every render (the untuned star is
  one colour), tuned 0.19, 0.35, 0.30, 0.60, 0.73, 0.86;
- the look's pixels in the box: hit rate 1.00 for every seed, IoU 0.73-0.90 (untuned 0.65);
- colour-histogram L1 to the photos (2 = disjoint): untuned 1.22, tuned 0.86, 1.66, 0.85, 1.15, 1.24, 0.49: not
  reliably closer, because the tuned renders carry red and white pixels at the seam and edges under the box
  control's amplification. So the test asserts the balance, not the L1.
The earlier striped look (world.PATTERNS) failed on two of six seeds (balance 0.08 with hit rate 0.42; 0.14).
"""

import pytest

from studio.pipelines import PipelineManager
from studio.subjects import tune
from studio.subjects.library import SubjectLibrary
from studio.toyworld import evaluate


@pytest.fixture(scope="module")
def two_tone(manager):
    """The yellow-and-purple star trained with the toy-world defaults."""
    photos, masks = evaluate.subject_photos()
    lib = SubjectLibrary()
    if not lib.exists("twotone"):
        tune.add_subject("twotone", photos, masks, "toyworld", tune.TuneSettings(class_word="star"), library=lib,
                         manager=manager)
    return "twotone"


def test_tuned_subject_has_its_photos_colours_and_stays_in_its_box(manager, two_tone):
    # seed 0 (the default), these 4 render seeds, 2 threads: balance 0.18 (untuned 0.00), L1 0.87 (untuned 1.25),
    # hit rate 1.00, IoU 0.82 (untuned 0.66); training 42 s
    untuned = evaluate.measure_subject(manager, None)
    tuned = evaluate.measure_subject(manager, two_tone)
    assert untuned["balance"] <= 0.02, untuned
    assert tuned["balance"] >= 0.1, (untuned, tuned)
    assert tuned["hit_rate"] >= 0.9 and tuned["iou"] >= 0.5, tuned


def test_a_fresh_manager_renders_the_subject_identically(manager, two_tone):
    # Reloading the subject's files into a new pipeline reproduces the render exactly.
    a = evaluate._render(manager, "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": two_tone}])
    b = evaluate._render(PipelineManager(1, "cpu"), "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": two_tone}])
    assert (a == b).all()
