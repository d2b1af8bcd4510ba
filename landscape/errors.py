"""The errors that mean bad input (reported as one line, exit status 2), in one place."""

from landscape.load import GroupError
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.data import DataError


class AnalysisError(ValueError):
    """Arguments an analysis cannot work with (k larger than the parameter count, a grid of
    size < 2, runs that cannot be compared, ...)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    AnalysisError, GroupError, CheckpointError, ConfigError, DataError,
)
