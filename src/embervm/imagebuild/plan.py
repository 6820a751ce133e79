"""The typed build plan a Dockerfile becomes: steps that change the disk, and image settings.

Each step carries the state it runs in (environment, build args, working directory, user,
shell), so a step's cache key can be computed from the step alone (``embervm.imagebuild.cache``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class StepState:
    """What a RUN sees: ENV (persisted), ARG values (build-time only), WORKDIR, USER, SHELL."""

    env: tuple[tuple[str, str], ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""  # "" = root
    shell: tuple[str, ...] = ("/bin/sh", "-c")

    def run_env(self) -> dict[str, str]:
        """The environment of a RUN: build args, overridden by ENV of the same name."""
        merged = dict(self.build_args)
        merged.update(self.env)
        return merged


@dataclass(frozen=True)
class InlineFile:
    """A file whose bytes come from the Dockerfile itself (a heredoc)."""

    name: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class RunStep:
    line: int
    text: str  # e.g. "RUN pip install -r requirements.txt" (first line, for messages)
    argv: tuple[str, ...]
    state: StepState
    script: InlineFile | None = None  # a heredoc with a #! line, run as a file
    kind: str = "RUN"


@dataclass(frozen=True)
class CopyStep:
    line: int
    text: str
    sources: tuple[str, ...]  # context paths or globs, relative to the context root
    inline: tuple[InlineFile, ...]  # heredoc sources
    urls: tuple[str, ...]  # ADD <url> sources (only with egress)
    dest: str  # absolute; a trailing "/" means "into this folder"
    state: StepState
    chown: str | None = None
    chmod: int | None = None
    kind: str = "COPY"  # or "ADD"

    @property
    def source_count(self) -> int:
        return len(self.sources) + len(self.inline) + len(self.urls)


@dataclass(frozen=True)
class WorkdirStep:
    """WORKDIR creates its folder (as Docker does), so it is a disk-changing step."""

    line: int
    text: str
    path: str
    state: StepState
    kind: str = "WORKDIR"


Step = RunStep | CopyStep | WorkdirStep


@dataclass(frozen=True)
class ImageConfig:
    """What the image runs with once built (the non-disk half of the Dockerfile)."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    exposed_ports: tuple[int, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    entrypoint_shell_form: bool = False

    def app_argv(self) -> list[str]:
        """Docker's ENTRYPOINT/CMD combination (both already resolved to argv).

        A shell-form ENTRYPOINT ignores CMD; an exec-form one gets CMD appended.
        """
        if self.entrypoint is not None:
            if self.entrypoint_shell_form:
                return list(self.entrypoint)
            return list(self.entrypoint) + list(self.cmd or ())
        return list(self.cmd or ())

    def app_command_text(self) -> str:
        return shlex.join(self.app_argv())


@dataclass(frozen=True)
class BuildPlan:
    base_image: str  # managed image name, e.g. "debian12"
    steps: tuple[Step, ...]
    config: ImageConfig
    warnings: tuple[str, ...] = ()
    from_line: int = 1
