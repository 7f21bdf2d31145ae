"""Fixtures of the deploy tests: the CPU image, built once per session (cached layers, see
image_helpers) and mounted read-only; skipped (failed in CI) where podman cannot run."""
from __future__ import annotations

import subprocess

import pytest

from image_helpers import build_image, require_image_tools


@pytest.fixture(scope="session")
def opd_image():
    podman = require_image_tools()
    image = build_image(podman)
    yield image
    subprocess.run([podman, "image", "unmount", image.ref], capture_output=True)
