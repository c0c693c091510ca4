"""One error type per layer. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class L4Error(Exception):
    """Base class of user-facing errors (no traceback unless --debug)."""

    exit_code = 1


class SpecError(L4Error):
    """A spec file is malformed: carries file, line and field."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        prefix = f"{field}: " if field else ""
        super().__init__(f"{where}{prefix}{message}")


class IRError(L4Error):
    """The IR graph is malformed (a compiler bug or a bad pass)."""


class WeightError(L4Error):
    """A checkpoint is missing a tensor, has a wrong shape, or is corrupt."""


class BuildError(L4Error):
    """A build cannot proceed (disk space, output directory, missing toolchain)."""


class PassError(L4Error):
    """A pipeline cannot run: unknown pass or pipeline, bad options, or a precondition that does not hold."""

    exit_code = 2


class TrainError(L4Error):
    """Training cannot start or continue: bad data, options that do not fit the spec, an incompatible run."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that a build removes its temporary directory."""
