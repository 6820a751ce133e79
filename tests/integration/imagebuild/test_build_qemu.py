"""ImageBuild on real QEMU microVMs (TCG) through the real guest agent: steps run in the VM,
layers are frozen and reused by the cache, the app becomes ready through the agent's hook
relay, a failing RUN reports its exit code and output, nothing keeps running afterwards."""

from __future__ import annotations

import shutil
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.build_qemu_helpers import QEMU, QemuTestProvider

from embervm.errors import BuildFailure
from embervm.guest.artifacts import GuestArtifacts
from embervm.imagebuild import BuildSpec, HookSettings, ImageBuild, LocalLayerCache, MemoryBuildLog

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"

DOCKERFILE = """FROM embervm/debian12
WORKDIR /app
COPY deps.txt .
RUN echo "installing $(cat deps.txt)" && cp deps.txt /app/installed.txt
COPY static/ /app/static/
COPY app.py .
RUN test -f /app/installed.txt && python3 -m py_compile app.py && echo "compiled app"
RUN stat -c '%a %u:%g %n' /app/static/css /app/static/css/site.css
ENV GREETING=hello
EXPOSE 8080
CMD ["python3", "/app/app.py"]
"""

APP = """import http.server, os

class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        ok = self.path == "/aws/lambda-microvms/runtime/v1/ready"
        self.send_response(200 if ok else 404)
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(os.environ["GREETING"].encode())

print("app listening", VERSION, flush=True)
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def write_zip(path: Path, dockerfile: str, version: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Dockerfile", dockerfile)
        zf.writestr("deps.txt", "flask\n")
        css = zipfile.ZipInfo("static/css/site.css")
        css.external_attr = 0o100640 << 16
        zf.writestr(css, "body {}\n")
        zf.writestr("app.py", f"VERSION = {version!r}\n" + APP)
    return path


@pytest.fixture
async def provider(
    guest_artifacts: GuestArtifacts, tmp_path: Path
) -> AsyncIterator[QemuTestProvider]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    p = QemuTestProvider(guest_artifacts, tmp_path / "vms")
    yield p
    for vm in p.vms:  # belt and braces: the build must already have stopped them
        await vm.shutdown()


def spec(tmp_path: Path, archive: Path, name: str) -> BuildSpec:
    return BuildSpec(
        base_image_arn=ARN,
        code_artifact=archive,
        snapshot_dir=tmp_path / name / "snapshot",
        work_dir=tmp_path / "work",
        hooks=HookSettings(ready=True, ready_timeout=60),
        step_timeout=120,
    )


async def test_build_and_app_only_rebuild_in_real_vms(
    provider: QemuTestProvider, tmp_path: Path
) -> None:
    cache = LocalLayerCache(tmp_path / "cache")
    log1 = MemoryBuildLog()
    started = time.monotonic()
    first = await ImageBuild(
        spec(tmp_path, write_zip(tmp_path / "v1.zip", DOCKERFILE, "v1"), "v1"),
        provider=provider,
        cache=cache,
        log=log1,
    ).run()
    first_s = time.monotonic() - started
    assert "installing flask" in log1.messages("stdout")
    assert "compiled app" in log1.messages("stdout")
    assert "640 0:0 /app/static/css/site.css" in log1.messages("stdout")  # folders via put_tree
    assert any(m.endswith(" 0:0 /app/static/css") for m in log1.messages("stdout"))
    assert "app listening v1" in log1.messages("stdout")  # the app's startup output
    assert first.steps_cached == 0
    assert first.code_install_bytes > 0
    assert provider.running() == []

    log2 = MemoryBuildLog()
    started = time.monotonic()
    second = await ImageBuild(
        spec(tmp_path, write_zip(tmp_path / "v2.zip", DOCKERFILE, "v2"), "v2"),
        provider=provider,
        cache=cache,
        log=log2,
    ).run()
    rebuild_s = time.monotonic() - started
    assert second.steps_cached == 4  # WORKDIR, COPY deps.txt, RUN install, COPY static/
    assert "installing flask" not in log2.messages("stdout")
    assert "compiled app" in log2.messages("stdout")  # ran on the cached layer's files
    assert "app listening v2" in log2.messages("stdout")
    assert provider.running() == []
    sys.stderr.write(
        f"[build qemu] first build {first_s:.1f} s, app-only rebuild {rebuild_s:.1f} s\n"
    )


async def test_failing_run_in_a_real_vm(provider: QemuTestProvider, tmp_path: Path) -> None:
    dockerfile = (
        "FROM embervm/debian12\n"
        "RUN python3 -c \"import sys; print('boom', file=sys.stderr); sys.exit(3)\"\n"
        'CMD ["true"]\n'
    )
    log = MemoryBuildLog()
    with pytest.raises(BuildFailure) as err:
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "bad.zip", dockerfile, "x"), "bad"),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "cache"),
            log=log,
        ).run()
    assert "at line 2 failed with exit code 3: boom" in err.value.reason
    assert "boom" in log.messages("stderr")
    assert provider.running() == []
    assert list((tmp_path / "work").iterdir()) == []
