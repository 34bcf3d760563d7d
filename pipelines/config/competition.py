"""A competition's YAML (`competitions/NAME.yaml`): its data layout, split, cross-validation, sample and
expected submission, and the notebook limits of a code competition."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Project, Strict


# --------------------------------------------------------------------------------------------- competitions
class Split(Strict):
    """The one validation split every member of every ensemble of a competition is scored on."""

    valid_pct: float = Field(0.2, gt=0, lt=1)
    seed: int = 42
    stratified: bool = True


class CrossValidation(Strict):
    """The k folds of a competition's cross-validated ensembles (`validation: cv`): fixed per competition, like the
    holdout split, so every member's out-of-fold probabilities line up row by row. With `group_column`, the
    images of one group (a plant, a patient, a scene) are kept in one fold: group k-fold."""

    folds: int = Field(5, ge=2)
    seed: int = 42
    stratified: bool = True
    group_column: Optional[str] = None  # a column of the labels CSV (train.csv), or of groups_csv
    groups_csv: Optional[str] = None  # for class-folder layouts: a CSV of train.id_column (file names) and group_column

    @model_validator(mode="after")
    def _groups_named(self):
        if self.groups_csv and not self.group_column:
            raise ValueError("groups_csv needs group_column: the column that holds each image's group")
        return self


class TrainLayout(Strict):
    """Class folders (`train_images/<label>/*.jpg`) or a labels CSV with a path template."""

    layout: Literal["folders", "csv"] = "folders"
    folder: str = "train_images"
    csv: Optional[str] = None
    id_column: str = "image_id"
    label_column: str = "label"
    path_template: str = "train_images/{id}"

    @model_validator(mode="after")
    def _csv_named(self):
        if self.layout == "csv" and not self.csv:
            raise ValueError("layout 'csv' needs `csv:` (the labels file, relative to the data folder)")
        return self


class Expected(Strict):
    """Facts copied from the competition's page (its Data tab), for what `ens plan` can say before the data is
    downloaded: the class count sizes the networks' heads (parameters, FLOPs), the image counts give time
    estimates and the decoded copies' disk. Once the data is there it governs; the plan notes a disagreement."""

    classes: Optional[int] = Field(None, ge=2)
    train_images: Optional[int] = Field(None, ge=1)  # labelled images, validation split included
    test_images: Optional[int] = Field(None, ge=1)
    image_size: Optional[tuple[int, int]] = None  # [height, width] of most images, as shown to a reader

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError("image_size is [height, width] in pixels, both positive")
        return v


class Notebook(Strict):
    """A code competition's limits: the submission is a notebook that Kaggle re-runs offline on a hidden test set
    (which replaces the public test images and sample submission at scoring)."""

    runtime_hours: float = Field(9.0, gt=0)  # the competition's limit on the notebook's run
    accelerator: Literal["none", "gpu"] = "gpu"  # what the notebook runs on (Kaggle's `enable_gpu`)
    hidden_test_images: Optional[int] = Field(None, ge=1)  # the hidden test set's size, from the competition's page
    output: str = "submission.csv"  # the file the notebook writes, which Kaggle scores


LABEL_METRICS = ("accuracy", "f1_macro")  # scored on the predicted labels, not on probabilities


class Competition(Strict):
    name: str
    title: str = ""
    data_dir: Optional[str] = None  # default cache/data/<name>
    builtin: Optional[Literal["digits"]] = None  # built locally on first use instead of downloaded
    train: TrainLayout = TrainLayout()
    test_images: str = "test_images"
    test_id: Literal["name", "stem"] = "name"  # a test image's id in the submission: file name or name sans suffix
    image_extensions: list[str] = [".jpg", ".jpeg", ".png"]
    # training images PIL cannot decode (truncated, not an image): stop (`error`), or train without them (`skip`);
    # a damaged test image is always an error (the submission needs every id)
    damaged_images: Literal["error", "skip"] = "error"
    sample_submission: str = "sample_submission.csv"
    id_column: str = "image_id"
    target_column: str = "label"
    # what the target column holds: the predicted label, or the probability of `positive_class` (real/fake
    # competitions are often scored on a probability)
    submission_kind: Literal["label", "probability"] = "label"
    positive_class: Optional[str] = None
    metric: Literal["accuracy", "log_loss", "f1_macro", "roc_auc"] = "accuracy"
    split: Split = Split()
    cv: CrossValidation = CrossValidation()  # the folds of ensembles with `validation: cv`
    solution: Optional[str] = None  # local answers (id and target columns), for competitions scored here
    kaggle: Optional[str] = None  # competition slug
    # how Kaggle takes a submission: a CSV upload, or a notebook run offline (a code competition, limits in
    # `notebook:`); auto: ask Kaggle (its `isKernelsSubmissionsOnly`) when submitting
    submission: Literal["csv", "notebook", "auto"] = "csv"
    notebook: Notebook = Notebook()
    expected: Optional[Expected] = None  # facts from the competition's page, for `ens plan` before the download

    @model_validator(mode="after")
    def _probability_needs_a_class(self):
        if self.submission_kind == "probability" and not self.positive_class:
            raise ValueError("submission_kind 'probability' needs positive_class: the class whose probability is submitted")
        if self.submission_kind == "probability" and self.metric in LABEL_METRICS:
            # Kaggle compares a label metric's labels as text: '0.734' is not '1', whatever a local rounding says
            raise ValueError(f"metric {self.metric} scores labels, but submission_kind is 'probability': the CSV "
                             "would hold probabilities where Kaggle compares labels; set submission_kind: label (or "
                             "the metric Kaggle uses: roc_auc or log_loss)")
        return self

    @model_validator(mode="after")
    def _groups_readable(self):
        if self.cv.group_column and not self.cv.groups_csv and self.train.layout != "csv":
            raise ValueError("cv.group_column with class folders needs cv.groups_csv: a CSV of image file names "
                             f"({self.train.id_column}) and {self.cv.group_column}")
        return self

    def data_path(self, project: Project) -> Path:
        return project.root / (self.data_dir or f"cache/data/{self.name}")

