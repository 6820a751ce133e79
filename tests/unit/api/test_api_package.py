import subprocess
import sys
import types

import embervm.api as api


def test_every_public_name_is_exported_and_every_export_exists() -> None:
    public = {
        name
        for name, value in vars(api).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(api.__all__)


def test_importing_the_api_package_does_not_need_core() -> None:
    # The credentials commands import embervm.api; they must work where core is not importable.
    code = (
        "import sys; sys.modules['embervm.core'] = None; "
        "import embervm.api, embervm.cli.credentials"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
