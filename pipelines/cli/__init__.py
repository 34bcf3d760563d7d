"""The `ens` command: parse, call, print. Errors users can cause arrive as EnsError and leave as one line.

Nothing heavy is imported at module level: `ens --help`, `ens validate` and `ens cache ls` answer at once. One module per
verb group: `run` (run, plan, validate, tune), `results` (ablate, report, bench, eval, models), `kaggle` (check,
submit, submissions, kaggle …), `data` (init, data, cache …); `app` holds what they share.
"""

from __future__ import annotations

import os
import sys
import warnings

from rich.markup import escape

from ..errors import EnsError
# each registers its verbs on the app, in the order `ens --help` lists them
from . import run, results, kaggle, data  # noqa: F401,I001  # isort: skip
from .app import _parallel, app, err  # noqa: F401 - the entry point's app; _parallel for the Ray tests


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # said at import, not ours to fix
    try:
        app()
    except EnsError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:  # typer turns Ctrl-C inside a command into a silent exit 130
        if e.code == 130 and _caused_by_ctrl_c(e):
            _interrupted()
        raise


def _caused_by_ctrl_c(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def _interrupted():
    err.print("interrupted: finished members are cached (and an unfinished one's last epoch); run the same command "
              "again to go on")
    sys.exit(130)

