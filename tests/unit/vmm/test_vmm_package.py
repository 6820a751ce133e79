import types

import embervm.vmm as vmm


def test_every_public_name_is_exported_and_every_export_exists() -> None:
    public = {
        name
        for name, value in vars(vmm).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(vmm.__all__)
