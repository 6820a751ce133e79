"""The real implementations of core's seams, in one import for the composition."""

from embervm.server.applogs import AppLogFiles
from embervm.server.hostbackend import LocalHostBackend
from embervm.server.imagebuilder import BuildLogFiles, PipelineImageBuilder

__all__ = ["AppLogFiles", "BuildLogFiles", "LocalHostBackend", "PipelineImageBuilder"]
