"""``embervm server``: the composition of every part into one process.

- ``app``: start-up order, the listeners, the ``embervm ready`` line, shutdown in reverse.
- ``backends``: the real implementations of core's seams (host runtime, image builds, logs).
"""
