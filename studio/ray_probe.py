"""What a Ray node has installed, read on that node: sent to it by value (see studio.ray_farm.check_nodes), so it
runs even where the studio itself is not installed, and says so instead of failing to unpickle.

Nothing here imports torch or the studio: the versions come from the installed distributions' metadata and the
studio's code from its files, so a probe takes well under a second.
"""

from __future__ import annotations

# distribution -> how it is named in an error; each must be the same version on the driver and every node
DISTRIBUTIONS = {"shot-studio": "the studio", "torch": "torch", "diffusers": "diffusers",
                 "transformers": "transformers", "ray": "ray"}


def studio_code_hash(package: str = "studio") -> str | None:
    """SHA-256 over the studio package's Python files (relative path and bytes, sorted): equal on two machines when
    they run the same studio code. None when the package cannot be found."""
    import hashlib
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def installed(package: str = "studio") -> dict:
    """This machine's host, Python, the versions of DISTRIBUTIONS (None: not installed) and the studio code's hash."""
    import importlib.metadata
    import platform
    import socket

    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"host": socket.gethostname(), "python": platform.python_version(), "versions": versions,
            "code": studio_code_hash(package)}


def probe(package: str, shared: str | None, marker: str | None) -> dict:
    """`installed()` on this node, and for a shared output folder whether this node sees the driver's marker file
    in it and can write there (shared_error: None, or why not)."""
    import os
    import uuid

    out = installed(package)
    out["shared_error"] = None
    if shared is not None:
        if not os.path.isdir(shared):
            out["shared_error"] = "no such folder on this node"
        elif marker is not None and not os.path.isfile(os.path.join(shared, marker)):
            out["shared_error"] = "this node sees another folder at that path (not the driver's shared folder)"
        else:
            test = os.path.join(shared, f".studio-ray-write-{uuid.uuid4().hex}")
            try:
                with open(test, "wb") as f:
                    f.write(b"x")
                os.remove(test)
            except OSError as e:
                out["shared_error"] = f"cannot write there ({e.strerror or type(e).__name__})"
    return out
