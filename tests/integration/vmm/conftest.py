"""Fixtures of the QEMU VMM's integration tests (defined in ``vmm_qemu_lab``)."""

from tests.framework.vmm_qemu_lab import image, lab, lab_root

__all__ = ["image", "lab", "lab_root"]
