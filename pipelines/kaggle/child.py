"""The child process's side of a Kaggle call (`python -c` back into `_child_main`): the only code that imports the
`kaggle` client; one JSON line of result on stdout, the client's own prints moved to stderr."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .client import _secrets


class _ChildFailure(Exception):
    def __init__(self, **info):
        super().__init__(info.get("kind"))
        self.info = info


def _child_main() -> None:
    """Entry point of the child: argv = [op, json args]; writes {"ok": result} or {"error": info} as one line."""
    result_stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the client prints goes to stderr, never into the result
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = {"ok": _CHILD_OPS[op](**args)}
    except _ChildFailure as e:
        result = {"error": e.info}
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent as data
        result = {"error": _classify(e)}
    result_stream.write(json.dumps(result) + "\n")
    result_stream.flush()


def _classify(e: BaseException) -> dict:
    try:
        import requests
        import urllib3
    except ImportError:  # pragma: no cover
        requests = urllib3 = None
    if requests is not None:
        response = getattr(e, "response", None)
        if isinstance(e, requests.exceptions.HTTPError) and response is not None:  # Response is falsy on errors
            return {"kind": "http", "status": int(response.status_code)}
        if isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
            return {"kind": "timeout"}
        if isinstance(e, (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError, ConnectionError)):
            text = str(e).lower()
            detail = ("connection refused" if "refused" in text else
                      "name not resolved" if "resolve" in text or "name or service" in text else
                      "connection closed" if "closed" in text or "aborted" in text or "reset" in text else
                      "connection failed")
            return {"kind": "connection", "detail": detail}
    if isinstance(e, SystemExit):
        return {"kind": "nocreds"}
    first = (str(e).splitlines() or [""])[0]
    return {"kind": "other", "detail": _child_scrub(f"{type(e).__name__}: {first}")}


def _child_scrub(text: str) -> str:
    secrets = _secrets()
    try:
        import kaggle

        secrets += [v for k, v in kaggle.api.config_values.items() if k in ("key", "token", "api_token") and v]
    except Exception:  # noqa: BLE001
        pass
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _api():
    """The authenticated client, or _ChildFailure(nocreds / badtoken)."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):  # `import kaggle` authenticates and prints help when it cannot
        import kaggle
    api = kaggle.api
    if getattr(api, "_authenticated", False):
        return api
    from kagglesdk.kaggle_env import get_access_token_from_env

    try:
        with redirect_stdout(io.StringIO()):
            api.authenticate()  # again, to let a 401 from the token check surface as an HTTPError
    except SystemExit:
        token, source = get_access_token_from_env()
        if token:
            raise _ChildFailure(kind="badtoken", source={"access_token": "~/.kaggle/access_token"}.get(source, source))
        raise _ChildFailure(kind="nocreds")
    return api


def _child_download(slug: str, folder: str) -> list[str]:
    api = _api()
    api.competition_download_files(slug, path=folder, force=True, quiet=True)
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def _child_submit(slug: str, csv: str, message: str) -> dict:
    api = _api()
    response = api.competition_submit(csv, message, slug, quiet=True)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:  # returned, not raised, by the client
        raise _ChildFailure(kind="upload")
    ref = response.ref
    if not ref:  # an older server without `ref` in CreateSubmission: find the submission just made
        for sub in api.competition_submissions(slug) or []:
            if sub.file_name == os.path.basename(csv) and (sub.description or "") == (message or ""):
                ref = sub.ref
                break
    if not ref:
        raise _ChildFailure(kind="noref", detail=f"Kaggle accepted the file but gave no submission ref "
                                                 f"({_child_scrub(response.message or '')[:120]})")
    return {"ref": str(ref), "message": response.message}


def _child_list(slug: str) -> list[dict]:
    api = _api()
    result = []
    for sub in api.competition_submissions(slug) or []:
        if sub is None:
            continue
        score = sub.public_score
        try:
            score = float(score) if score not in (None, "") else None
        except ValueError:
            score = None
        status = getattr(sub.status, "name", str(sub.status)).lower().replace("submission_status_", "")
        result.append({
            "ref": str(sub.ref),
            "date": sub.date.isoformat() if sub.date else None,
            "description": sub.description or "",
            "file_name": sub.file_name or "",
            "status": status,
            "public_score": score,
            "error_description": sub.error_description or "",
        })
    return result


def _child_limits(slug: str) -> dict:
    api = _api()
    limits = api.competition_get_submission_limits(slug)
    return {"num_today": limits.num_today, "num_total": limits.num_total, "num_allowed_now": limits.num_allowed_now,
            "limited_by_total": limits.limited_by_total}


def _child_info(slug: str) -> dict:
    from kagglesdk.competitions.types.competition_api_service import (
        ApiGetCompetitionRequest,
    )

    api = _api()
    request = ApiGetCompetitionRequest()
    request.competition_name = slug
    with api.build_kaggle_client() as client:
        comp = client.competitions.competition_api_client.get_competition(request)
    return {"title": comp.title or "", "evaluation_metric": comp.evaluation_metric or "",
            "kernels_only": bool(comp.is_kernels_submissions_only)}


def _child_whoami() -> str:
    api = _api()
    name = api.config_values.get(api.CONFIG_NAME_USER)
    if not name:
        raise _ChildFailure(kind="other", detail="the credentials name no Kaggle user: set KAGGLE_USERNAME")
    return name


def _owned(api, dataset: str) -> bool:
    import requests

    try:
        api.dataset_status(dataset)
    except requests.exceptions.HTTPError:  # how the client itself tells a new dataset (dataset_create_new)
        return False
    return True


def _child_push_dataset(folder: str, dataset: str, title: str, notes: str) -> dict:
    api = _api()
    meta = {"title": title, "id": dataset, "licenses": [{"name": "CC0-1.0"}]}
    (Path(folder) / "dataset-metadata.json").write_text(json.dumps(meta))
    created = not _owned(api, dataset)
    if created:
        response = api.dataset_create_new(folder, public=False, quiet=True, convert_to_csv=False)
    else:
        response = api.dataset_create_version(folder, notes, quiet=True, convert_to_csv=False)
    if response.invalid_tags:
        raise _ChildFailure(kind="refused", detail=f"invalid tags {', '.join(response.invalid_tags)}")
    if (response.status or "").lower() != "ok":
        raise _ChildFailure(kind="refused", detail=response.error or f"status '{response.status}'")
    return {"ref": response.ref or dataset, "created": created}


def _child_dataset_status(dataset: str) -> str:
    return str(_api().dataset_status(dataset)).lower()


def _child_dataset_version(dataset: str) -> int:
    answer = _api().dataset_status(dataset, format="json(current_version_number)")
    return int(json.loads(answer)["current_version_number"])


def _child_dataset_files(dataset: str) -> dict:
    api, files, token = _api(), {}, None
    while True:
        response = api.dataset_list_files(dataset, page_token=token, page_size=200)
        if response.error_message:
            raise _ChildFailure(kind="refused", detail=response.error_message)
        files.update({f.name: int(f.total_bytes or 0) for f in response.files or []})
        token = response.next_page_token
        if not token:
            return files


def _child_push_kernel(folder: str, timeout: int | None = None) -> dict:
    api = _api()
    response = api.kernels_push(folder, timeout=str(timeout) if timeout else None)
    if response.error:
        raise _ChildFailure(kind="refused", detail=response.error)
    invalid = {what: list(getattr(response, f"invalid_{what}_sources") or [])
               for what in ("dataset", "competition", "kernel", "model")}
    invalid = {what: names for what, names in invalid.items() if names}
    if invalid:
        listed = "; ".join(f"{what} {', '.join(names)}" for what, names in invalid.items())
        raise _ChildFailure(kind="refused", detail=f"unknown sources ({listed}): the notebook would run without "
                                                   "them")
    return {"ref": response.ref, "version": int(response.version_number or 0), "url": response.url or ""}


def _child_kernel_status(kernel: str, version: int) -> dict:
    response = _api().kernels_status(f"{kernel}/{version}")
    status = getattr(response.status, "name", str(response.status)).lower().replace("kernel_worker_status_", "")
    return {"status": status, "failure": response.failure_message or ""}


def _child_kernel_output(kernel: str, version: int, name: str, folder: str) -> list[str]:
    api = _api()
    files, _ = api.kernels_output(f"{kernel}/{version}", folder, file_pattern=f"^{re.escape(name)}$", force=True,
                                  quiet=True)
    return [str(f) for f in files or []]


def _child_submit_code(slug: str, kernel: str, version: int, name: str, message: str) -> dict:
    api = _api()
    response = api.competition_submit_code(name, message, slug, kernel=kernel, kernel_version=version, quiet=True)
    if not response.ref:
        raise _ChildFailure(kind="refused", detail=response.message or "no submission ref in Kaggle's answer")
    return {"ref": str(response.ref), "message": response.message}


def _child_gpu_quota() -> dict:
    """The weekly GPU quota (kaggle >= 2.2.1's quota_view): hours used and allowed."""
    q = _api().quota_view()
    gpu = q.gpu_quota
    refresh = q.quota_refresh_time
    hours = lambda t: t.total_seconds() / 3600 if t is not None else None  # noqa: E731 - timedeltas
    return {"used": hours(gpu.time_used) if gpu else None, "allowed": hours(gpu.total_time_allowed) if gpu else None,
            "refresh": refresh.isoformat() if refresh is not None else None}


_CHILD_OPS = {"gpu_quota": _child_gpu_quota,
              "download": _child_download, "submit": _child_submit, "list": _child_list, "limits": _child_limits,
              "info": _child_info, "whoami": _child_whoami, "push_dataset": _child_push_dataset,
              "dataset_status": _child_dataset_status, "dataset_files": _child_dataset_files,
              "dataset_version": _child_dataset_version,
              "push_kernel": _child_push_kernel, "kernel_status": _child_kernel_status,
              "kernel_output": _child_kernel_output, "submit_code": _child_submit_code}
