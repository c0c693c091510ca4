"""Runtime errors: bad input to an engine, or a build directory it cannot load."""

from l4compile.errors import L4Error


class RuntimeInputError(L4Error, ValueError):
    """Input ids of the wrong dtype, rank or range; the engine stays usable."""


class BuildDirError(L4Error):
    """A build directory is missing files or its manifest is not one this runtime reads."""
