"""What every command needs: where the data dir and the API are, and a signed boto3 client."""

from __future__ import annotations

import configparser
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embervm.config import DEFAULT_API_PORT, DEFAULT_REGION, DataDir, default_data_dir

CLIENT_PROFILE = "embervm"


class CliError(Exception):
    """One readable line for the user, and the exit code it stands for."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# Exit codes that mean something (documented in the README).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_INVALID = 6
EXIT_BUILD_FAILED = 7


@dataclass
class CliContext:
    data_dir: Path = field(default_factory=default_data_dir)
    endpoint_url: str = f"http://127.0.0.1:{DEFAULT_API_PORT}"
    region: str = DEFAULT_REGION
    _client: Any = None

    def credentials(self) -> tuple[str, str]:
        """The key pair the server wrote to ``DATA_DIR/credentials`` on its first start."""
        env_key = os.environ.get("EMBERVM_ACCESS_KEY_ID")
        env_secret = os.environ.get("EMBERVM_SECRET_ACCESS_KEY")
        if env_key and env_secret:
            return env_key, env_secret
        path = DataDir(self.data_dir).credentials
        parser = configparser.ConfigParser()
        try:
            parser.read_string(path.read_text())
        except FileNotFoundError as exc:
            raise CliError(
                f"no credentials in {path}: start the server once (`embervm server`) "
                "or pass --data-dir",
                EXIT_UNREACHABLE,
            ) from exc
        for profile in (CLIENT_PROFILE, "default"):
            if parser.has_section(profile):
                section = parser[profile]
                key = section.get("aws_access_key_id")
                secret = section.get("aws_secret_access_key")
                if key and secret:
                    return key, secret
        raise CliError(f"{path} has no usable profile '{CLIENT_PROFILE}' or 'default'")

    def api_ca_bundle(self) -> str | None:
        """The CA bundle that verifies an ``https://`` control API: ``EMBERVM_CA_BUNDLE`` if
        set (a certificate of the operator's), else the server's local CA
        (``DATA_DIR/tls/ca.pem``, which issues the API's certificate off loopback), else None
        (boto3's usual: ``AWS_CA_BUNDLE`` or the system's)."""
        bundle = os.environ.get("EMBERVM_CA_BUNDLE")
        if bundle:
            return bundle
        local = DataDir(self.data_dir).ca_file
        return str(local) if local.exists() else None

    def api_tls(self) -> ssl.SSLContext:
        """What httpx verifies the control API with (see ``api_ca_bundle``)."""
        return ssl.create_default_context(cafile=self.api_ca_bundle())

    def endpoint_tls(self) -> ssl.SSLContext:
        """What the endpoint proxy's certificate is verified with: the server's local CA
        (``DATA_DIR/tls/ca.pem``), which must be here (the CLI runs with the server's data dir)."""
        ca = DataDir(self.data_dir).ca_file
        try:
            return ssl.create_default_context(cafile=str(ca))
        except FileNotFoundError:
            raise CliError(
                f"{ca} is missing: the endpoint proxy's certificate is checked with the "
                "server's local CA; run this on the server's machine with its --data-dir"
            ) from None

    def client(self) -> Any:
        """A boto3 ``lambda-microvms`` client pointed at this server (created once)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            key, secret = self.credentials()
            self._client = boto3.client(
                "lambda-microvms",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                verify=self.api_ca_bundle(),
                config=Config(
                    retries={"max_attempts": 2, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=120,
                ),
            )
        return self._client
