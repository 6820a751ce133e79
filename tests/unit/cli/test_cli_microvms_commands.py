"""``embervm run|ls|get|suspend|resume|terminate|token|curl|logs``: the requests sent (checked
against the model by a botocore ``Stubber``), waiting for a state, tokens, the endpoint
request, and what is printed."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import typer
from botocore.stub import ANY, Stubber
from typer.testing import CliRunner

from embervm.cli import microvms
from embervm.cli._context import CliContext, CliError
from embervm.config import DataDir
from embervm.wire import AUTH_HEADER, PORT_HEADER

runner = CliRunner()
cli = typer.Typer()
microvms.register(cli)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
VM = "mvm-0123456789abcdef"
IMAGE_ARN = "arn:aws:lambda:us-east-1:000000000000:microvm-image:web"
ENDPOINT = f"https://{VM}.microvm.localhost:8443"
HTTP = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"
SHELL = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"
EGRESS = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"


def _vm(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "microvmId": VM,
        "state": state,
        "endpoint": ENDPOINT,
        "imageArn": IMAGE_ARN,
        "imageVersion": "1",
        "maximumDurationInSeconds": 3600,
        "startedAt": T0,
        **extra,
    }


def _token(stub: Stubber, value: str = "tok-1", **expected: Any) -> None:
    stub.add_response(
        "create_microvm_auth_token",
        {"authToken": {AUTH_HEADER: value}},
        {"microvmIdentifier": VM, "expirationInMinutes": 60, "allowedPorts": [{"allPorts": {}}]}
        | expected,
    )


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(microvms.time, "sleep", slept.append)
    return slept


# -- run -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_sleep")
def test_run_sends_the_default_request_waits_and_issues_a_token(stub: Stubber) -> None:
    stub.add_response(
        "run_microvm",
        _vm("PENDING"),
        {
            "imageIdentifier": "web",
            "ingressNetworkConnectors": [HTTP],
            "egressNetworkConnectors": [EGRESS],
        },
    )
    stub.add_response("get_microvm", _vm("PENDING"), {"microvmIdentifier": VM})
    stub.add_response("get_microvm", _vm("RUNNING"), {"microvmIdentifier": VM})
    _token(stub)
    result = runner.invoke(cli, ["run", "web", "-o", "json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["microvmId"], answer["state"], answer["token"]) == (VM, "RUNNING", "tok-1")


def test_run_options_shape_the_request(stub: Stubber) -> None:
    stub.add_response(
        "run_microvm",
        _vm("PENDING"),
        {
            "imageIdentifier": "web",
            "imageVersion": "3",
            "ingressNetworkConnectors": [HTTP, SHELL],
            "egressNetworkConnectors": [],
            "idlePolicy": {
                "maxIdleDurationSeconds": 120,
                "suspendedDurationSeconds": 600,
                "autoResumeEnabled": True,
            },
            "maximumDurationInSeconds": 900,
            "runHookPayload": '{"user": 1}',
        },
    )
    _token(stub)
    result = runner.invoke(
        cli,
        [
            "run",
            "web",
            "--version",
            "3",
            "--shell",
            "--no-egress",
            "--idle-seconds",
            "120",
            "--suspended-seconds",
            "600",
            "--max-duration",
            "900",
            "--payload",
            '{"user": 1}',
            "--no-wait",
        ],
    )
    assert result.exit_code == 0, result.output


def test_run_prints_a_ready_to_paste_curl_line(stub: Stubber, ctx: CliContext) -> None:
    stub.add_response("run_microvm", _vm("PENDING"))
    stub.add_response("get_microvm", _vm("RUNNING"), {"microvmIdentifier": VM})
    _token(stub, "tok-2")
    result = runner.invoke(cli, ["run", "web"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{VM} RUNNING in ")
    assert lines[1:4] == [
        f"endpoint: {ENDPOINT}",
        "token:    tok-2",
        f"try:      embervm curl {VM} /",
    ]
    host = f"{VM}.microvm.localhost"
    assert lines[4] == (
        f"     or:  curl --cacert {DataDir(ctx.data_dir).ca_file} --resolve {host}:8443:127.0.0.1"
        f' -H "{AUTH_HEADER}: tok-2" {ENDPOINT}/'
    )


@pytest.mark.usefixtures("no_sleep")
def test_a_vm_that_ends_while_starting_is_exit_1_with_its_reason(stub: Stubber) -> None:
    stub.add_response("run_microvm", _vm("PENDING"))
    stub.add_response("get_microvm", _vm("TERMINATED", stateReason="the run hook failed"))
    result = runner.invoke(cli, ["run", "web"])
    assert result.exit_code == 1
    assert result.stderr == f"error: {VM} failed to start: the run hook failed\n"


def test_run_memory_other_than_the_images_is_refused_before_running(stub: Stubber) -> None:
    stub.add_response(
        "get_microvm_image",
        {"imageArn": IMAGE_ARN, "name": "web", "state": "CREATED", "createdAt": T0}
        | {"latestActiveImageVersion": "2"},
        {"imageIdentifier": "web"},
    )
    stub.add_response(
        "get_microvm_image_version",
        {
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
            "buildRoleArn": "arn:aws:iam::000000000000:role/b",
            "codeArtifact": {"uri": "file:///x.zip"},
            "imageArn": IMAGE_ARN,
            "imageVersion": "2",
            "state": "CREATED",
            "status": "ACTIVE",
            "createdAt": T0,
        },
        {"imageIdentifier": "web", "imageVersion": "2"},
    )
    result = runner.invoke(cli, ["run", "web", "--memory", "2048"])  # built with the default
    assert result.exit_code == 6
    assert "web version 2 is built for 1024 MiB" in result.stderr
    assert "--memory 2048" in result.stderr


def test_run_memory_of_an_image_without_an_active_version_is_left_to_the_server(
    stub: Stubber,
) -> None:
    summary = {"imageArn": IMAGE_ARN, "name": "web", "state": "CREATING", "createdAt": T0}
    stub.add_response("get_microvm_image", summary, {"imageIdentifier": "web"})
    stub.add_client_error("run_microvm", "ConflictException", "web has no active version")
    result = runner.invoke(cli, ["run", "web", "--memory", "512"])
    assert result.exit_code == 5
    assert result.stderr == "error: ConflictException: web has no active version\n"


# -- waiting ---------------------------------------------------------------------------------


def test_waiting_backs_off_to_one_second(stub: Stubber, no_sleep: list[float]) -> None:
    for _ in range(8):
        stub.add_response("get_microvm", _vm("PENDING"), {"microvmIdentifier": VM})
    stub.add_response("get_microvm", _vm("RUNNING"), {"microvmIdentifier": VM})
    assert microvms.wait_for_state(VM, {"RUNNING"}, timeout=300)["state"] == "RUNNING"
    assert no_sleep == pytest.approx([0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.0, 1.0])


def test_waiting_stops_at_terminated_whatever_was_wanted(stub: Stubber) -> None:
    stub.add_response("get_microvm", _vm("TERMINATED"), {"microvmIdentifier": VM})
    assert microvms.wait_for_state(VM, {"SUSPENDED"}, timeout=300)["state"] == "TERMINATED"


@pytest.mark.usefixtures("no_sleep")
def test_waiting_past_the_deadline_names_the_state(stub: Stubber) -> None:
    stub.add_response("get_microvm", _vm("SUSPENDING"), {"microvmIdentifier": VM})
    with pytest.raises(CliError, match=f"{VM} is still SUSPENDING after"):
        microvms.wait_for_state(VM, {"SUSPENDED"}, timeout=-1)


# -- transitions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "call", "final"),
    [
        ("suspend", "suspend_microvm", "SUSPENDED"),
        ("resume", "resume_microvm", "RUNNING"),
        ("terminate", "terminate_microvm", "TERMINATED"),
    ],
)
@pytest.mark.usefixtures("no_sleep")
def test_a_transition_waits_for_its_state(
    stub: Stubber, command: str, call: str, final: str
) -> None:
    stub.add_response(call, {}, {"microvmIdentifier": VM})
    stub.add_response("get_microvm", _vm(final), {"microvmIdentifier": VM})
    result = runner.invoke(cli, [command, VM])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{VM} {final} in ")


@pytest.mark.parametrize(
    ("command", "call", "now"),
    [
        ("suspend", "suspend_microvm", "SUSPENDING"),
        ("resume", "resume_microvm", "PENDING"),
        ("terminate", "terminate_microvm", "TERMINATING"),
    ],
)
@pytest.mark.parametrize("output", ["text", "json"])
def test_a_transition_without_waiting_says_the_state_it_left_the_vm_in(
    stub: Stubber, command: str, call: str, now: str, output: str
) -> None:
    # The model's answers to Suspend/Resume/TerminateMicrovm are empty: no state in them.
    stub.add_response(call, {}, {"microvmIdentifier": VM})
    stub.add_response("get_microvm", _vm(now), {"microvmIdentifier": VM})
    result = runner.invoke(cli, [command, VM, "--no-wait", "-o", output])
    assert result.exit_code == 0, result.output
    if output == "json":
        answer = json.loads(result.stdout)
        assert (answer["microvmId"], answer["state"]) == (VM, now)
    else:
        assert result.stdout.startswith(f"{VM} {now} in ")


# -- tokens ----------------------------------------------------------------------------------


def test_a_token_for_one_port_or_for_the_shell(stub: Stubber) -> None:
    stub.add_response(
        "create_microvm_auth_token",
        {"authToken": {AUTH_HEADER: "port-token"}},
        {"microvmIdentifier": VM, "expirationInMinutes": 5, "allowedPorts": [{"port": 9000}]},
    )
    stub.add_response(
        "create_microvm_shell_auth_token",
        {"authToken": {"X-other-name": "shell-token"}},  # any part if the name differs
        {"microvmIdentifier": VM, "expirationInMinutes": 10},
    )
    assert microvms.issue_token(VM, minutes=5, port=9000, for_shell=False) == "port-token"
    assert microvms.issue_token(VM, minutes=10, port=None, for_shell=True) == "shell-token"


def test_token_prints_the_bare_token_or_json(stub: Stubber) -> None:
    _token(stub, "abc", expirationInMinutes=15)
    _token(stub, "def")
    assert runner.invoke(cli, ["token", VM, "--minutes", "15"]).stdout == "abc\n"
    assert json.loads(runner.invoke(cli, ["token", VM, "-o", "json"]).stdout) == {
        AUTH_HEADER: "def"
    }


@pytest.mark.usefixtures("stub")
@pytest.mark.parametrize("minutes", ["0", "61"])
def test_token_lifetimes_outside_one_to_sixty_minutes_are_usage_errors(minutes: str) -> None:
    result = runner.invoke(cli, ["token", VM, "--minutes", minutes])
    assert result.exit_code == 2
    assert "--minutes" in result.stderr


# -- ls, get ---------------------------------------------------------------------------------


def _summary(vm_id: str, state: str) -> dict[str, Any]:
    return {
        "microvmId": vm_id,
        "state": state,
        "imageArn": IMAGE_ARN,
        "imageVersion": "1",
        "startedAt": T0,
    }


@pytest.mark.parametrize("everything", [False, True])
def test_ls_leaves_terminated_vms_out_unless_asked(stub: Stubber, everything: bool) -> None:
    items = [_summary("mvm-a", "RUNNING"), _summary("mvm-b", "TERMINATED")]
    stub.add_response("list_microvms", {"items": items}, {})
    result = runner.invoke(cli, ["ls", "-o", "json", *(["--all"] if everything else [])])
    ids = [vm["microvmId"] for vm in json.loads(result.stdout)]
    assert ids == (["mvm-a", "mvm-b"] if everything else ["mvm-a"])


def test_ls_shows_the_image_by_name(stub: Stubber) -> None:
    stub.add_response("list_microvms", {"items": [_summary("mvm-a", "RUNNING")]}, {})
    rows = [line.split() for line in runner.invoke(cli, ["ls"]).stdout.splitlines()]
    assert rows[0] == ["ID", "STATE", "IMAGE", "VERSION", "STARTED"]
    assert rows[1][:4] == ["mvm-a", "RUNNING", "web", "1"]


def test_get_describes_the_vm_in_a_fixed_order(stub: Stubber) -> None:
    stub.add_response("get_microvm", _vm("RUNNING", imageVersion="7", kmsKeyIdentifier="k"))
    lines = runner.invoke(cli, ["get", VM]).stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "microvmId",
        "state",
        "endpoint",
        "imageArn",
        "imageVersion",
        "startedAt",
        "maximumDurationInSeconds",
    ]
    assert "imageVersion: 7" in lines


# -- curl ------------------------------------------------------------------------------------


@pytest.fixture
def endpoint(stub: Stubber, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[httpx.Request]]:
    """The endpoint proxy answered by a MockTransport; yields the requests it saw."""
    seen: list[httpx.Request] = []
    real = httpx.Client

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/missing":
            return httpx.Response(404, text="no such page")
        return httpx.Response(200, headers={"x-app": "a\x1b[2Jb"}, text="hello")

    def client(**kwargs: Any) -> httpx.Client:
        kwargs.pop("verify")
        kwargs.pop("http2")
        return real(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(httpx, "Client", client)
    monkeypatch.setattr(ssl, "create_default_context", lambda **_kw: None)
    stub.add_response("get_microvm", _vm("RUNNING"), {"microvmIdentifier": VM})
    return seen


def test_curl_connects_to_loopback_with_the_endpoints_host_and_a_fresh_token(
    stub: Stubber, endpoint: list[httpx.Request]
) -> None:
    _token(stub, "fresh", expirationInMinutes=5, allowedPorts=[{"port": 9000}])
    result = runner.invoke(
        cli,
        [
            "curl",
            VM,
            "api/x",
            "-X",
            "POST",
            "-d",
            "body",
            "--port",
            "9000",
            "-H",
            "X-One: 1",
            "-H",
            "X-Two:two:parts",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello\n"
    (request,) = endpoint
    assert str(request.url) == "https://127.0.0.1:8443/api/x"
    assert request.method == "POST"
    assert request.content == b"body"
    assert request.headers["host"] == f"{VM}.microvm.localhost:8443"
    assert request.headers[AUTH_HEADER] == "fresh"
    assert request.headers[PORT_HEADER] == "9000"
    assert (request.headers["x-one"], request.headers["x-two"]) == ("1", "two:parts")
    assert request.extensions["sni_hostname"] == f"{VM}.microvm.localhost"


def test_curl_include_shows_the_head_printable_and_an_error_status_is_exit_1(
    stub: Stubber, endpoint: list[httpx.Request]
) -> None:
    _token(stub, expirationInMinutes=5)
    result = runner.invoke(cli, ["curl", VM, "/missing", "-i"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "HTTP/1.1 404"
    assert lines[-1] == "no such page"


def test_curl_headers_from_the_app_are_printed_without_controls(
    stub: Stubber, endpoint: list[httpx.Request]
) -> None:
    _token(stub, expirationInMinutes=5)
    result = runner.invoke(cli, ["curl", VM, "-i"])
    assert "x-app: a?[2Jb" in result.stdout.splitlines()
    assert "\x1b" not in result.stdout


def test_a_header_without_a_colon_is_a_usage_error(
    stub: Stubber, endpoint: list[httpx.Request]
) -> None:
    _token(stub, expirationInMinutes=5)
    result = runner.invoke(cli, ["curl", VM, "-H", "no colon"])
    assert result.exit_code == 2
    assert result.stderr == "error: bad header 'no colon': expected 'Name: value'\n"
    assert endpoint == []


# -- logs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["text", "json"])
def test_logs_lines_for_people_or_scripts(
    ctx: CliContext, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    asked: list[tuple[str, bool]] = []

    def stream(_ctx: CliContext, path: str, *, follow: bool) -> Iterator[str]:
        asked.append((path, follow))
        yield "plain"
        yield "bell\x07 [red]x[/red]"

    monkeypatch.setattr(microvms, "stream_lines", stream)
    result = runner.invoke(cli, ["logs", VM, "-f", "-o", output])
    assert result.exit_code == 0, result.output
    assert asked == [(f"/embervm/v1/microvms/{VM}/logs", True)]
    if output == "json":
        assert [json.loads(line) for line in result.stdout.splitlines()] == [
            {"microvmId": VM, "line": "plain"},
            {"microvmId": VM, "line": "bell\x07 [red]x[/red]"},
        ]
    else:
        assert result.stdout == "plain\nbell? [red]x[/red]\n"


def test_the_logs_path_quotes_the_id(ctx: CliContext, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(
        microvms, "stream_lines", lambda _c, path, *, follow: asked.append(path) or iter(())
    )
    runner.invoke(cli, ["logs", "../images/x?y"])
    assert asked == ["/embervm/v1/microvms/..%2Fimages%2Fx%3Fy/logs"]


def test_stubbed_requests_are_checked_against_the_model(stub: Stubber) -> None:
    # The fixture's Stubber refuses what the model refuses: these tests can catch a bad request.
    stub.add_response("get_microvm", _vm("RUNNING"), {"microvmIdentifier": ANY})
    with pytest.raises(Exception, match="Parameter validation failed"):
        microvms.current().client().get_microvm(microvmIdentifier=7)
    microvms.current().client().get_microvm(microvmIdentifier=VM)
