"""embervm.model: the model as loaded, its shape rules and messages, examples, generated files."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from embervm import model
from embervm.model import (
    OPERATION_NAMES,
    example_input,
    example_output,
    validate_input,
    validate_output,
    validation_message,
)

ROOT = Path(__file__).resolve().parents[3]


def test_model_is_lambda_microvms_2025_09_09_with_24_operations() -> None:
    service = model.service_model()
    assert service.metadata["apiVersion"] == "2025-09-09"
    assert service.metadata["protocol"] == "rest-json"
    assert service.signing_name == "lambda"
    assert len(model.operation_names()) == 24


def test_generated_operation_names_match_the_model() -> None:
    assert tuple(OPERATION_NAMES) == model.operation_names()


def test_generated_files_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_model.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_namespace_exports_exactly_its_public_names() -> None:
    import types

    public = {
        name
        for name, value in vars(model).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(model.__all__)


@pytest.mark.parametrize("operation", OPERATION_NAMES)
@pytest.mark.parametrize("full", [False, True])
def test_examples_satisfy_their_shapes(operation: str, full: bool) -> None:
    assert validate_input(operation, example_input(operation, full=full)) == []
    assert validate_output(operation, example_output(operation, full=full)) == []


def _message(operation: str, params: dict[str, object]) -> str:
    violations = validate_input(operation, params)
    assert violations, "expected a violation"
    return validation_message(violations)


def _image(**overrides: object) -> dict[str, object]:
    return {**example_input("CreateMicrovmImage"), **overrides}


def test_too_long_string_is_reported_with_the_maximum() -> None:
    assert _message("CreateMicrovmImage", _image(name="a" * 65)) == (
        f"1 validation error detected: Value '{'a' * 65}' at 'name' failed to satisfy "
        "constraint: Member must have length less than or equal to 64"
    )


def test_pattern_violation_names_the_pattern() -> None:
    assert _message("CreateMicrovmImage", _image(name="a b")) == (
        "1 validation error detected: Value 'a b' at 'name' failed to satisfy constraint: "
        "Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+"
    )


def test_unicode_letters_satisfy_the_tag_pattern_with_p_l() -> None:
    assert (
        validate_input("TagResource", {**example_input("TagResource"), "Tags": {"clé": "wört 1"}})
        == []
    )


def test_characters_outside_p_l_p_z_p_n_break_the_tag_pattern() -> None:
    message = _message(
        "TagResource", {**example_input("TagResource"), "Tags": {"ok": "semi;colon"}}
    )
    assert "at 'Tags.ok'" in message
    assert "regular expression pattern: ([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)" in message


def test_enum_violation_lists_the_allowed_values() -> None:
    params = {**example_input("UpdateMicrovmImageVersion"), "status": "ON"}
    assert _message("UpdateMicrovmImageVersion", params).endswith(
        "Value 'ON' at 'status' failed to satisfy constraint: "
        "Member must satisfy enum value set: [ACTIVE, INACTIVE]"
    )


def test_missing_required_member_is_value_null() -> None:
    assert _message("RunMicrovm", {}) == (
        "1 validation error detected: Value null at 'imageIdentifier' failed to satisfy "
        "constraint: Member must not be null"
    )


def test_nested_paths_follow_aws_naming() -> None:
    params = {
        "imageIdentifier": "img",
        "idlePolicy": {
            "maxIdleDurationSeconds": 59,
            "suspendedDurationSeconds": 0,
            "autoResumeEnabled": True,
        },
    }
    assert "at 'idlePolicy.maxIdleDurationSeconds'" in _message("RunMicrovm", params)
    assert "greater than or equal to 60" in _message("RunMicrovm", params)
    ports = {"microvmIdentifier": "vm", "expirationInMinutes": 5, "allowedPorts": [{"port": 0}]}
    assert "at 'allowedPorts.1.member.port'" in _message("CreateMicrovmAuthToken", ports)


def test_value_above_maximum_is_reported() -> None:
    message = _message("RunMicrovm", {"imageIdentifier": "i", "maximumDurationInSeconds": 28801})
    assert "Member must have value less than or equal to 28800" in message


def test_integers_outside_32_bits_are_rejected() -> None:
    params = {
        "microvmIdentifier": "vm",
        "expirationInMinutes": 2**40,
        "allowedPorts": [{"port": 1}],
    }
    assert "less than or equal to 2147483647" in _message("CreateMicrovmAuthToken", params)


def test_union_needs_exactly_one_member() -> None:
    ports = {
        "microvmIdentifier": "vm",
        "expirationInMinutes": 5,
        "allowedPorts": [{"port": 1, "allPorts": {}}],
    }
    assert "exactly one of [port, range, allPorts]" in _message("CreateMicrovmAuthToken", ports)


def test_sensitive_values_are_not_echoed() -> None:
    params = {"imageIdentifier": "i", "runHookPayload": "s3cr3t" * 1000}
    message = _message("RunMicrovm", params)
    assert "s3cr3t" not in message
    assert "Value at 'runHookPayload'" in message


def test_several_violations_are_counted() -> None:
    assert _message("CreateMicrovmImage", {"name": "a b"}).startswith(
        "4 validation errors detected:"
    )


def test_wrong_python_type_is_a_violation() -> None:
    assert "Member must be of type integer" in _message(
        "RunMicrovm", {"imageIdentifier": "i", "maximumDurationInSeconds": "10"}
    )
    assert "Member must be of type integer" in _message(
        "RunMicrovm", {"imageIdentifier": "i", "maximumDurationInSeconds": True}
    )


def test_output_check_flags_missing_and_unknown_members() -> None:
    output = example_output("GetMicrovm")
    del output["state"]
    output["secretInternal"] = 1
    constraints = {(v.path, v.constraint) for v in validate_output("GetMicrovm", output)}
    assert ("state", "Member must not be null") in constraints
    assert ("secretInternal", "Member is not part of the model") in constraints


def test_output_check_accepts_datetimes_and_epoch_numbers_but_not_naive_times() -> None:
    output = example_output("GetMicrovm")
    assert validate_output("GetMicrovm", {**output, "startedAt": 1700000000}) == []
    naive = {**output, "startedAt": dt.datetime(2025, 1, 1)}
    assert validate_output("GetMicrovm", naive)


def test_output_check_ignores_boto3_response_metadata() -> None:
    output = {**example_output("ListMicrovms"), "ResponseMetadata": {"HTTPStatusCode": 200}}
    assert validate_output("ListMicrovms", output) == []
