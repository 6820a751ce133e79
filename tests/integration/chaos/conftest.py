"""Fixtures of the chaos tests: the VM lab of ``bench/chaoslib/vm.py`` (network, image),
built once per module on the module's event loop."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from bench.chaoslib import vm

from embervm.guest.artifacts import GuestArtifacts


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm_lab(guest_artifacts: GuestArtifacts) -> AsyncIterator[vm.VmLab]:
    lab = await vm.open_lab(guest_artifacts, Path(f"/tmp/emb-chaos-t{os.getpid()}"))
    try:
        yield lab
    finally:
        await vm.close_lab(lab)
