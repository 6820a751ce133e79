"""The run state of a local fleet: what ``embervm fleet up`` started, so that ``embervm fleet
down`` — another process, maybe after the first one died — stops exactly that and nothing else.

``DATA_DIR/fleet.json`` (0600, replaced atomically) names the PostgreSQL and SeaweedFS folders
(each knows its running process: ``postmaster.pid``, ``run.json``; a restart changes the pid,
so the state does not hold it), every other process with the pid, command line and start time
it had when it was recorded, and the URLs ``fleet up`` printed. ``stop_all`` stops the
processes last-started first, then SeaweedFS, then PostgreSQL; a pid whose command line or
start time differs from the record now names someone else's process and is left alone. The
file is removed once every process it lists is verifiably gone.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embervm.errors import ConfigError, RuntimeFailure
from embervm.fileio import atomic_write
from embervm.localfleet._proc import ProcessIdentity, stop_process
from embervm.localfleet.postgres import LocalPostgres
from embervm.localfleet.seaweedfs import LocalSeaweedFS

STATE_FILE = "fleet.json"
FORMAT = 1


def state_file(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


@dataclass(frozen=True)
class ProcessRecord:
    """A process the fleet started: who it is (pid, command line, start time) and how it
    stops (``stop_signal``, to its whole process group when ``group``; SIGKILL after
    ``grace_seconds``)."""

    name: str
    pid: int
    cmdline: tuple[str, ...]
    start_ticks: int
    stop_signal: int = signal.SIGTERM
    group: bool = False
    grace_seconds: float = 10.0

    @classmethod
    def of(
        cls, name: str, pid: int, *, argv: Sequence[str] | None = None,
        stop_signal: int = signal.SIGTERM, group: bool = False, grace_seconds: float = 10.0,
    ) -> ProcessRecord:  # fmt: skip
        """Record the live process ``pid`` as it is now. Pass the ``argv`` it was spawned with
        when it may still be in its exec (right after ``Popen``). RuntimeFailure if it is gone."""
        identity = (
            ProcessIdentity.after_spawn(pid, argv) if argv is not None else ProcessIdentity.of(pid)
        )
        if identity is None:
            raise RuntimeFailure(f"process {pid} ({name}) is not running")
        return cls(name, pid, identity.cmdline, identity.start_ticks, stop_signal, group,
                   grace_seconds)  # fmt: skip

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.cmdline, self.start_ticks)

    def is_running(self) -> bool:
        """True while ``pid`` is still this very process."""
        return self.identity.matches_now()


@dataclass(frozen=True)
class ServiceRecord:
    """PostgreSQL or SeaweedFS: its folder (which knows its running process) and its port."""

    root: Path
    port: int


@dataclass(frozen=True)
class FleetState:
    postgres: ServiceRecord | None = None
    seaweedfs: ServiceRecord | None = None
    processes: tuple[ProcessRecord, ...] = ()
    urls: Mapping[str, str] = field(default_factory=dict)

    def with_process(self, record: ProcessRecord) -> FleetState:
        """This state with ``record`` in place of the process of the same name (or added)."""
        kept = tuple(p for p in self.processes if p.name != record.name)
        return replace(self, processes=(*kept, record))

    def to_json(self) -> str:
        def service(s: ServiceRecord | None) -> dict[str, Any] | None:
            return {"root": str(s.root), "port": s.port} if s else None

        return json.dumps({
            "format": FORMAT, "postgres": service(self.postgres),
            "seaweedfs": service(self.seaweedfs), "urls": dict(self.urls),
            "processes": [
                {"name": p.name, "pid": p.pid, "cmdline": list(p.cmdline),
                 "start_ticks": p.start_ticks, "stop_signal": p.stop_signal, "group": p.group,
                 "grace_seconds": p.grace_seconds}
                for p in self.processes
            ],
        }, indent=2) + "\n"  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> FleetState:
        """Parse a state file; ValueError (or KeyError/TypeError) if it is not one."""
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")

        def service(s: dict[str, Any] | None) -> ServiceRecord | None:
            return ServiceRecord(Path(s["root"]), int(s["port"])) if s else None

        processes = tuple(
            ProcessRecord(
                str(p["name"]),
                int(p["pid"]),
                tuple(map(str, p["cmdline"])),
                int(p["start_ticks"]),
                int(p["stop_signal"]),
                bool(p["group"]),
                float(p["grace_seconds"]),
            )
            for p in raw["processes"]
        )
        urls = {str(k): str(v) for k, v in dict(raw.get("urls") or {}).items()}
        return cls(service(raw["postgres"]), service(raw["seaweedfs"]), processes, urls)


def save_state(data_dir: Path, state: FleetState) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_file(data_dir), state.to_json(), mode=0o600)


def load_state(data_dir: Path) -> FleetState | None:
    """The fleet's state, or None when no fleet was started here (or it was stopped)."""
    path = state_file(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RuntimeFailure(f"could not read {path}: {exc.strerror}") from exc
    try:
        return FleetState.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a fleet state file ({exc}); nothing was stopped") from exc


@dataclass(frozen=True)
class Stopped:
    """What ``stop_all`` did to one process: "stopped", "killed" (after its grace), "gone"
    (it had already exited) or "not ours" (its pid names another process now: left alone)."""

    name: str
    outcome: str


def stop_all(data_dir: Path) -> list[Stopped]:
    """Stop everything the state file of ``data_dir`` lists and verify it is gone; then remove
    the file. Returns what happened to each; RuntimeFailure (file kept) if something survives."""
    state = load_state(data_dir)
    if state is None:
        return []
    done: list[Stopped] = []
    failures: list[str] = []
    for record in reversed(state.processes):
        try:
            outcome = stop_process(record.identity, first=record.stop_signal, group=record.group,
                                   grace=record.grace_seconds)  # fmt: skip
        except RuntimeFailure as exc:
            failures.append(str(exc))
            continue
        done.append(Stopped(record.name, outcome))
    if state.seaweedfs is not None:
        done.append(_stop_service("seaweedfs", LocalSeaweedFS(state.seaweedfs.root), failures))
    if state.postgres is not None:
        done.append(_stop_service("postgres", LocalPostgres(state.postgres.root), failures))
    survivors = [r.name for r in state.processes if r.is_running()]
    if state.seaweedfs is not None and LocalSeaweedFS(state.seaweedfs.root).is_running():
        survivors.append("seaweedfs")
    if state.postgres is not None and LocalPostgres(state.postgres.root).is_running():
        survivors.append("postgres")
    if survivors or failures:
        raise RuntimeFailure(
            f"the fleet of {data_dir} did not stop: still running: {', '.join(survivors) or '-'}"
            + "".join(f"; {failure}" for failure in failures)
        )
    state_file(data_dir).unlink(missing_ok=True)
    return done


def _stop_service(
    name: str, service: LocalPostgres | LocalSeaweedFS, failures: list[str]
) -> Stopped:
    identity = service.process()
    if identity is None:
        return Stopped(name, "gone")
    try:
        service.stop()
        return Stopped(name, "stopped")
    except (RuntimeFailure, ConfigError) as exc:
        reason = str(exc)
    # Its own way failed (pg_ctl missing or stuck): signals, as for any recorded process.
    # SIGQUIT is PostgreSQL's immediate shutdown (the postmaster takes its children down).
    postgres = isinstance(service, LocalPostgres)
    try:
        outcome = stop_process(
            identity, first=signal.SIGQUIT if postgres else signal.SIGTERM, group=not postgres
        )
    except RuntimeFailure as exc:
        failures.append(f"{name}: {reason}; {exc}")
        return Stopped(name, "failed")
    return Stopped(name, outcome)
