"""Small helpers shared by modules that otherwise know nothing of each other (cache, kaggle)."""

import os


def process_alive(pid: int) -> bool:
    """Is process `pid` still running? (Leftovers of a dead run may be swept; a live run's may not.)"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
