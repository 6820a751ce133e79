"""Dockerfile → plan: supported instructions, Docker's substitution rules, clear refusals."""

from __future__ import annotations

import pytest

from embervm.errors import BuildFailure
from embervm.imagebuild.dockerfile import DEFAULT_PATH, managed_image_name, parse_dockerfile
from embervm.imagebuild.plan import CopyStep, RunStep, WorkdirStep

ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"


def plan(text: str, **kw: object):  # type: ignore[no-untyped-def]
    return parse_dockerfile(text, base_image_arn=ARN, **kw)  # type: ignore[arg-type]


def test_managed_image_name_from_arn() -> None:
    assert managed_image_name("arn:aws:lambda:eu-west-1:aws:microvm-image:debian12") == "debian12"
    with pytest.raises(BuildFailure, match="not a managed base image"):
        managed_image_name("arn:aws:lambda:us-east-1:123456789012:microvm-image:mine")


def test_wrong_from_says_exactly_what_to_write() -> None:
    with pytest.raises(BuildFailure) as err:
        plan('FROM python:3.12\nCMD ["python3"]\n')
    assert "write `FROM embervm/debian12`" in err.value.reason
    assert ARN in err.value.reason
    assert "line 1 has `FROM python:3.12`" in err.value.reason


def test_from_may_use_meta_args_and_a_stage_name() -> None:
    p = plan("ARG B=embervm/debian12\nFROM ${B} AS app\nCMD x\n")
    assert p.base_image == "debian12"
    assert p.from_line == 2


def test_multi_stage_is_refused_with_both_lines() -> None:
    text = "FROM embervm/debian12 AS a\nRUN x\nFROM embervm/debian12\nCMD y\n"
    with pytest.raises(BuildFailure, match=r"multi-stage.*line 3.*line 1"):
        plan(text)


def test_copy_from_is_refused() -> None:
    with pytest.raises(BuildFailure, match="COPY --from needs a multi-stage build"):
        plan("FROM embervm/debian12\nCOPY --from=a /x /y\nCMD y\n")


def test_instruction_before_from_is_refused() -> None:
    with pytest.raises(BuildFailure, match="must start with `FROM embervm/debian12`"):
        plan("RUN x\nFROM embervm/debian12\n")


def test_unknown_instruction_is_refused_and_known_unsupported_ones_warn() -> None:
    with pytest.raises(BuildFailure, match="unknown instruction FOO at line 2"):
        plan("FROM embervm/debian12\nFOO bar\nCMD x\n")
    p = plan("FROM embervm/debian12\nHEALTHCHECK CMD curl x\nVOLUME /d\nSTOPSIGNAL 9\nCMD x\n")
    assert [w.split(" ")[0] for w in p.warnings] == ["HEALTHCHECK", "VOLUME", "STOPSIGNAL"]
    assert p.steps == ()


def test_run_shell_and_exec_forms_with_shell_instruction() -> None:
    p = plan(
        'FROM embervm/debian12\nRUN echo a && \\\n  echo b\nRUN ["python3", "-V"]\n'
        'SHELL ["/bin/bash", "-eu", "-c"]\nRUN echo c\nCMD x\n'
    )
    a, b, c = p.steps
    assert isinstance(a, RunStep)
    assert a.argv == ("/bin/sh", "-c", "echo a &&   echo b")
    assert isinstance(b, RunStep)
    assert b.argv == ("python3", "-V")
    assert isinstance(c, RunStep)
    assert c.argv == ("/bin/bash", "-eu", "-c", "echo c")
    assert a.line == 2
    assert c.line == 6


def test_run_heredoc_becomes_the_script() -> None:
    p = plan("FROM embervm/debian12\nRUN <<EOF\nset -e\necho $HOME\nEOF\nCMD x\n")
    (step,) = p.steps
    assert isinstance(step, RunStep)
    assert step.argv == ("/bin/sh", "-c", "set -e\necho $HOME\n")


def test_run_heredoc_with_shebang_is_run_as_a_file() -> None:
    p = plan("FROM embervm/debian12\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\nCMD x\n")
    (step,) = p.steps
    assert isinstance(step, RunStep)
    assert step.script is not None
    assert step.script.content == b"#!/usr/bin/env python3\nprint(1)\n"
    assert step.script.mode == 0o755
    assert step.script.name in step.argv[-1]


def test_run_with_several_heredocs_passes_them_to_the_shell() -> None:
    p = plan("FROM embervm/debian12\nRUN <<A cat > /a && <<B cat > /b\n1\nA\n2\nB\nCMD x\n")
    (step,) = p.steps
    assert isinstance(step, RunStep)
    assert step.argv[-1] == "<<A cat > /a && <<B cat > /b\n1\nA\n2\nB"


def test_env_quotes_and_substitution_follow_docker() -> None:
    p = plan(
        'FROM embervm/debian12\nENV A=1 B="two words" C=$A\nENV D=${A}x E=${NOPE:-dflt} '
        "F='$A'\nENV OLD legacy form value\nENV PATH=/app/venv/bin:$PATH\nCMD x\n"
    )
    env = dict(p.config.env)
    assert env["B"] == "two words"
    assert env["C"] == ""  # same-instruction references see the value from before it
    assert env["D"] == "1x"
    assert env["E"] == "dflt"
    assert env["F"] == "$A"
    assert env["OLD"] == "legacy form value"
    assert env["PATH"] == "/app/venv/bin:" + DEFAULT_PATH


def test_arg_defaults_build_args_and_scope() -> None:
    text = (
        "ARG VERSION=1\nFROM embervm/debian12\nARG VERSION\nARG NAME=app-$VERSION\n"
        "ENV N=$NAME\nRUN echo $NAME\nCMD x\n"
    )
    p = plan(text)
    assert dict(p.config.env)["N"] == "app-1"
    run = p.steps[0]
    assert isinstance(run, RunStep)
    assert run.state.run_env()["NAME"] == "app-1"
    assert "NAME" not in dict(p.config.env)  # ARG does not persist into the image
    assert dict(plan(text, build_args={"VERSION": "7"}).config.env)["N"] == "app-7"


def test_arg_before_from_is_not_visible_after_without_redeclaring() -> None:
    p = plan("ARG V=1\nFROM embervm/debian12\nENV X=${V:-unset}\nCMD x\n")
    assert dict(p.config.env)["X"] == "unset"


def test_copy_flags_globs_dest_and_heredoc() -> None:
    p = plan(
        "FROM embervm/debian12\nWORKDIR /app\nENV D=conf\n"
        "COPY --chown=app:app --chmod=640 *.py requirements.txt ./\n"
        "COPY $D/ /etc/$D/\nCOPY <<EOT greeting.txt\nhello $D\nEOT\nCMD x\n"
    )
    workdir, copy1, copy2, copy3 = p.steps
    assert isinstance(workdir, WorkdirStep)
    assert workdir.path == "/app"
    assert isinstance(copy1, CopyStep)
    assert copy1.sources == ("*.py", "requirements.txt")
    assert copy1.dest == "/app/"
    assert copy1.chown == "app:app"
    assert copy1.chmod == 0o640
    assert isinstance(copy2, CopyStep)
    assert copy2.sources == ("conf/",)
    assert copy2.dest == "/etc/conf/"
    assert isinstance(copy3, CopyStep)
    assert copy3.dest == "/app/greeting.txt"
    assert copy3.inline[0].content == b"hello conf\n"


def test_copy_many_sources_needs_folder_destination() -> None:
    with pytest.raises(BuildFailure, match="destination must be a folder"):
        plan("FROM embervm/debian12\nCOPY a b /dest\nCMD x\n")


def test_add_url_needs_egress() -> None:
    text = "FROM embervm/debian12\nADD https://example.com/f.txt /f.txt\nCMD x\n"
    with pytest.raises(BuildFailure, match="needs internet egress"):
        plan(text)
    (step,) = plan(text, egress=True).steps
    assert isinstance(step, CopyStep)
    assert step.urls == ("https://example.com/f.txt",)


def test_run_mount_flag_is_refused() -> None:
    with pytest.raises(BuildFailure, match="--mount is not supported"):
        plan("FROM embervm/debian12\nRUN --mount=type=cache,target=/x echo\nCMD x\n")


def test_cmd_entrypoint_expose_label_user_workdir_config() -> None:
    p = plan(
        "FROM embervm/debian12\nWORKDIR /srv\nWORKDIR app\nUSER nobody\n"
        "EXPOSE 9000/tcp 53/udp 8080\n"
        'LABEL a=b "c d"=e\nENTRYPOINT ["python3", "-m", "app"]\nCMD ["--port", "9000"]\n'
    )
    c = p.config
    assert c.workdir == "/srv/app"
    assert c.user == "nobody"
    assert c.exposed_ports == (9000, 8080)
    assert dict(c.labels) == {"a": "b", "c d": "e"}
    assert c.app_argv() == ["python3", "-m", "app", "--port", "9000"]


def test_shell_form_entrypoint_ignores_cmd_and_shell_cmd_uses_shell() -> None:
    p = plan("FROM embervm/debian12\nENTRYPOINT exec python3 app.py\nCMD ignored\n")
    assert p.config.app_argv() == ["/bin/sh", "-c", "exec python3 app.py"]
    p = plan("FROM embervm/debian12\nCMD gunicorn app:app\n")
    assert p.config.app_argv() == ["/bin/sh", "-c", "gunicorn app:app"]


def test_no_cmd_is_refused() -> None:
    with pytest.raises(BuildFailure, match="no CMD or ENTRYPOINT"):
        plan("FROM embervm/debian12\nRUN true\n")


def test_unparseable_dockerfile_is_a_build_failure() -> None:
    with pytest.raises(BuildFailure, match="cannot be parsed"):
        plan("FROM embervm/debian12\nRUN <<EOF\nnever ends\n")


def test_escape_directive_changes_the_escape_character() -> None:
    p = plan("# escape=`\nFROM embervm/debian12\nENV A=x`$y\nCMD x\n")
    assert dict(p.config.env)["A"] == "x$y"


def test_exponential_env_expansion_is_refused() -> None:
    # A4: each line multiplies the value by 8; eleven lines asked for 16 GiB.
    text = "FROM embervm/debian12\nENV A=xx\n" + "ENV A=$A$A$A$A$A$A$A$A\n" * 11 + "CMD x\n"
    with pytest.raises(BuildFailure, match="too long"):
        parse_dockerfile(text, base_image_arn=ARN)


def test_one_line_cannot_substitute_without_bound() -> None:
    big = "x" * 60_000
    text = f"FROM embervm/debian12\nENV A={big}\nRUN echo {'$A' * 40}\nWORKDIR /{'$A' * 40}\n"
    with pytest.raises(BuildFailure, match="expansion too long"):
        parse_dockerfile(text + "CMD x\n", base_image_arn=ARN)


def test_variable_count_and_instruction_count_are_bounded() -> None:
    many_env = "ENV " + " ".join(f"V{i}=1" for i in range(1100)) + "\n"
    with pytest.raises(BuildFailure, match="more than 1024"):
        parse_dockerfile(f"FROM embervm/debian12\n{many_env}CMD x\n", base_image_arn=ARN)
    many_runs = "RUN true\n" * 1001
    with pytest.raises(BuildFailure, match="more than 1000 instructions"):
        parse_dockerfile(f"FROM embervm/debian12\n{many_runs}CMD x\n", base_image_arn=ARN)
