"""The CPU thread choice (studio.threads): a pure function of the cores, the environment and the flag; the OpenMP
wait policy set before torch loads; the CLI's --threads and SHOT_STUDIO_THREADS; the choice in the sidecar."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio import cli, threads

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "presets" / "shots" / "example.yaml")


@pytest.mark.parametrize("cores, want", [(1, 1), (2, 1), (3, 2), (4, 3), (16, 15), (0, 1)])
def test_auto_leaves_one_core_free(cores, want):
    choice = threads.choose(cores, {})
    assert (choice.threads, choice.source) == (want, "auto") and choice.describe() == f"auto: {want} of " \
                                                                                       f"{max(cores, 1)} cores"


def test_flag_then_studio_variable_then_omp_then_auto():
    env = {"SHOT_STUDIO_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert threads.choose(2, env, flag="2") == threads.Choice(2, "--threads", 2)
    assert threads.choose(2, env, flag=4).describe() == "--threads 4"
    assert threads.choose(2, env) == threads.Choice(3, "SHOT_STUDIO_THREADS", 2)
    assert threads.choose(2, {"OMP_NUM_THREADS": "5,2"}) == threads.Choice(5, "OMP_NUM_THREADS", 2)
    # 0 / auto hand the choice down the line; an OMP_NUM_THREADS libgomp would ignore is ignored here too
    assert threads.choose(2, env, flag="0").source == "SHOT_STUDIO_THREADS"
    assert threads.choose(2, {"SHOT_STUDIO_THREADS": "auto", "OMP_NUM_THREADS": "5"}).source == "OMP_NUM_THREADS"
    assert threads.choose(2, {"SHOT_STUDIO_THREADS": " ", "OMP_NUM_THREADS": "x"}) == threads.Choice(1, "auto", 2)


@pytest.mark.parametrize("flag, env, source", [("many", {}, "--threads"), ("-1", {}, "--threads"),
                                               ("1.5", {}, "--threads"), (None, {"SHOT_STUDIO_THREADS": "x"},
                                                                           "SHOT_STUDIO_THREADS"),
                                               (None, {"SHOT_STUDIO_THREADS": "100000"}, "SHOT_STUDIO_THREADS")])
def test_a_bad_thread_count_names_where_it_came_from(flag, env, source):
    with pytest.raises(ValueError, match=f"^{source}: must be a whole number of CPU threads"):
        threads.choose(2, env, flag)


def test_cores_are_the_affinity_capped_by_the_container_quota(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_limit(tmp_path) == 2.0
    assert threads.cgroup_cpu_limit(tmp_path / "nowhere") is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cores() == 2  # a 1.5-core quota on an 8-core machine: 2 cores, 1 thread
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 8


def test_early_sets_passive_unless_given_or_too_late(monkeypatch):
    monkeypatch.setattr(threads, "_wait_policy", None)
    env = {}
    monkeypatch.delitem(sys.modules, "torch")
    assert threads.early(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads, "_wait_policy", None)
    assert threads.early({"OMP_WAIT_POLICY": "active"}) == "ACTIVE"  # the user's word stands
    monkeypatch.setattr(threads, "_wait_policy", None)
    monkeypatch.setitem(sys.modules, "torch", torch)
    env = {}
    assert threads.early(env) == "default (torch loaded before the studio)" and env == {}


def _gomp(code: str, **env) -> str:
    """libgomp's own report of its settings (OMP_DISPLAY_ENV) in a fresh process running `code`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stderr


def test_libgomp_sees_the_passive_policy_when_the_studio_is_imported_first():
    # GOMP_SPINCOUNT is what the policy sets: 0 (PASSIVE: sleep at once), 300000 (unset: spin ~3 ms first)
    assert "GOMP_SPINCOUNT = '0'" in _gomp("import studio, torch; torch.ones(1)")
    assert "GOMP_SPINCOUNT = '300000'" in _gomp("import torch, studio")  # torch first: too late, recorded so


@pytest.fixture
def restore_threads():
    before, current = torch.get_num_threads(), threads.current()
    yield
    torch.set_num_threads(before)
    threads._current = current


def test_render_records_the_choice_and_the_flag_overrides_it(tmp_path, monkeypatch, restore_threads):
    out = tmp_path / "x.mp4"
    monkeypatch.setenv("SHOT_STUDIO_THREADS", "2")
    assert cli.main(["render", EXAMPLE, "--out", str(out), "--set", "steps=2", "--threads", "1",
                     "--no-progress"]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    settings, noted = sidecar["settings"], sidecar["render"]["machine"]  # pixels / speed only
    assert settings["torch_threads"] == 1 and noted["torch_threads_chosen_by"] == "--threads 1"
    assert noted["torch_wait_policy"] == threads.wait_policy() == "PASSIVE"
    assert cli.main(["render", EXAMPLE, "--out", str(out), "--set", "steps=2", "--no-progress"]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert (sidecar["settings"]["torch_threads"], sidecar["render"]["machine"]["torch_threads_chosen_by"]) == (
        2, "SHOT_STUDIO_THREADS 2")


@pytest.mark.parametrize("argv, env", [(["--threads", "lots"], {}), ([], {"SHOT_STUDIO_THREADS": "-3"})])
def test_a_bad_thread_setting_is_one_line_and_exit_2(argv, env, tmp_path, monkeypatch, capsys, restore_threads):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["render", EXAMPLE, "--out", str(tmp_path / "x.mp4"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--threads" in err or "SHOT_STUDIO_THREADS" in err), err
    assert not (tmp_path / "x.mp4").exists()
