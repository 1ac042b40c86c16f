"""`mas2c image`: an OCI image of a compiled system, on the sandbox's base image.

Contract:

- Input: a spec (compiled in memory, nothing written to disk) or a build folder made by
  `mas2c compile` (every file its ``MANIFEST.json`` lists must be there, unchanged: an
  edited generated file is refused with the list of what differs, never shipped silently).
- Base: the sandbox image (:data:`mas2c.sandbox.DEFAULT_IMAGE`, which holds python3 and
  the runtime's wheels, ``openai`` and ``httpx``); when it is missing it is built with
  :func:`mas2c.sandbox.build_image`, offline-capable. Another base is a parameter and
  must already be present.
- The build is offline and deterministic: the build runs with ``network_mode="none"``;
  without ``serve`` the Dockerfile has no ``RUN`` (nothing executes); with ``serve`` one
  ``RUN`` installs the serve extra (starlette, uvicorn) with ``--no-index`` from wheels
  fetched on the host beforehand (as ``mas2c sandbox build`` does, cache included). The
  context is a tar made here with sorted entries, owner root and fixed modes and
  times, and the package is the last layer, so that layer has the same content digest
  (diff id) for the same build folder on any machine; labels carry no time. (Docker
  stamps the image config with its creation time, so the image id differs between builds.)
- The image: the package under ``/opt/mas2c/app`` (root-owned, read-only to the
  program), ``PYTHONPATH`` pointing there, user 1000:1000, working directory ``/tmp``,
  ``ENTRYPOINT ["python3", "-m", "mas2c_<name>"]``. It writes nothing outside ``/tmp``
  and the paths the caller names, so it runs with ``--read-only --tmpfs /tmp``.
  With ``serve``, ``EXPOSE 8000`` and ``IMAGE serve --host 0.0.0.0`` serves it over HTTP.
  Labels: ``mas2c.package``, ``mas2c.serve`` (``1``/``0``), ``mas2c.spec``, ``mas2c.spec_sha256``, ``mas2c.version``
  (the compiler that generated the package), ``mas2c.base`` (the base image's id) and
  the OCI ``org.opencontainers.image.title`` / ``.version`` / ``.description``.
- No key and no endpoint are baked in: ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (or
  ``MAS2C_LLM_SOCKET``) are given at ``docker run`` time.

Errors: :class:`ImageError` (code ``image``) for a build that fails, a missing daemon
or base; :class:`mas2c.errors.UsageError` for a target that is not a spec or a build.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mas2c.errors import RunFailure, UsageError
from mas2c.files import MAX_MANIFEST_BYTES, read_manifest, read_regular

#: Where the package lives in the image (on PYTHONPATH).
APP_DIR = "/opt/mas2c/app"
#: Files of a build that go into the image besides the package folder.
_PROJECT_FILES = ("MANIFEST.json", "README.md", "pyproject.toml")
#: The time stamped on every file of the build context (1980-01-01, as in wheels).
_EPOCH = 315532800
_TAG_RE = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
)
_PACKAGE_RE = re.compile(r"^mas2c_[a-z][a-z0-9_]*$")

DOCKERFILE = """\
# An image of a compiled mas2c system, built by `mas2c image` (no network in the build).
ARG BASE
FROM ${{BASE}}
{serve}COPY app/ {app}/
ENV PYTHONPATH={app} \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    HOME=/tmp \\
    LANG=C.UTF-8
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["python3", "-m", "{package}"]
CMD ["--help"]
"""

# With --serve: the `serve` extra (starlette, uvicorn) from wheels fetched on the host,
# installed with --no-index (Debian's python3 has no pip: then pip runs from its wheel).
SERVE_STEP = """\
USER 0:0
COPY wheels/ /opt/mas2c-wheels/
RUN set -eu; \\
    if python3 -m pip --version >/dev/null 2>&1; then pip="python3 -m pip"; \\
    else pip="python3 $(ls /opt/mas2c-wheels/pip-*.whl | head -n 1)/pip"; fi; \\
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PIP_ROOT_USER_ACTION=ignore \\
        $pip install --no-index --find-links /opt/mas2c-wheels \\
            -r /opt/mas2c-wheels/requirements.txt; \\
    rm -rf /opt/mas2c-wheels; \\
    python3 -c 'import starlette, uvicorn'
EXPOSE 8000
"""
#: The `serve` extra of compiled packages (templates/pyproject.toml.j2).
SERVE_REQUIREMENTS = ("starlette>=0.37", "uvicorn>=0.30")


class ImageError(RunFailure):
    """Building the image failed (daemon, base image, build); the message says why."""

    code = "image"


@dataclass(frozen=True)
class System:
    """A compiled system as files (path relative to the build folder -> bytes)."""

    package: str
    spec_name: str
    spec_sha256: str
    compiler_version: str
    summary: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class ImageResult:
    tag: str
    image_id: str
    package: str
    labels: dict[str, str]
    #: The content digest of the layer holding the package (stable across builds).
    package_layer: str

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.tag,
            "id": self.image_id,
            "package": self.package,
            "labels": self.labels,
            "package_layer": self.package_layer,
        }


# -- the system ------------------------------------------------------------------------------


def load_system(target: Path) -> System:
    """A build folder (checked against its manifest) or a spec (compiled in memory)."""
    if target.is_dir():
        return _from_build(target)
    if not target.is_file():
        raise UsageError(f"{target}: no such file or directory")
    from mas2c.compile import compile_spec
    from mas2c.lang.validate import load_spec

    build = compile_spec(load_spec(target))
    return _system(build.manifest, build.files, str(target))


def _from_build(folder: Path) -> System:
    manifest_path = folder / "MANIFEST.json"
    if not manifest_path.is_file():
        raise UsageError(
            f"{folder}: not a build folder (no MANIFEST.json); give a spec or `mas2c compile` output"
        )
    try:
        manifest = read_manifest(folder)
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("`files` must be an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{manifest_path}: unreadable manifest ({exc})") from None
    files: dict[str, bytes] = {}
    changed: list[str] = []
    for rel, digest in sorted(listed.items()):
        path = folder / rel
        if not _safe_relative(rel) or not path.is_file() or path.is_symlink():
            changed.append(f"{rel} (missing)")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            changed.append(f"{rel} (edited)")
        files[rel] = data
    if changed:
        raise UsageError(
            f"{folder}: the build differs from its MANIFEST.json: {', '.join(changed)}; "
            "recompile it with `mas2c compile` (an image ships exactly what the compiler wrote)"
        )
    files["MANIFEST.json"] = read_regular(manifest_path, MAX_MANIFEST_BYTES)
    return _system(manifest, files, str(folder))


def _safe_relative(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _system(manifest: Mapping[str, Any], files: Mapping[str, bytes], where: str) -> System:
    package = manifest.get("package")
    if not isinstance(package, str) or not _PACKAGE_RE.match(package):
        raise UsageError(f"{where}: the manifest names no valid package ({package!r})")
    spec_data = manifest.get("spec")
    spec: Mapping[str, Any] = spec_data if isinstance(spec_data, dict) else {}
    description = str(spec.get("description") or manifest.get("spec_name") or package)
    keep = {
        rel: data
        for rel, data in files.items()
        if rel.startswith(f"{package}/") or rel in _PROJECT_FILES
    }
    return System(
        package=package,
        spec_name=str(manifest.get("spec_name", "")),
        spec_sha256=str(manifest.get("spec_sha256", "")),
        compiler_version=str(manifest.get("compiler_version", "")),
        summary=description.strip().splitlines()[0][:200] if description.strip() else package,
        files=keep,
    )


# -- the build context ---------------------------------------------------------------------------


def dockerfile(package: str, *, serve: bool = False) -> str:
    return DOCKERFILE.format(app=APP_DIR, package=package, serve=SERVE_STEP if serve else "")


def serve_requirements() -> list[str]:
    """The serve extra, pinned to the versions installed here when there are some."""
    from importlib import metadata

    pinned = []
    for req in SERVE_REQUIREMENTS:
        name = re.split(r"[<>=!~ ]", req, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(req)
    return pinned


def labels(system: System, base_id: str, *, serve: bool = False) -> dict[str, str]:
    return {
        "mas2c.serve": "1" if serve else "0",
        "mas2c.package": system.package,
        "mas2c.spec": system.spec_name,
        "mas2c.spec_sha256": system.spec_sha256,
        "mas2c.version": system.compiler_version,
        "mas2c.base": base_id,
        "org.opencontainers.image.title": system.package.replace("_", "-"),
        "org.opencontainers.image.version": "1.0.0",
        "org.opencontainers.image.description": system.summary,
    }


def context_tar(system: System, wheels: Mapping[str, bytes] | None = None) -> bytes:
    """The build context: Dockerfile + app/<files> (+ wheels/ with --serve),
    byte-identical for the same system (and wheels)."""
    buf = io.BytesIO()
    serve = wheels is not None
    entries: dict[str, bytes | None] = {
        "Dockerfile": dockerfile(system.package, serve=serve).encode()
    }
    if wheels is not None:
        entries["wheels"] = None
        entries.update({f"wheels/{name}": data for name, data in wheels.items()})
    for rel, data in system.files.items():
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("app/" + "/".join(parts[:depth]), None)
        entries["app/" + rel] = data
    entries.setdefault("app", None)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            content = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = _EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


# -- building ------------------------------------------------------------------------------------


def build(
    target: Path,
    tag: str,
    *,
    base: str | None = None,
    serve: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> ImageResult:
    """Build the image of `target` (spec or build folder) as `tag` and return what was built.
    `serve`: include the serve extra (starlette, uvicorn), so the image can run
    ``IMAGE serve --host 0.0.0.0``."""
    if not _TAG_RE.match(tag):
        raise UsageError(
            f"-t {tag!r}: not a valid image name[:tag] (lowercase name, optional :tag)"
        )
    system = load_system(target)
    from mas2c import sandbox

    say = on_progress or (lambda _msg: None)
    docker = sandbox._import_docker()
    base_ref = base or sandbox.DEFAULT_IMAGE
    try:
        client = sandbox._docker_client(timeout=600)
    except sandbox.SandboxError as exc:
        raise ImageError(str(exc)) from None
    try:
        if not sandbox._image_present(client, base_ref):
            if base is not None and base != sandbox.DEFAULT_IMAGE:
                raise ImageError(
                    f"base image {base_ref} is not present: build or `docker load` it first"
                )
            say(f"the sandbox image {base_ref} is missing: building it (offline-capable) ...")
            client.close()
            try:
                sandbox.build_image(tag=base_ref, on_progress=say)
            except sandbox.SandboxError as exc:
                raise ImageError(f"cannot build the base image {base_ref}: {exc}") from None
            client = sandbox._docker_client(timeout=600)
        base_id = str(client.images.get(base_ref).id)
        image_labels = labels(system, base_id, serve=serve)
        wheels = _serve_wheels(client, base_ref, say) if serve else None
        say(f"building {tag} from {base_ref} ({system.package}, {len(system.files)} files) ...")
        stream = client.api.build(
            fileobj=io.BytesIO(context_tar(system, wheels)),
            custom_context=True,
            tag=tag,
            buildargs={"BASE": base_ref},
            labels=image_labels,
            rm=True,
            forcerm=True,
            pull=False,
            network_mode="none",
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                raise ImageError(f"building {tag} failed: {str(chunk['error']).strip()}")
            line = str(chunk.get("stream", "")).rstrip()
            if line:
                say(line)
        image = client.images.get(tag)
        layers = image.attrs.get("RootFS", {}).get("Layers") or [""]
        return ImageResult(
            tag=tag,
            image_id=str(image.id),
            package=system.package,
            labels=image_labels,
            package_layer=str(layers[-1]),
        )
    except docker.errors.DockerException as exc:
        raise ImageError(f"building {tag} failed: {sandbox._short_reason(exc)}") from None
    finally:
        client.close()


def _serve_wheels(client: Any, base_ref: str, say: Callable[[str], None]) -> dict[str, bytes]:
    """The serve extra's wheels for the base image's Python, fetched on the host (as
    `mas2c sandbox build` fetches the runtime's): name -> bytes, plus requirements.txt."""
    import tempfile

    from mas2c import sandbox

    try:
        info = sandbox._probe_python(client, base_ref)
        with tempfile.TemporaryDirectory(prefix="mas2c-image-wheels-") as tmp:
            sandbox._download_wheels(Path(tmp), info, say, serve_requirements())
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    except sandbox.SandboxError as exc:
        raise ImageError(f"cannot fetch the serve extra's wheels: {exc}") from None


def run_line(tag: str, *, serve: bool = False) -> str:
    """The documented `docker run` line for an image (key and endpoint from the environment)."""
    if serve:
        return (
            "docker run --rm --read-only --tmpfs /tmp --cap-drop ALL "
            "--security-opt no-new-privileges -p 8000:8000 -e OPENAI_API_KEY -e OPENAI_BASE_URL "
            f"{tag} serve --host 0.0.0.0 --port 8000"
        )
    return (
        "docker run --rm -i --read-only --tmpfs /tmp --cap-drop ALL "
        "--security-opt no-new-privileges -e OPENAI_API_KEY -e OPENAI_BASE_URL "
        f"{tag} --input - --output -"
    )
