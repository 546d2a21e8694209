"""A subject taught to the shipped toy-world model from four photos looks like its photos, where its box says.

Three looks the model's world never shows, painted on a star (studio.toyworld.evaluate.LOOKS): two-tone (right half
yellow, left half purple: world.HALVES), striped (yellow and purple stripes) and checkered (red and white checks).
Each is trained with the toy-world defaults (tune.DEFAULTS["toyworld"]) and rendered by name in a new scene, "a star
on sky", with a left-to-right box track (evaluate.measure_likeness, render seeds 0-2):
- distance: the sliced colour distance of the subject's pixels inside its box to the photos' subject colours, tuned
  over untuned on the same renders; the issue's target is < 0.8 on every training seed (the VAE's own reconstruction
  of the photos is at 0.12-0.24 × untuned, so every look is within its reach);
- hit rate of the look's colours in the box; the target is >= 0.9.
The benchmark that chose the defaults, and its table: benchmarks/likeness.py, README "Subjects".

The target is not met on every seed. Measured with the defaults (LoRA, 80 steps, "a photo of a ...", photos not
mirrored; 1 torch thread; benchmarks/likeness.py, README "Subjects"), tuned / untuned on training seeds 0-5:
checkered 0.67 0.78 0.35 0.49 0.77 0.43 (6 of 6 under 0.8), striped 0.77 0.86 0.69 0.64 0.75 0.88 (4 of 6),
two-tone 0.99 0.92 (seeds 0 and 2: the tuned star is red, the model's one-colour prior); hit rate 0.92 at worst
on checkered and striped, 0.79 on two-tone. Even a full fine-tune of the UNet's spatial weights draws no two-tone
star and no yellow stripes (benchmarks/likeness_ceiling.py): the model, not the VAE, is these looks' ceiling.
So the tests hold checkered to the target and the other looks to what holds now (BOUNDS):
- default suite: checkered on training seed 2 (one training, ~30 s on 2 CPU cores);
- slow step (`-m slow`): every look on training seeds 0-2 (9 trainings, ~6 min on 2 CPU cores).
"""

import pytest

from studio.pipelines import PipelineManager
from studio.subjects import tune
from studio.subjects.library import SubjectLibrary
from studio.toyworld import evaluate

TARGET = 0.8  # tuned / untuned colour distance, on every training seed
SLOW_SEEDS = (0, 1, 2)
# per look: the most the tuned / untuned distance may be, the least hit rate (the targets: 0.8, 0.9)
BOUNDS = {"checkered": (TARGET, 0.85), "striped": (1.0, 0.9), "two-tone": (1.1, 0.75)}


class _Untuned(dict):
    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def __missing__(self, look):
        self[look] = evaluate.measure_likeness(self.manager, None, look)
        return self[look]


@pytest.fixture(scope="module")
def untuned(manager):
    """The untuned model's renders measured against a look's photos (rendered when a test first asks)."""
    return _Untuned(manager)


def _teach(manager, look: str, seed: int) -> str:
    name = f"{look.replace('-', '')}{seed}"
    lib = SubjectLibrary()
    if not lib.exists(name):
        photos, masks = evaluate.subject_photos(evaluate.LOOKS[look], evaluate.LIKENESS_SHAPE)
        tune.add_subject(name, photos, masks, "toyworld",
                         tune.TuneSettings(class_word=evaluate.LIKENESS_SHAPE, seed=seed), library=lib,
                         manager=manager)
    return name


def _check(manager, untuned, look: str, seed: int):
    tuned = evaluate.measure_likeness(manager, _teach(manager, look, seed), look)
    base = untuned[look]
    ratio, hits = BOUNDS[look]
    assert tuned["distance"] < ratio * base["distance"], (look, seed, tuned["distance"] / base["distance"], tuned)
    assert tuned["hit_rate"] >= hits, (look, seed, tuned)
    # two-tone is held to its regression bound only: the tuned star stays one colour (red; colour balance 0.0) and
    # its distance was 0.99 and 0.92 x the untuned model's (seeds 0, 2): issue 23's target is not met for this look.
    return tuned, base


def test_checkered_subject_looks_like_its_photos_and_stays_in_its_box(manager, untuned):
    _check(manager, untuned, "checkered", 2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
@pytest.mark.parametrize("look", list(evaluate.LOOKS))
def test_every_look_looks_like_its_photos_on_every_training_seed(manager, untuned, look, seed):
    _check(manager, untuned, look, seed)


def test_a_fresh_manager_renders_the_subject_identically(manager):
    # Reloading the subject's files into a new pipeline reproduces the render exactly.
    name = _teach(manager, "checkered", 2)
    a = evaluate._render(manager, "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": name}])
    b = evaluate._render(PipelineManager(1, "cpu"), "toyworld", prompt="a star on sky", seed=9,
                         subjects=[{"phrase": "star", "subject": name}])
    assert (a == b).all()


def test_vae_reconstructs_every_look_well_within_the_target(manager):
    # the ceiling: the VAE's reconstruction of the photos is far closer to them than the untuned model's renders
    from studio import machine
    from studio.presets import load_model_preset

    from studio.controls.boxes import interpolate
    from studio.toyworld import world

    pipe = tune.load_training_pipeline(load_model_preset("toyworld"), machine.from_env().checked())
    frames = evaluate._render(manager, "toyworld", prompt="a star on sky", seed=0,
                              subjects=[{"phrase": "star", "boxes": evaluate.LEFT_TO_RIGHT}])
    rendered = evaluate.subject_pixels(frames, interpolate(evaluate.LEFT_TO_RIGHT, world.FRAMES))
    for look in evaluate.LOOKS:
        photos, masks = evaluate.subject_photos(evaluate.LOOKS[look], evaluate.LIKENESS_SHAPE)
        untuned = evaluate.sliced_distance(rendered, evaluate.photo_colours(photos, masks))
        assert evaluate.vae_likeness(pipe, look) < 0.3 * untuned, look
