"""Build docker/Dockerfile.cpu with podman and run its programs the way a container would.

No registry of base images is reachable here and `podman run` cannot set up cgroups on these
machines, so:
- the base image is Debian bookworm from `debootstrap` (+ python3, venv, ca-certificates),
  imported with `podman import`; it stands in for `python:3.11-slim-bookworm`;
- torch comes from a PEP 503 index on disk (`file://`, mounted into the build) holding the CPU
  wheel that this machine's pip finds, and pip trusts the CA bundle this machine's pip is
  configured with (`pip config list`, `PIP_CERT`); both are build arguments of the Dockerfile,
  which is built unchanged;
- a program "runs in the image" as: a private mount namespace, the image's filesystem from
  `podman image mount` (read-only), host directories bound only where the manifests mount
  volumes, /dev and /proc, then `chroot` as the image's user with exactly the image's
  environment plus the service's (`env -i`), in the image's working directory.

Caches (outside the repo, under OPD_DEPLOY_CACHE, default /var/cache/opd-deploy-test): the base
image (tag = hash of the debootstrap inputs), the torch wheelhouse (directory = hash of the
torch version), and podman's own layer cache (a rebuild redoes only the layers whose inputs
changed). This module asserts nothing; the tests do.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import deploy_helpers
from deploy_helpers import REPO

CACHE = Path(os.environ.get("OPD_DEPLOY_CACHE", "/var/cache/opd-deploy-test"))
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_RECIPE = f"debootstrap --variant=minbase --include={','.join(BASE_PACKAGES)} bookworm {MIRROR} v1"
IMAGE = "localhost/opd-services:deploy-test"
BUILD_STAGE = "localhost/opd-services-build:deploy-test"
INSTALL = "apt-get install podman debootstrap (Debian; `make tools` does it as root)"
BUILD_CA = "/run/opd-build-ca.crt"


def require_image_tools() -> str:
    """podman's path. Missing tools or not root: skip saying how, except in CI, where it fails."""
    missing = [t for t in ("podman", "debootstrap", "chroot", "unshare", "ip") if not shutil.which(t)]
    why = f"missing {', '.join(missing)}: {INSTALL}" if missing else (
        "" if os.geteuid() == 0 else "needs root (podman image mount, chroot as uid 10001)")
    if why:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"image build test: {why}")
    return shutil.which("podman")


def _sh(cmd: list[str], log: Path | None = None, timeout: float = 1800, cwd: Path | None = None):
    out = log.open("ab") if log else subprocess.PIPE
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd)
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:] if log else proc.stdout.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return proc


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_image(podman: str, log: Path) -> str:
    """Debian bookworm + python3 as an image, built once per recipe (~2.5 min) and reused."""
    ref = f"localhost/opd-deploy-base:{_digest(BASE_RECIPE)}"
    if subprocess.run([podman, "image", "exists", ref]).returncode == 0:
        return ref
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        _sh(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(root),
             MIRROR], log)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run([podman, "import", "-", ref], stdin=tar.stdout, capture_output=True)
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise RuntimeError(f"podman import failed: {imp.stderr.decode(errors='replace')}")
    return ref


def torch_wheelhouse(log: Path) -> Path:
    """A PEP 503 index on disk with the torch CPU wheel installed here and its dependencies."""
    version = importlib.metadata.version("torch")          # e.g. 2.13.0+cpu: never a CUDA build
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    house = CACHE / f"torch-{_digest(f'{version} py{py} v1')}"
    if (house / ".complete").exists():
        return house
    shutil.rmtree(house, ignore_errors=True)
    wheels = house / "wheels"
    _sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels),
         f"torch=={version}"], log)
    for whl in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
        page = house / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        with (page / "index.html").open("a") as f:
            f.write(f'<a href="../../wheels/{whl.name}">{whl.name}</a>\n')
    (house / ".complete").touch()
    return house


def pip_ca_bundle() -> str | None:
    """The CA bundle this machine's pip uses (`pip config list`: global.cert or PIP_CERT)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    m = re.search(r"^(?:global|:env:)\.cert='([^']+)'", out, flags=re.M)
    path = os.environ.get("PIP_CERT") or (m and m.group(1))
    return path if path and Path(path).is_file() else None


@dataclass(frozen=True)
class Image:
    """A built image, mounted read-only, with what `docker run` would take from its config."""
    ref: str
    root: Path
    env: dict[str, str]
    user: str                   # "uid:gid"
    workdir: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]      # the HEALTHCHECK's CMD
    build_seconds: float

    @property
    def home(self) -> str:
        uid = int(self.user.split(":")[0])
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            f = line.split(":")
            if int(f[2]) == uid:
                return f[5]
        return "/"


def build_image(podman: str) -> Image:
    """Build Dockerfile.cpu (cached layers), tag both stages, drop the images they replace."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / "build.log"
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # one build at a time on this machine
        log.write_text("")
        t0 = time.monotonic()
        base, house, ca = base_image(podman, log), torch_wheelhouse(log), pip_ca_bundle()
        old = {ref: _image_id(podman, ref) for ref in (IMAGE, BUILD_STAGE)}
        args = ["--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL=file:///wheels/simple",
                "-v", f"{house}:/wheels:ro"]
        if ca:
            args += ["--build-arg", f"PIP_CERT={BUILD_CA}", "-v", f"{ca}:{BUILD_CA}:ro"]
        common = [podman, "build", "--isolation", "chroot", "--network", "host", "--format", "docker",
                  "-f", "docker/Dockerfile.cpu", *args]
        _sh([*common, "--target", "build", "-t", BUILD_STAGE, "."], log, cwd=REPO)
        _sh([*common, "-t", IMAGE, "."], log, cwd=REPO)
        for ref, was in old.items():
            if was and was != _image_id(podman, ref):
                subprocess.run([podman, "rmi", was], capture_output=True)   # its unique layers only
        seconds = time.monotonic() - t0
        with log.open("a") as f:
            f.write(f"\nopd-deploy-test: image ready in {seconds:.0f} s\n")
    return mount_image(podman, IMAGE, seconds)


def _image_id(podman: str, ref: str) -> str | None:
    proc = subprocess.run([podman, "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def mount_image(podman: str, ref: str, build_seconds: float = 0.0) -> Image:
    (info,) = json.loads(subprocess.run([podman, "image", "inspect", ref], capture_output=True, check=True).stdout)
    cfg = info["Config"]
    root = Path(subprocess.run([podman, "image", "mount", ref], capture_output=True, text=True, check=True).stdout.strip())
    test = (info.get("Healthcheck") or {}).get("Test") or []
    return Image(ref=ref, root=root, env=dict(e.split("=", 1) for e in cfg.get("Env", [])),
                 user=cfg.get("User") or "0:0", workdir=cfg.get("WorkingDir") or "/",
                 entrypoint=cfg.get("Entrypoint") or [], cmd=cfg.get("Cmd") or [],
                 healthcheck=test[1:] if test[:1] == ["CMD"] else [], build_seconds=build_seconds)


def volume_dir(base: Path, image: Image, *, sticky: bool = False) -> Path:
    """A host directory for a volume, writable by the image's user (a fresh named volume or an
    emptyDir is); /tmp-like volumes are world-writable with the sticky bit."""
    base.mkdir(parents=True, exist_ok=True)
    uid, gid = (int(x) for x in image.user.split(":"))
    os.chown(base, uid, gid)
    if sticky:
        base.chmod(0o1777)
    return base


def image_command(image: Image, argv: list[str], *, env: dict[str, str], volumes: dict[str, Path],
                  hosts: Path | None = None, netns: str | None = None) -> list[str]:
    """The command line that runs `argv` (already resolved against ENTRYPOINT) in the image."""
    r = shlex.quote(str(image.root))
    steps = ["set -e", f"mount --rbind /dev {r}/dev", f"mount -t proc proc {r}/proc"]
    for target, host in volumes.items():
        if not (image.root / target.lstrip("/")).is_dir():
            raise FileNotFoundError(f"volume target {target} does not exist in the image")
        steps.append(f"mount --bind {shlex.quote(str(host))} {r}{shlex.quote(target)}")
    if hosts:
        steps.append(f"mount --bind {shlex.quote(str(hosts))} {r}/etc/hosts")
    full_env = {"HOME": image.home, **image.env, **env}
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in full_env.items())
    steps.append(f"exec chroot --userspec={image.user} {r} /usr/bin/env -i -C {shlex.quote(image.workdir)} "
                 f"{assigns} {shlex.join(argv)}")
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(steps)]
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


class ImageProcess:
    """One program running in the image, its output in a log file; stop() = SIGTERM, then kill."""

    def __init__(self, image: Image, argv: list[str], *, log: Path, **kw):
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(image_command(image, argv, **kw), stdout=self._out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def run_in_image(image: Image, argv: list[str], *, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(image_command(image, argv, **kw), capture_output=True, text=True, timeout=timeout)


def wait_http(url: str, *, proc: ImageProcess, timeout: float = 180) -> None:
    deploy_helpers.wait_http(url, proc.proc, proc.text, timeout)
