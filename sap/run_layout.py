"""The run folder (SPEC §1, §10): where every stage, the study and the report put their files.

The one place that spells the layout; pretraining, fine-tuning, ``sap cv`` and ``sap report``
all ask :class:`RunDir` for their paths::

    RUN/config.yaml                 resolved config of the study
    RUN/splits.json                 folds (written once, sap.data.splits)
    RUN/manifest.json               config hash, package versions, git commit, seeds, durations
    RUN/pretrain/{skeletal,ssl}/    pretraining (STAGE_FILES)
    RUN/{method}/fold_{k}/          fine-tuning of test fold k (STAGE_FILES),
                                    tuning/CASE_prob.nii.gz (tuning fold predicted by this model)
    RUN/reference/                  the non-learning reference detector (sap.cv.reference): the
                                    same predictions/, fold_{k}/tuning/, threshold.json and
                                    evaluation/ as a network method, no training
    RUN/{method}/predictions/       CASE_prob.nii.gz of every test case, each by its own fold model
    RUN/{method}/threshold.json     the tuned operating point (shared or per fold)
    RUN/{method}/evaluation/        patients.csv, lesions.csv, summary.json, regions.csv,
                                    candidates.csv (FROC candidates, sap.cv.stages)
    RUN/{method}/ensemble_tuning/   mean tuning-fold maps of the fold models (sap cv --export),
    RUN/{method}/ensemble_threshold.json   and the threshold tuned on them for the bundle
    RUN/features/{ssl,sap}.npz      t-SNE features of the pretrained encoders
    RUN/report/                     report.md, report.html, figures/*.png, tables/*.csv

It also says which config sections each folder's results depend on: ``sap cv`` hashes them and
the stage runner compares them before it resumes a training stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sap.errors import SapError

#: pretraining stages, each in ``RUN/pretrain/<stage>``
PRETRAIN_STAGES: tuple[str, ...] = ("skeletal", "ssl")
#: canonical method names in report order; ``scratch`` is an alias of ``baseline``
METHODS: tuple[str, ...] = ("baseline", "ssl", "sap")
#: the non-learning reference detector: predicted, tuned and evaluated like a network method
REFERENCE = "reference"
#: every method a run folder and its report can hold, in report order
ALL_METHODS: tuple[str, ...] = (*METHODS, REFERENCE)
#: fine-tuning init of each method and the pretraining stage it starts from (None: none)
INIT_OF = {"baseline": "scratch", "ssl": "ssl", "sap": "sap"}
PRETRAIN_OF: dict[str, str | None] = {"baseline": None, "ssl": "ssl", "sap": "skeletal"}
#: method folder of each fine-tuning init (``baseline`` and ``scratch`` are aliases, SPEC §1)
METHOD_OF_INIT = {"scratch": "baseline", "baseline": "baseline", "ssl": "ssl", "sap": "sap"}

#: files a training stage writes into its folder (besides ``tensorboard/``)
STAGE_FILES = ("last.pt", "best.pt", "log.csv", "config.yaml", "summary.json")

#: config sections (dotted names allowed) that each kind of folder depends on
NETWORK_SECTIONS = ("scale", "data", "model")
FOLD_EXTRA = ("finetune", "infer", "cv.k", "cv.seed", "cv.tuning_in_training", "cv.checkpoint")
PRETRAIN_SECTIONS = (*NETWORK_SECTIONS, "pretrain")
FOLD_SECTIONS = (*PRETRAIN_SECTIONS, *FOLD_EXTRA)
STUDY_SECTIONS = (*FOLD_SECTIONS, "evaluate", "tuning", "cv.threshold")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, out: str | Path | None) -> RunDir:
        """The run folder of config key ``out`` (``--out``); an error when it is not set."""
        if not out:
            raise SapError("no run folder: pass --out RUN (or set out in the config)")
        return cls(Path(out))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def pretrain(self, stage: str) -> Path:
        if stage not in PRETRAIN_STAGES:
            raise SapError(f"unknown pretraining stage {stage!r}; choose {' or '.join(PRETRAIN_STAGES)}")
        return self.root / "pretrain" / stage

    def pretrained(self, stage: str) -> Path:
        """The checkpoint a fine-tuning init starts from by default: the stage's ``best.pt``."""
        return self.pretrain(stage) / "best.pt"

    def method(self, method: str) -> Path:
        return self.root / method

    def fold(self, method: str, fold: int) -> Path:
        return self.root / method / f"fold_{fold}"

    def tuning_predictions(self, method: str, fold: int) -> Path:
        return self.fold(method, fold) / "tuning"

    def predictions(self, method: str) -> Path:
        return self.root / method / "predictions"

    def evaluation(self, method: str) -> Path:
        return self.root / method / "evaluation"

    def threshold(self, method: str) -> Path:
        return self.root / method / "threshold.json"

    def ensemble_tuning(self, method: str) -> Path:
        """Mean probability maps of the fold models on the tuning fold (the exported ensemble's)."""
        return self.root / method / "ensemble_tuning"

    def ensemble_threshold(self, method: str) -> Path:
        return self.root / method / "ensemble_threshold.json"

    def methods_present(self) -> list[str]:
        """Methods (the reference included) with a folder in the run, in report order."""
        return [m for m in ALL_METHODS if self.method(m).is_dir()]

    def folds_present(self, method: str) -> list[int]:
        out = []
        for path in sorted(self.method(method).glob("fold_*")):
            suffix = path.name.removeprefix("fold_")
            if suffix.isdigit():
                out.append(int(suffix))
        return sorted(out)
