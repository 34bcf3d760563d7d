"""The one exception type for problems a user can cause and fix; `cli.py` shows it as one line."""


class EnsError(Exception):
    """A user-fixable problem. The message names the problem and the fix; `exit_code` is what `ens` exits with."""

    exit_code = 1


class ConfigError(EnsError):
    """Bad input in a YAML file or on the command line (exit code 2)."""

    exit_code = 2
