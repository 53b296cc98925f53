"""Expected failures: each names the resource and ends the daemon with one clear line."""


class HydrodError(Exception):
    """An expected, fatal failure: logged as one ERROR line, exit code non-zero."""

    exit_code = 1


class ConfigError(HydrodError):
    """The config file is missing, unreadable or invalid."""

    exit_code = 2


class DatabaseUnusable(ConfigError):
    """The database answers, but hydrod cannot use it as it is (not UTF-8).

    Waiting will not fix it, so it ends hydrod like a config error, exit 2."""


class DatabaseUnavailable(HydrodError):
    """PostgreSQL could not be reached (or migrated) in time."""

    exit_code = 3


class StartupError(HydrodError):
    """An actor did not start; the message names it and why."""

    exit_code = 4


class SupervisorGaveUp(HydrodError):
    """An actor failed more often than its restart budget allows, or the supervisor itself failed."""

    exit_code = 5


def unexpected(cause: BaseException | None) -> BaseException | None:
    """`cause` when its traceback is worth logging: not an error hydrod names itself,
    nor an OSError, whose message says what and where."""
    return None if cause is None or isinstance(cause, (HydrodError, OSError)) else cause
