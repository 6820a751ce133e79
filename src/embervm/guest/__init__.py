"""The guest side of a VM: its artifacts (kernel, initramfs, base disk) and the agent protocol.

- ``artifacts``: builds and caches what a VM boots from.
- ``agent``: the stdlib-only program that runs as PID 1 inside the guest.
- ``client``: the host side of the agent protocol (``AgentClient``).
"""
