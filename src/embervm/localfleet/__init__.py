"""The local infrastructure of ``embervm fleet up``: a real fleet's shared services on one
machine, for trying Embervm's fleet mode and for its tests (issue #13).

A fleet's only coordinator and store is PostgreSQL and its images and snapshots live in an
S3-compatible object store. ``fleet up`` runs both as throwaway local servers, each under a
folder of the fleet's data directory, bound to 127.0.0.1 only:

- ``LocalPostgres`` (``postgres.py``): a cluster made with Debian's ``postgresql-15`` binaries
  (``initdb`` once; ``pg_ctl`` start, stop, ``restart -m immediate``), run as the ``postgres``
  user when we are root, trust authentication on 127.0.0.1, database and user ``embervm``.

This package imports only the ground floor (config, errors, fileio).
"""

from embervm.localfleet._proc import ProcessIdentity, free_port, free_ports
from embervm.localfleet.postgres import LocalPostgres, find_pg_bin

__all__ = [
    "LocalPostgres",
    "ProcessIdentity",
    "find_pg_bin",
    "free_port",
    "free_ports",
]
