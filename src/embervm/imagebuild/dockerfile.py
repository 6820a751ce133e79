"""Dockerfile → ``BuildPlan``, using Docker's own parser (the ``dockerfile`` package).

What is supported and what is refused is listed in docs/BUILDS.md; in short: one stage
``FROM embervm/<managed image>``; RUN (shell, exec, heredocs), COPY/ADD (globs, ``--chown``,
``--chmod``, heredocs; ADD of URLs only with egress), ENV, ARG, WORKDIR, USER, EXPOSE, LABEL,
CMD, ENTRYPOINT, SHELL. HEALTHCHECK, STOPSIGNAL, VOLUME, MAINTAINER and ONBUILD are ignored
with a warning; multi-stage builds, ``COPY --from``, ``RUN --mount`` and unknown instructions
are refused. Every refusal is a ``BuildFailure`` whose reason names the line and says what to
write instead.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import dockerfile as _parser

from embervm.errors import BuildFailure
from embervm.imagebuild._word_expansion import expand, expand_fields, expand_text
from embervm.imagebuild.plan import (
    BuildPlan,
    CopyStep,
    ImageConfig,
    InlineFile,
    RunStep,
    Step,
    StepState,
    WorkdirStep,
)

MANAGED_IMAGES = frozenset({"debian12"})
MANAGED_PREFIX = "embervm/"
_BASE_ARN = re.compile(r"^arn:aws[a-z-]*:lambda:([a-z0-9-]+):aws:microvm-image:([A-Za-z0-9._-]+)$")
_HEREDOC_ONLY = re.compile(r"^<<-?(['\"]?)([A-Za-z0-9_.-]+)\1$")
_IGNORED = {
    "HEALTHCHECK": "readiness is the ready hook or the app's port",
    "STOPSIGNAL": "the app is stopped by the microVM's lifecycle",
    "VOLUME": "a microVM has one disk, captured in the snapshot",
    "MAINTAINER": "use LABEL instead",
    "ONBUILD": "images built here are not used as Docker base images",
}
MAX_TEXT = 200
# The managed base image's own ENV (as Debian's Docker image sets it), so `ENV PATH=...:$PATH`
# and RUN see the usual search path.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def managed_image_name(base_image_arn: str) -> str:
    """``arn:aws:lambda:<region>:aws:microvm-image:debian12`` → ``debian12``."""
    match = _BASE_ARN.match(base_image_arn)
    if not match or match.group(2) not in MANAGED_IMAGES:
        names = ", ".join(sorted(MANAGED_IMAGES))
        raise BuildFailure(
            f"baseImageArn {base_image_arn[:MAX_TEXT]!r} is not a managed base image; use "
            f"arn:aws:lambda:<region>:aws:microvm-image:<name> with one of: {names}"
        )
    return match.group(2)


def _display(cmd: _parser.Command) -> str:
    first = str(cmd.original).split("\n", 1)[0].strip()
    return first if len(first) <= MAX_TEXT else first[: MAX_TEXT - 3] + "..."


def _where(cmd: _parser.Command) -> str:
    return f"`{_display(cmd)}` at line {cmd.start_line}"


def _escape_token(text: str) -> str:
    """The ``# escape=`` parser directive, if the file starts with one."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        m = re.match(r"#\s*escape\s*=\s*(\S)\s*$", stripped, re.IGNORECASE)
        if m:
            return m.group(1)
    return "\\"


def _flags(cmd: _parser.Command, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for flag in cmd.flags:
        name, _, value = flag.lstrip("-").partition("=")
        if name not in allowed:
            raise BuildFailure(f"{_where(cmd)}: the flag --{name} is not supported")
        out[name] = value
    return out


#: Bounds on what a Dockerfile may define (audit A4): one ENV/ARG/LABEL value, all of them
#: together, how many there are (every word is expanded against all of them), and instructions.
MAX_VALUE = 64 * 1024
MAX_VARIABLES_BYTES = 1024 * 1024
MAX_VARIABLES = 1024
MAX_INSTRUCTIONS = 1000


@dataclass
class _State:
    """The parser's running state while it walks the instructions."""

    escape: str
    build_args: Mapping[str, str]
    meta_args: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    user: str = ""
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    entrypoint_shell: bool = False
    ports: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def define(self, table: dict[str, str], key: str, value: str) -> None:
        """Set one ENV, ARG or LABEL entry, within the bounds on all of them."""
        if len(key) + len(value) > MAX_VALUE:
            raise BuildFailure(f"{key[:80]!r}: variable too long (over {MAX_VALUE} bytes)")
        table[key] = value
        tables = (self.meta_args, self.args, self.env, self.labels)
        count = sum(len(t) for t in tables)
        size = sum(len(k) + len(v) for t in tables for k, v in t.items())
        if count > MAX_VARIABLES:
            raise BuildFailure(f"more than {MAX_VARIABLES} ENV, ARG and LABEL entries")
        if size > MAX_VARIABLES_BYTES:
            raise BuildFailure(
                f"ENV, ARG and LABEL entries over {MAX_VARIABLES_BYTES} bytes in all"
            )

    def vars(self) -> dict[str, str]:
        merged = dict(self.args)
        merged.update(self.env)
        return merged

    def x(self, word: str) -> str:
        return expand(word, self.vars(), escape=self.escape)

    def snapshot(self) -> StepState:
        return StepState(
            env=tuple(self.env.items()),
            build_args=tuple(self.args.items()),
            workdir=self.workdir,
            user=self.user,
            shell=self.shell,
        )

    def resolve(self, path: str) -> str:
        last = path.rstrip("/").rsplit("/", 1)[-1]
        trailing = (path.endswith("/") or last in (".", "..")) and path != "/"
        joined = posixpath.normpath(posixpath.join(self.workdir, path))
        return joined + "/" if trailing and joined != "/" else joined


def _check_from(cmd: _parser.Command, st: _State, base_image_arn: str, name: str) -> None:
    flags = _flags(cmd, {"platform"})
    platform = flags.get("platform")
    if platform and expand(platform, st.meta_args) not in ("linux/amd64", "linux/x86_64"):
        raise BuildFailure(f"{_where(cmd)}: only --platform=linux/amd64 is available")
    if not cmd.value:
        raise BuildFailure(f"line {cmd.start_line}: FROM needs an image name")
    image = expand(cmd.value[0], st.meta_args, escape=st.escape)
    rest = [v.lower() for v in cmd.value[1:]]
    if rest and not (len(rest) == 2 and rest[0] == "as"):
        raise BuildFailure(f"{_where(cmd)}: expected FROM <image> [AS <name>]")
    wanted = MANAGED_PREFIX + name
    if image not in (wanted, wanted + ":latest"):
        raise BuildFailure(
            f"the Dockerfile must build on the managed base image: write `FROM {wanted}` "
            f"(the image of baseImageArn {base_image_arn}); line {cmd.start_line} has "
            f"`FROM {image[:MAX_TEXT]}`"
        )


def _run(cmd: _parser.Command, st: _State) -> None:
    _flags(cmd, set())
    text = _display(cmd)
    if not cmd.value:
        raise BuildFailure(f"line {cmd.start_line}: RUN needs a command")
    if cmd.json:
        st.steps.append(RunStep(cmd.start_line, text, tuple(cmd.value), st.snapshot()))
        return
    command = cmd.value[0]
    script: InlineFile | None = None
    only = _HEREDOC_ONLY.match(command.strip())
    if len(cmd.heredocs) == 1 and only:
        body = cmd.heredocs[0].content
        if body.startswith("#!"):  # BuildKit runs such a heredoc as an executable file
            path = f"/tmp/.embervm-heredoc-{cmd.start_line}"
            script = InlineFile(path, body.encode(), 0o755)
            argv: tuple[str, ...] = (*st.shell, f"{path}; rc=$?; rm -f {path}; exit $rc")
        else:
            argv = (*st.shell, body)
    else:
        full = command
        for doc in cmd.heredocs:
            full += "\n" + doc.content + doc.name
        argv = (*st.shell, full)
    st.steps.append(RunStep(cmd.start_line, text, argv, st.snapshot(), script=script))


def _copy(cmd: _parser.Command, st: _State, *, is_add: bool, egress: bool) -> None:
    allowed = {"chown", "chmod", "link", "from"}
    flags = _flags(cmd, allowed)
    kind = "ADD" if is_add else "COPY"
    if "from" in flags:
        raise BuildFailure(
            f"{_where(cmd)}: {kind} --from needs a multi-stage build, which is not supported; "
            "build everything in the one stage"
        )
    values = list(cmd.value)
    if len(values) < 2:
        raise BuildFailure(f"{_where(cmd)}: {kind} needs at least one source and a destination")
    *raw_sources, raw_dest = values
    dest = st.resolve(st.x(raw_dest))
    docs = {d.name: d for d in cmd.heredocs}
    sources: list[str] = []
    inline: list[InlineFile] = []
    urls: list[str] = []
    for raw in raw_sources:
        heredoc = _HEREDOC_ONLY.match(raw) if not cmd.json else None
        if heredoc and heredoc.group(2) in docs:
            body = docs[heredoc.group(2)].content
            if not heredoc.group(1):
                body = expand_text(body, st.vars(), escape=st.escape)
            inline.append(InlineFile(heredoc.group(2), body.encode()))
            continue
        src = st.x(raw)
        if re.match(r"^[a-z][a-z0-9+.-]*://", src, re.IGNORECASE) or src.startswith("git@"):
            if not is_add:
                raise BuildFailure(f"{_where(cmd)}: COPY cannot fetch URLs; use ADD or RUN curl")
            if not src.lower().startswith(("https://", "http://")) or src.endswith(".git"):
                raise BuildFailure(f"{_where(cmd)}: ADD supports only http(s) file URLs")
            if not egress:
                raise BuildFailure(
                    f"{_where(cmd)}: ADD of a URL needs internet egress during the build; "
                    "give the image an egress network connector or put the file in the zip"
                )
            urls.append(src)
            continue
        sources.append(src)
    step = CopyStep(
        line=cmd.start_line,
        text=_display(cmd),
        sources=tuple(sources),
        inline=tuple(inline),
        urls=tuple(urls),
        dest=dest,
        state=st.snapshot(),
        chown=st.x(flags["chown"]) if flags.get("chown") else None,
        chmod=_chmod(cmd, flags.get("chmod")),
        kind=kind,
    )
    if step.source_count > 1 and not dest.endswith("/"):
        raise BuildFailure(
            f"{_where(cmd)}: with more than one source the destination must be a folder ending in /"
        )
    st.steps.append(step)


def _chmod(cmd: _parser.Command, raw: str | None) -> int | None:
    if not raw:
        return None
    if not re.fullmatch(r"[0-7]{3,4}", raw):
        raise BuildFailure(f"{_where(cmd)}: --chmod must be octal, e.g. --chmod=755")
    return int(raw, 8)


def _pairs(cmd: _parser.Command, st: _State) -> list[tuple[str, str]]:
    values = list(cmd.value)
    if not values or len(values) % 2:
        raise BuildFailure(f"{_where(cmd)}: expected {cmd.cmd.upper()} key=value ...")
    return [(st.x(values[i]), st.x(values[i + 1])) for i in range(0, len(values), 2)]


def _arg(cmd: _parser.Command, st: _State, *, before_from: bool) -> None:
    if not cmd.value:
        raise BuildFailure(f"line {cmd.start_line}: ARG needs a name")
    for item in cmd.value:
        name, has_default, default = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise BuildFailure(f"{_where(cmd)}: {name[:80]!r} is not a valid ARG name")
        if name in st.build_args:
            value: str | None = st.build_args[name]
        elif has_default:
            scope = st.meta_args if before_from else st.vars()
            value = expand(default, scope, escape=st.escape)
        else:
            value = st.meta_args.get(name) if not before_from else None
        target = st.meta_args if before_from else st.args
        if value is not None:
            st.define(target, name, value)


def _exec_form(cmd: _parser.Command, st: _State) -> tuple[tuple[str, ...], bool]:
    if cmd.json:
        return tuple(cmd.value), False
    if not cmd.value or not cmd.value[0].strip():
        raise BuildFailure(f"line {cmd.start_line}: {cmd.cmd.upper()} needs a command")
    return (*st.shell, cmd.value[0]), True


def _expose(cmd: _parser.Command, st: _State) -> None:
    for raw in cmd.value:
        for word in expand_fields(raw, st.vars(), escape=st.escape):
            port_text, _, proto = word.partition("/")
            if proto and proto.lower() not in ("tcp", "udp", "sctp"):
                raise BuildFailure(f"{_where(cmd)}: unknown protocol {proto[:20]!r}")
            first = port_text.split("-", 1)[0]
            if not first.isdigit() or not 1 <= int(first) <= 65535:
                raise BuildFailure(f"{_where(cmd)}: {word[:40]!r} is not a port")
            if proto.lower() in ("", "tcp") and int(first) not in st.ports:
                st.ports.append(int(first))


def _instruction(cmd: _parser.Command, st: _State, *, egress: bool) -> None:
    name = cmd.cmd.upper()
    if name == "RUN":
        _run(cmd, st)
    elif name in ("COPY", "ADD"):
        _copy(cmd, st, is_add=name == "ADD", egress=egress)
    elif name == "ENV":
        for key, value in _pairs(cmd, st):
            st.define(st.env, key, value)
    elif name == "ARG":
        _arg(cmd, st, before_from=False)
    elif name == "WORKDIR":
        if not cmd.value:
            raise BuildFailure(f"line {cmd.start_line}: WORKDIR needs a path")
        st.workdir = st.resolve(st.x(cmd.value[0])).rstrip("/") or "/"
        st.steps.append(WorkdirStep(cmd.start_line, _display(cmd), st.workdir, st.snapshot()))
    elif name == "USER":
        if not cmd.value:
            raise BuildFailure(f"line {cmd.start_line}: USER needs a user")
        st.user = st.x(cmd.value[0])
    elif name == "EXPOSE":
        _expose(cmd, st)
    elif name == "LABEL":
        for key, value in _pairs(cmd, st):
            st.define(st.labels, key, value)
    elif name == "CMD":
        st.cmd, _ = _exec_form(cmd, st)
    elif name == "ENTRYPOINT":
        st.entrypoint, st.entrypoint_shell = _exec_form(cmd, st)
    elif name == "SHELL":
        if not cmd.json or not cmd.value:
            raise BuildFailure(
                f'{_where(cmd)}: SHELL must be in JSON form, e.g. ["/bin/bash", "-c"]'
            )
        st.shell = tuple(cmd.value)
    elif name in _IGNORED:
        st.warnings.append(f"{name} at line {cmd.start_line} is ignored: {_IGNORED[name]}")
    else:
        raise BuildFailure(f"unknown instruction {name[:40]} at line {cmd.start_line}")


def parse_dockerfile(
    text: str,
    *,
    base_image_arn: str,
    egress: bool = False,
    build_args: Mapping[str, str] | None = None,
) -> BuildPlan:
    """Parse ``text`` into a plan, or raise BuildFailure saying what to change."""
    base = managed_image_name(base_image_arn)
    try:
        commands = _parser.parse_string(text)
    except (_parser.GoParseError, _parser.GoIOError) as exc:
        raise BuildFailure(f"the Dockerfile cannot be parsed: {exc}") from exc
    if len(commands) > MAX_INSTRUCTIONS:
        raise BuildFailure(f"the Dockerfile has more than {MAX_INSTRUCTIONS} instructions")
    st = _State(escape=_escape_token(text), build_args=dict(build_args or {}))
    from_line = 0
    for cmd in commands:
        name = cmd.cmd.upper()
        if name == "FROM":
            if from_line:
                raise BuildFailure(
                    f"multi-stage builds are not supported: second FROM at line "
                    f"{cmd.start_line} (the first is at line {from_line}); build in one stage "
                    f"FROM {MANAGED_PREFIX}{base}"
                )
            _check_from(cmd, st, base_image_arn, base)
            from_line = cmd.start_line
        elif not from_line:
            if name != "ARG":
                raise BuildFailure(
                    f"line {cmd.start_line}: the Dockerfile must start with "
                    f"`FROM {MANAGED_PREFIX}{base}` (only ARG may come before it)"
                )
            _arg(cmd, st, before_from=True)
        else:
            _instruction(cmd, st, egress=egress)
    if not from_line:
        raise BuildFailure(f"the Dockerfile has no FROM; write `FROM {MANAGED_PREFIX}{base}`")
    config = ImageConfig(
        env=tuple(st.env.items()),
        workdir=st.workdir,
        user=st.user,
        shell=st.shell,
        cmd=st.cmd,
        entrypoint=st.entrypoint,
        exposed_ports=tuple(st.ports),
        labels=tuple(st.labels.items()),
        entrypoint_shell_form=st.entrypoint_shell,
    )
    if not config.app_argv():
        raise BuildFailure(
            "the Dockerfile has no CMD or ENTRYPOINT: the image has nothing to start"
        )
    return BuildPlan(base, tuple(st.steps), config, tuple(st.warnings), from_line)
