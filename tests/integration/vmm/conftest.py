"""The lab and image fixtures of test_vmm_qemu, shared with the other modules here."""

from test_vmm_qemu import image, lab, lab_root  # noqa: F401
