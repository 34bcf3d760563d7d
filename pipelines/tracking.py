"""Optional MLflow tracking (`tracking: mlflow` in the ensemble, or `ens run --track`): each `ens run` an MLflow
run — params the resolved ensemble and the overrides, metrics per epoch (per model), per member and the blend's
honest score, artifacts the CSV, its validation JSON, the resolved ensemble and the run's report when written.

The store: `MLFLOW_TRACKING_URI` when set (a team's server, or any URI MLflow takes), else a SQLite database in
the project (`mlflow.db`, artifacts under `mlruns/`): `mlflow ui` started in the project folder shows them. One
experiment per competition. MLflow is imported only here, only when tracking."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EnsError

URI_ENV = "MLFLOW_TRACKING_URI"


def store_uri(root: Path) -> str:
    return os.environ.get(URI_ENV) or f"sqlite:///{root / 'mlflow.db'}"


def _flat(value, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists as dotted MLflow params; a list of members keyed by their names."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return {k: v for item in value for k, v in _flat(item, f"{prefix}{item['name']}.").items()}
    return {prefix.rstrip("."): str(value)[:6000]}


class Tracker:
    """One MLflow run, written through MLflow's client (no global state): opened before the members are
    gathered (so each epoch is logged as it ends), closed FINISHED with the results, or FAILED."""

    def __init__(self, root: Path, experiment: str, run_name: str, tags: dict):
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise EnsError("tracking: mlflow (or --track) needs MLflow: pip install 'ens[mlflow]'; or drop "
                           "--track / set tracking: none") from None
        # a tracking server that does not answer: fail in seconds, not after MLflow's default retries (minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.root, self.client = root, MlflowClient(store_uri(root))
        self.failed: str | None = None  # a logging error met mid-run: said once, training goes on
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                local = None if os.environ.get(URI_ENV) else (root / "mlruns").as_uri()  # not the cwd's ./mlruns
                try:
                    experiment_id = self.client.create_experiment(experiment, artifact_location=local)
                except MlflowException:  # created meanwhile by another run
                    experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                experiment_id = found.experiment_id
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        except MlflowException as e:
            raise EnsError(f"MLflow tracking at {store_uri(root)}: {str(e).splitlines()[0]}; check {URI_ENV} or "
                           "drop --track / tracking: mlflow") from None

    def epoch(self, row: dict) -> None:
        """One epoch of one model (`clock.EPOCH_WATCHERS`): `<member>[.fold<k>].<loss or metric>` at step epoch."""
        if self.failed:
            return
        fold = row.get("fold")
        prefix = row["member"] + ("" if fold is None else f".{fold}" if fold == "refit" else f".fold{fold}")
        try:
            for name, value in row.items():
                if name not in ("member", "fold", "epoch", "epochs") and isinstance(value, (int, float)):
                    self.client.log_metric(self.run_id, f"{prefix}.{name}", float(value), step=int(row["epoch"]))
        except Exception as e:  # the tracking server went away: the member being trained must not
            self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
            import sys

            print(f"warning: MLflow stopped answering ({self.failed}); training goes on, epochs no longer logged",
                  file=sys.stderr, flush=True)

    def params(self, ensemble, overrides: list[str], extra: dict) -> None:
        from mlflow.entities import Param

        params = {**_flat(ensemble.model_dump(mode="json", exclude={"defaults"})),
                  "overrides": " ".join(overrides) or "(none)", **{k: str(v) for k, v in extra.items()}}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_dict(self.run_id, ensemble.model_dump(mode="json"), "ensemble.json")

    def results(self, result) -> None:
        """The members' scores and times, the blend's honest score (and the local test score), the files."""
        metrics = {"run_seconds": result.seconds}
        for o in result.members:
            meta = o.entry.meta
            for name, value in (meta.get("metrics") or {}).items():
                metrics[f"member.{o.member.name}.{name}"] = value
            for unit in o.folds:  # cv: each fold model's own
                where = unit.fold if unit.fold == "refit" else f"fold{unit.fold}"
                for name, value in (unit.entry.meta.get("metrics") or {}).items():
                    metrics[f"member.{o.member.name}.{where}.{name}"] = value
            timings = [u.entry.meta.get("timings") or {} for u in (o.folds or [o])]
            metrics[f"member.{o.member.name}.train_seconds"] = sum(t.get("train_seconds", 0) for t in timings)
            metrics[f"member.{o.member.name}.predict_seconds"] = sum(t.get("predict_seconds", 0) for t in timings)
            if o.test_score is not None:
                metrics[f"member.{o.member.name}.test_{result.metric}"] = o.test_score
        if result.valid_score is not None:
            metrics[f"blend.{result.metric}"] = result.valid_score  # the honest one (nested CV when learned)
            if result.blended is not None and result.blended.learned:
                metrics[f"blend.{result.metric}_in_sample"] = result.blended.in_sample
        if result.test_score is not None:
            metrics[f"test.{result.metric}"] = result.test_score
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
        if result.csv is not None:
            for path in (result.csv, result.csv.with_suffix(".validation.json")):
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def latest_run(root: Path, experiment: str, ensemble_hash: str) -> "Tracker | None":
    """The newest tracked run of `ensemble_hash` (for `ens report` to attach its report), or None."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        return None
    client = MlflowClient(store_uri(root))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`ens.ensemble_hash` = '{ensemble_hash}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    tracker = Tracker.__new__(Tracker)
    tracker.root, tracker.client, tracker.run_id = root, client, runs[0].info.run_id
    return tracker
