"""The helper process of tests/test_kill_safety.py: imports the CLI and its libraries once, then forks one child
per job, which sets SHOT_STUDIO_KILL_AT (studio.faults) and its own studio home, runs the job and is expected to
die of SIGKILL at that point. Prints {home: signal the child died of, or minus its exit status} as JSON.

    python tests/kill_helper.py JOBS.json

A job is {"home", "point", and "argv" (a `studio` command line) or "library" ("overwrite" | "delete": the
library's save(overwrite=True) / delete of 'rex' called directly, for the points inside them)}.
"""

import json
import os
import sys
from pathlib import Path

os.environ["SHOT_STUDIO_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # no OpenMP thread team exists when the children fork

from studio import cli  # noqa: E402
from studio.pipelines import load_pipeline  # noqa: E402
from studio.presets import load_model_preset  # noqa: E402
from studio.subjects import masks, tune  # noqa: E402,F401
from studio.subjects.library import SubjectLibrary  # noqa: E402

NEW = {"trigger": "<rex-1> dog", "class_word": "dog", "base_model": "toyworld", "training": {"steps": 2}}


def library_job(home: str, action: str) -> int:
    lib = SubjectLibrary(Path(home) / "subjects")
    if action == "delete":
        lib.delete("rex")
        return 0
    photos = [np.full((32, 32, 3), 50 * (i + 1), np.uint8) for i in range(2)]
    shapes = [np.zeros((32, 32), bool) for _ in photos]
    for m in shapes:
        m[8:24, 8:24] = True
    lib.save("rex", photos, shapes, NEW, embeds={"<rex-1>": torch.ones(32)}, overwrite=True)
    return 0


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    if any("argv" in job for job in jobs):
        load_pipeline(load_model_preset("toyworld"), "cpu")  # every module a load imports, imported before forking
    results = {}
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            os.environ.update(SHOT_STUDIO_HOME=job["home"], SHOT_STUDIO_KILL_AT=job["point"])
            code = 1
            try:
                code = cli.main(job["argv"]) if "argv" in job else library_job(job["home"], job["library"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[job["home"]] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
