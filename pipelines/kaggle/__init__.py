"""Kaggle: download a competition's data (safely unzipped), submit a CSV, list submissions, wait for a score.

This is the only module that imports the official `kaggle` client, and it never imports it in the ens process:
every call runs the client in a short-lived child Python process (`python -c ...` back into this module), because

* `import kaggle` authenticates at import time (and with an access token it makes a network call then);
* the client sets no timeouts anywhere (its requests sessions send with `timeout=None`, the upload PUT retries
  connection errors ten times with back-off), so a server that accepts the connection and never answers would
  hang ens for ever. A child process can be killed: the parent waits for it with a deadline and kills it when
  the deadline passes, which bounds every call however the client behaves;
* the client prints to stdout (auth help, warnings); the child moves its stdout to stderr and hands its result
  back as one JSON line on the original stdout, so nothing the client prints reaches ens's output.

Failures come back as `KaggleError`: one line naming the problem and the fix, never a traceback or a secret.

Modules: `client` (each call and its one-line errors), `extract` (safe unzipping and partial folders), `child`
(the child process's side: the only code that imports `kaggle`).
"""

from .client import (  # noqa: F401
    RULES_URL, TOKEN_URL, CREDENTIALS_HELP, DOWNLOAD_TIMEOUT, SUBMIT_TIMEOUT, CALL_TIMEOUT, PUSH_TIMEOUT,
    KaggleError, download, submit, list_submissions, remaining_submissions, wait_for_score, competition_info,
    whoami, push_dataset, dataset_status, dataset_version, dataset_files, push_kernel, kernel_status,
    kernel_output, submit_code, gpu_quota,
)
from .extract import safe_extract  # noqa: F401
from .child import _child_main  # noqa: F401
