"""`studio batch --ray` and `studio eval --ray` (studio/ray_farm.py): on a local Ray cluster of 2 CPUs, a 4-job batch
writes every output and the manifest with frames equal to `studio render`'s; a worker killed at a deterministic point
is replaced and its job retried (and recorded as failed once its retries are spent); `eval --ray` gives the table of
a local eval; bad input (no Ray, an unreachable address, a node without the studio, a shared folder that cannot be
used) is one line, exit 2, before any render. Without the extra, nothing imports Ray and `--ray` says how to install
it. The scheduling (affinity by model), the slots and the fault parser are checked without a cluster."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from studio import batch, cli, engine, ray_farm, ray_probe

ROOT = Path(__file__).resolve().parent.parent
STAR = str(ROOT / "presets/shots/toyworld-star.yaml")  # toyworld model, 8 frames 32x32
EXAMPLE = str(ROOT / "presets/shots/example.yaml")  # tiny random model
SWEEPS = ["--sweep", "seed=[3, 4]", "--sweep", "noise_prior.gamma=[0, 0.4]"]
SETS = ["--set", "steps=2"]
NO_WEIGHTS = ["--clip-model", "studio-tests/no-such-clip", "--dino-model", "studio-tests/no-such-dino"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The Ray workers of a CPU-only cluster render with one torch thread; this process's renders, compared with
    theirs, use one too (the sidecar's settings.torch_threads says so)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module (ray.init takes seconds). RAY_AUTH_MODE=disabled: conftest."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def manifest(out: Path) -> dict:
    return json.loads((out / batch.MANIFEST_JSON).read_text())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- without a cluster --------------------------------------------------------------------------------------------


def test_the_base_install_never_imports_ray():
    code = ("import sys\nimport studio.cli, studio.batch, studio.evaluation, studio.ray_farm, studio.ray_probe\n"
            "from studio import cli\ncli.build_parser().parse_args(['batch', 'x.yaml', '--out', 'o', '--ray'])\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_without_the_extra_batch_works_and_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """Ray blocked as if the extra were not installed (`import ray` raises ImportError; before this module's cluster
    starts): a local batch renders, --ray and --ray-address are one line saying how to install it."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError):
        import ray  # noqa: F401
    assert cli.main(["batch", STAR, "--out", str(tmp_path / "local"), "--set", "steps=1", "--no-progress"]) == 0
    assert manifest(tmp_path / "local")["counts"]["done"] == 1
    capsys.readouterr()
    assert cli.main(["batch", STAR, "--out", str(tmp_path / "ray"), "--ray"]) == 2
    assert 'Ray is not installed; install the optional extra: pip install -e ".[ray]"' in one_line_error(capsys)
    assert cli.main(["eval", "presets/evals/toyworld.yaml", "--out", str(tmp_path / "eval"), "--ray-address",
                     "auto"]) == 2
    assert 'pip install -e ".[ray]"' in one_line_error(capsys)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "eval").exists()


def test_slots_one_per_gpu_else_one_per_cpu_with_one_thread_spread_over_nodes():
    gpu_nodes = [{"id": "a", "ip": "10.0.0.1", "CPU": 16.0, "GPU": 2.0},
                 {"id": "b", "ip": "10.0.0.2", "CPU": 4.0, "GPU": 1.0},
                 {"id": "c", "ip": "10.0.0.3", "CPU": 8.0, "GPU": 0.0}]  # a CPU node of a GPU cluster: no worker
    slots = ray_farm.plan_slots(gpu_nodes)
    assert [(s.node, s.gpu, s.threads) for s in slots] == [("a", True, 8), ("b", True, 4), ("a", True, 8)]
    cpu_nodes = [{"id": "a", "ip": "1", "CPU": 2.0, "GPU": 0.0}, {"id": "b", "ip": "2", "CPU": 3.5, "GPU": 0.0}]
    slots = ray_farm.plan_slots(cpu_nodes)
    assert [s.node for s in slots] == ["a", "b", "a", "b", "b"] and {(s.gpu, s.threads) for s in slots} == {(False, 1)}
    assert [s.node for s in ray_farm.plan_slots(cpu_nodes, 3)] == ["a", "b", "a"]


def _jobs(models: str) -> list[batch.Job]:
    return [batch.Job(i, f"j{i}", "s.yaml", {}, [], None, m, (), (m, ())) for i, m in enumerate(models)]


def test_jobs_go_to_workers_already_holding_their_model():
    """Two workers, jobs of models A and B: each worker loads one model and keeps to it (2 loads, not more)."""
    pending, keys, loads, order = _jobs("AAABBB"), [None, None], 0, []
    while pending:
        for w in (0, 1):
            holders = {keys[1 - w]: 1} if keys[1 - w] is not None else {}
            job = ray_farm.choose(keys[w], (keys[w], ()), pending, holders)
            if job is None:
                break
            pending.remove(job)
            loads += job.group[0] != keys[w]
            keys[w] = job.group[0]
            order.append((w, job.id))
    assert loads == 2 and order[:2] == [(0, "j0"), (1, "j3")]
    assert {w for w, j in order if j in ("j0", "j1", "j2")} == {0}
    # one model and two workers: both take its jobs (one load each), the pending order kept
    assert ray_farm.choose(None, None, _jobs("AAAA"), {"A": 1}).id == "j0"
    # a worker whose model has no jobs left takes the model with the most jobs per holder
    assert ray_farm.choose("A", ("A", ()), _jobs("BCCC"), {"C": 1, "B": 0}).id == "j1"
    # subjects: the same model and subjects first
    jobs = _jobs("AA")
    jobs[1].group = ("A", ("rex",))
    assert ray_farm.choose("A", ("A", ("rex",)), jobs, {}).id == "j1"


def test_fault_injection_spec_and_death_reasons():
    assert ray_farm.faults_from_env("a__seed=1:2:3; b:1 ;c") == [
        ray_farm.Fault("a__seed=1", 2, 3), ray_farm.Fault("b", 1), ray_farm.Fault("c")]
    assert ray_farm.faults_from_env("") == []
    with pytest.raises(ray_farm.FarmError, match=ray_farm.FAULT_ENV):
        ray_farm.faults_from_env("a:x")

    class ActorDiedError(Exception):
        actor_init_failed = False

    died = ActorDiedError("The actor died unexpectedly before finishing this task.\n\tpid: 7\nThe actor is dead "
                          "because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
                          "Worker unexpectedly exits with a connection error code 2. End of file. Some common "
                          "causes include: (1) the process was killed by the OOM killer due to high memory usage")
    assert ray_farm.death_reason(died) == ("the worker process exited unexpectedly (Worker unexpectedly exits with "
                                           "a connection error code 2): killed, out of memory or crashed")
    oom = ActorDiedError("Task was killed due to the node running low on memory.\nMemory on the node was 23 GB")
    assert ray_farm.death_reason(oom).startswith("out of memory")
    init = ActorDiedError("The actor died because of an error raised in its creation task\nImportError: no torch")
    init.actor_init_failed = True
    assert ray_farm.death_reason(init) == "the worker could not start: ImportError: no torch"
    # a CUDA out-of-memory inside a live worker is treated as its death: replaced (freeing the GPU), retried
    assert ray_farm._is_memory_failure(batch.Outcome("j", batch.FAILED, error="OutOfMemoryError: CUDA out of mem"))
    assert not ray_farm._is_memory_failure(batch.Outcome("j", batch.FAILED, error="model 'x' could not be loaded"))


def test_addresses_are_parsed_and_checked(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_farm._endpoint("10.1.2.3:6379") == ("10.1.2.3:6379", "--ray-address")
    assert ray_farm._endpoint("ray://head") == ("head:10001", "--ray-address")
    assert ray_farm._endpoint("head") == ("head:6379", "--ray-address")
    assert ray_farm._endpoint("local") == (None, "--ray-address")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7")
    assert ray_farm._endpoint(None) == ("127.0.0.1:7", "RAY_ADDRESS")
    for bad in ("http://head:80", "head:port", "head:70000"):
        with pytest.raises(ray_farm.FarmError, match="not a Ray address"):
            ray_farm._endpoint(bad)


def test_the_shared_folder_probe_says_why_a_node_cannot_use_it(tmp_path, monkeypatch):
    here = ray_probe.probe("studio", None, None)
    assert here["code"] == ray_probe.studio_code_hash() and here["versions"]["torch"] and here["shared_error"] is None
    assert ray_probe.probe("studio_not_installed_here", None, None)["code"] is None
    assert ray_probe.probe("studio", str(tmp_path / "nope"), None)["shared_error"] == "no such folder on this node"
    assert "another folder" in ray_probe.probe("studio", str(tmp_path), "marker")["shared_error"]
    (tmp_path / "marker").write_bytes(b"")
    assert ray_probe.probe("studio", str(tmp_path), "marker")["shared_error"] is None
    real_open = open

    def read_only(path, *a, **k):  # this machine's tests run as root: a read-only mount, simulated
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    got = ray_probe.probe("studio", str(tmp_path), "marker")
    assert got["shared_error"] == "cannot write there (Permission denied)"
    node = {"ip": "10.0.0.9", "id": "n"}
    with pytest.raises(ray_farm.FarmError, match=r"--ray-shared: node 10.0.0.9 .* cannot use .*Permission denied"):
        ray_farm._compare(here, got, node, "--ray-address", tmp_path)
    for change, words in (({"code": None}, "the studio is not installed on node 10.0.0.9"),
                          ({"versions": {**here["versions"], "diffusers": "0.41.0"}}, "has diffusers 0.41.0"),
                          ({"code": "0" * 64}, "other studio code")):
        with pytest.raises(ray_farm.FarmError, match=words):
            ray_farm._compare(here, {**here, **change}, node, "--ray-address", None)
    torch_build = {**here, "versions": {**here["versions"], "torch": here["versions"]["torch"].split("+")[0] + "+cu128"}}
    ray_farm._compare(here, torch_build, node, "--ray-address", None)  # a CUDA build of the same torch is the same


def test_eval_on_an_executor_lists_a_failed_job_and_scores_the_rest(tmp_path, manager):
    """run_prompt_set(executor=...): outcomes may come in any order and fail; the rows keep the jobs' order, a failed
    job is listed (results.json info.failed, the markdown) instead of scored."""
    from studio import evaluation

    class OneFails:  # an executor: the first job's worker "fails", the others render here, last job first
        loads = 0

        def info(self):
            return {"kind": "test"}

        def run(self, jobs, deliver, stop, cancel, on_step=None):
            deliver(jobs[0], batch.Outcome(jobs[0].id, batch.FAILED, error="its worker died 3 time(s)"))
            for job in reversed(jobs[1:]):
                deliver(job, batch.execute(job, manager))

    ps_file = tmp_path / "three.yaml"
    ps_file.write_text(EVAL_SET.replace("seeds: [0]", "seeds: [0, 1]"))
    ps = evaluation.load_prompt_set(ps_file)
    res = evaluation.run_prompt_set(ps, ["full"], tmp_path / "out", evaluation.Scorer("x/none", "x/none"),
                                    executor=OneFails())
    assert res.info["failed"] == [{"config": "full", "shot": "star", "seed": 0, "status": "failed",
                                   "error": "its worker died 3 time(s)"}]
    assert [(r["shot"], r["seed"]) for r in res.rows] == [("star", 1), ("circle", 0), ("circle", 1)]
    assert "Failed, not scored (1):" in evaluation.markdown(res) and "| full | 3 |" in evaluation.markdown(res)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["info"]["failed"][0]["shot"] == "star"
    assert not (tmp_path / "out" / "videos" / "full" / "star-s0.mp4").exists()
    side = json.loads((tmp_path / "out" / "videos" / "full" / "circle-s1.json").read_text())
    assert side["eval"]["shot_id"] == "circle" and side["shot"]["seed"] == 1


@pytest.mark.parametrize("args, words", [
    (["--ray-workers", "0", "--ray"], "--ray-workers: must be 1 or more"),
    (["--ray-retries", "-1", "--ray"], "--ray-retries: must be 0 or more"),
    (["--ray-retries", "1"], "--ray-retries: only with --ray"),
    (["--ray-shared"], "--ray-shared: only with --ray"),
])
def test_bad_ray_flags_are_one_line(tmp_path, capsys, args, words):
    pytest.importorskip("ray")
    assert cli.main(["batch", STAR, "--out", str(tmp_path / "o"), *args]) == 2
    assert words in one_line_error(capsys) and not (tmp_path / "o").exists()


def test_an_unreachable_address_is_one_line_before_any_render(tmp_path, capsys, free_port, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(engine, "render", lambda *a, **k: pytest.fail("rendered"))
    port = free_port()  # nothing listens there
    assert cli.main(["batch", STAR, "--out", str(tmp_path / "o"), "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = one_line_error(capsys)
    assert f"--ray-address: cannot reach a Ray cluster at 127.0.0.1:{port}" in err and "ray start --head" in err
    assert cli.main(["eval", "presets/evals/toyworld.yaml", "--out", str(tmp_path / "e"), "--ray-address",
                     f"ray://127.0.0.1:{port}"]) == 2
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in one_line_error(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


# --- on a local cluster of 2 CPUs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm(ray_cluster):
    """The farm `studio batch --ray` builds (ray_farm.farm: the nodes checked, 2 workers started and ready), kept for
    the module: each worker takes seconds to start (torch, the studio), so the tests share them."""
    with ray_farm.farm() as f:
        yield f


def _on(farm):
    """A stand-in for ray_farm.farm that yields the module's farm (the CLI's --ray then runs on it)."""
    calls = []

    @contextlib.contextmanager
    def same(*args, **kwargs):
        calls.append((args, kwargs))
        yield farm

    return same, calls


@pytest.fixture(scope="module")
def ray_batch(farm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "out"
    err = io.StringIO()
    same, calls = _on(farm)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(ray_farm, "farm", same)
        code = cli.main(["batch", STAR, "--out", str(out), *SWEEPS, *SETS, "--ray"])
    assert len(calls) == 1
    return out, code, err.getvalue()


def test_a_ray_batch_writes_every_output_and_frames_equal_studio_render(ray_batch, tmp_path):
    out, code, err = ray_batch
    assert code == 0, err[-3000:]
    m = manifest(out)
    names = ["toyworld-star__seed=3__noise_prior.gamma=0", "toyworld-star__seed=3__noise_prior.gamma=0.4",
             "toyworld-star__seed=4__noise_prior.gamma=0", "toyworld-star__seed=4__noise_prior.gamma=0.4"]
    assert [j["id"] for j in m["jobs"]] == names and m["status"] == "finished"
    assert m["counts"] == {"done": 4, "skipped": 0, "failed": 0, "cancelled": 0, "pending": 0}
    assert m["contact_sheets"] == ["contact_sheet.png"] and (out / batch.CONTACT_SHEET).is_file()
    ex = m["executor"]
    assert ex["kind"] == "ray" and ex["workers"] == 2 and ex["torch_threads"] == [1] and ex["replaced"] == 0
    assert ex["outputs"] == "written by the driver"
    assert m["pipeline_loads"] == 2  # one per worker, though 4 jobs ran
    assert "2 Ray worker(s)" in err and "[4/4]" in err
    for j in m["jobs"]:
        assert j["video"] == f"{j['id']}.mp4" and (out / j["video"]).is_file()
        mine = json.loads((out / j["sidecar"]).read_text())
        assert mine["batch"]["job_hash"] == j["job_hash"] == batch.sidecar_hash(out / j["sidecar"])
        assert mine["settings"]["torch_threads"] == 1 and mine["settings"]["device"] == "cpu"
        single = tmp_path / f"{j['id']}.mp4"  # `studio render` here, at the same thread count (1)
        sets = [f"seed={j['values']['seed']}", f"noise_prior.gamma={j['values']['noise_prior.gamma']}"]
        assert cli.main(["render", STAR, "--out", str(single), *SETS, *[a for s in sets for a in ("--set", s)],
                         "--no-progress"]) == 0
        theirs = json.loads(single.with_suffix(".json").read_text())
        assert mine["frames"] == theirs["frames"], j["id"]  # bit for bit: same SHA-256 of the uint8 frames
        assert mine["shot"] == theirs["shot"] and mine["identity"] == theirs["identity"]
        assert mine["settings"] == theirs["settings"]
        assert batch.sidecar_hash(single.with_suffix(".json")) == j["job_hash"]  # a local batch would skip it


EVAL_SET = """
name: two
model: toyworld
seeds: [0]
defaults: {steps: 2}
configs: [full]
shots:
  - id: star
    prompt: a yellow star on sky
    camera: {cx: 0.5}
    subjects: [{phrase: yellow star, boxes: {0: [0.0, 0.25, 0.45, 0.75], 7: [0.55, 0.25, 1.0, 0.75]}}]
  - id: circle
    prompt: a red circle on grass
    subjects: [{phrase: red circle, boxes: {0: [0.5, 0.25, 0.95, 0.75], 7: [0.05, 0.25, 0.5, 0.75]}}]
"""


def _table_without_times(md: str) -> list[str]:
    """The markdown table's rows without the render-time column (the one value that is the machine's, not the
    frames'), and the text below it."""
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| config"))
    assert lines[head].rstrip().endswith("| Render s ↓ |")
    table = [ln.rsplit("|", 2)[0] for ln in lines[head:] if ln.startswith("|")]
    return table + [ln for ln in lines[head:] if not ln.startswith("|")]


def test_eval_on_ray_gives_the_table_of_a_local_eval(farm, tmp_path, capsys, monkeypatch):
    ps = tmp_path / "two.yaml"
    ps.write_text(EVAL_SET)
    same, calls = _on(farm)
    monkeypatch.setattr(ray_farm, "farm", same)
    assert cli.main(["eval", str(ps), "--out", str(tmp_path / "ray"), "--ray", "--no-progress", *NO_WEIGHTS]) == 0
    assert cli.main(["eval", str(ps), "--out", str(tmp_path / "local"), "--no-progress", *NO_WEIGHTS]) == 0
    capsys.readouterr()
    assert len(calls) == 1
    ray_md, local_md = ((tmp_path / d / "results.md").read_text() for d in ("ray", "local"))
    assert _table_without_times(ray_md) == _table_without_times(local_md)
    assert "| full | 2 |" in ray_md
    ray_res, local_res = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ray", "local"))
    for a, b in zip(ray_res["videos"], local_res["videos"], strict=True):
        assert {k: v for k, v in a.items() if k not in ("render_s", "video")} == \
            {k: v for k, v in b.items() if k not in ("render_s", "video")}
    assert ray_res["skipped"] == local_res["skipped"]
    assert ray_res["info"]["executor"]["kind"] == "ray" and ray_res["info"]["failed"] == []
    for shot in ("star", "circle"):
        a, b = (json.loads((tmp_path / d / "videos" / "full" / f"{shot}-s0.json").read_text())
                for d in ("ray", "local"))
        assert a["frames"] == b["frames"] and a["eval"] == b["eval"] and a["settings"] == b["settings"]


def test_a_cluster_without_the_studio_is_one_line_before_any_render(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray_farm, "STUDIO_PACKAGE", "studio_not_installed_here")  # what the nodes must import
    out = tmp_path / "out"
    assert cli.main(["batch", STAR, "--out", str(out), "--ray", "--ray-shared", *SETS]) == 2
    err = one_line_error(capsys)
    assert "the studio is not installed on node" in err and 'pip install -e ".[ray]"' in err
    assert not out.exists()  # no manifest, no check file, not even the folder


def test_a_shared_folder_that_cannot_be_written_is_one_line(ray_cluster, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["batch", STAR, "--out", str(afile / "out"), "--ray", "--ray-shared", *SETS]) == 2
    assert "is a file" in one_line_error(capsys)
    cluster = ray_farm.connect()
    with pytest.raises(ray_farm.FarmError, match=re.escape(f"--ray-shared: cannot write in {afile / 'x'}")):
        ray_farm.check_nodes(cluster, afile / "x")
    good = tmp_path / "shared"
    checked = ray_farm.check_nodes(cluster, good)  # every node sees the driver's marker and can write there
    assert [c["shared_error"] for c in checked] == [None] and list(good.iterdir()) == []


def test_a_worker_that_dies_is_replaced_and_its_job_retried_then_failed(ray_batch, farm, ray_cluster, tmp_path):
    """Deterministic faults: the worker running the 2nd job exits before rendering, every time (2 attempts with
    retries=1: failed, with the reason); the one running the 3rd (a worker that holds the model by then) exits at
    its first denoising step, once (retried on a new worker: done, the same frames); the others finish. The workers
    write the outputs themselves (a shared folder). Last in the module: it replaces the shared farm's workers."""
    first, _, _ = ray_batch
    out = tmp_path / "out"
    plan = batch.plan([STAR], out, ["seed=[3, 4]", "noise_prior.gamma=[0, 0.4]"], ["steps=2"])
    ids = [j.id for j in plan.order]
    faults = [ray_farm.Fault(ids[1], times=9, step=0), ray_farm.Fault(ids[2], times=1, step=1)]
    pids = {ray_cluster.get(m.actor.ready.remote())["pid"] for m in farm.pool.members}
    replaced = farm.pool.replaced
    notes = []
    executor = ray_farm.RayExecutor(farm.pool, retries=1, shared_out=out.absolute(), faults=faults,
                                    notify=notes.append)
    report = batch.run(plan, executor)
    now = {ray_cluster.get(m.actor.ready.remote())["pid"] for m in farm.pool.members}
    assert report.exit_status == batch.EXIT_FAILED_BASE + 1
    m = manifest(out)
    status = {j["id"]: j for j in m["jobs"]}
    assert [status[i]["status"] for i in ids] == ["done", "failed", "done", "done"]
    assert status[ids[1]]["error"].startswith("its worker died 2 time(s) (retries: 1); last: the worker process "
                                              "exited unexpectedly")
    assert not (out / f"{ids[1]}.mp4").exists()
    assert m["executor"]["replaced"] == 3 and m["executor"]["outputs"] == "written by the workers"
    assert sorted(m["executor"]["retried"]) == sorted(ids[1:3]) and len(m["executor"]["retried"][ids[1]]) == 2
    assert farm.pool.replaced - replaced == 3 and len(now) == 2 and now != pids  # new worker processes
    assert len(notes) == 3 and sum("no retries left" in n for n in notes) == 1
    for i in (ids[0], ids[2], ids[3]):  # the retried job's frames too: equal to the first Ray batch's
        assert json.loads((out / f"{i}.json").read_text())["frames"] == \
            json.loads((first / f"{i}.json").read_text())["frames"]
    assert json.loads((out / f"{ids[2]}.json").read_text())["batch"]["job_id"] == ids[2]
    assert (out / batch.CONTACT_SHEET).is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no check or temporary files left
