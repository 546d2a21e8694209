"""The likeness measure itself (studio.toyworld.evaluate): fast checks on the world's own drawings."""

import numpy as np

from studio.controls.boxes import interpolate
from studio.toyworld import evaluate, world


def _clip(look: str):
    path = np.array([[6 + 2.5 * f, 16.0] for f in range(world.FRAMES)], np.float32)
    spec = world.SubjectSpec(look, "star", 8.0, path, None)
    return world.render_clip("sky", [spec], seed=3)


def test_distance_is_zero_for_itself_and_counts_proportions():
    a = np.array([[250, 220, 30]] * 50 + [[150, 50, 215]] * 50, np.float32)
    assert evaluate.sliced_distance(a, a) == 0
    one = np.array([[250, 220, 30]] * 100, np.float32)
    half = evaluate.sliced_distance(one, a)  # half the mass must move to the other colour
    assert 0 < half < evaluate.sliced_distance(np.array([[150, 50, 215]] * 100, np.float32), one)


def test_the_photos_look_is_closer_than_a_one_colour_star_in_the_same_box():
    photos, masks = evaluate.subject_photos("halves", "star")
    ref = evaluate.photo_colours(photos, masks)
    boxes = interpolate(evaluate.LEFT_TO_RIGHT, world.FRAMES)
    two_tone = evaluate.sliced_distance(evaluate.subject_pixels(_clip("halves").frames, boxes), ref)
    yellow = evaluate.sliced_distance(evaluate.subject_pixels(_clip("yellow").frames, boxes), ref)
    assert two_tone < 0.3 * yellow


def test_an_empty_box_is_far_from_the_subject():
    photos, masks = evaluate.subject_photos("checkered", "star")
    ref = evaluate.photo_colours(photos, masks)
    boxes = interpolate(evaluate.LEFT_TO_RIGHT, world.FRAMES)
    empty = world.render_clip("sky", [], seed=3).frames
    red = evaluate.sliced_distance(evaluate.subject_pixels(_clip("red").frames, boxes), ref)
    assert evaluate.sliced_distance(evaluate.subject_pixels(empty, boxes), ref) > red
