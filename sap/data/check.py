"""``sap check-data``: validate a cohort against every data rule (SPEC §2, §13); writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import numpy as np
from tqdm.auto import tqdm

from sap.config import Config
from sap.data.cases import Case, discover_cohort
from sap.data.preprocess import load_case
from sap.errors import SapError


@dataclass
class CaseSummary:
    case_id: str
    subject_id: str
    group: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    n_lesions: int | None
    skeleton_labels: list[int] | None


@dataclass
class CheckReport:
    summaries: list[CaseSummary] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_case(case: Case, cfg: Config) -> CaseSummary:
    """Read one case with every reading rule; raises SapError on the first violation."""
    loaded = load_case(case, cfg.data, n4=False)
    n_lesions = None
    if loaded.lesions is not None:
        n_lesions = int(cc3d.connected_components(loaded.lesions, connectivity=26, return_N=True)[1])
    skeleton_labels = None if loaded.skeleton is None else [int(v) for v in np.unique(loaded.skeleton)]
    return CaseSummary(
        case_id=case.case_id,
        subject_id=case.subject_id,
        group=case.group,
        shape=tuple(loaded.image.shape[1:]),  # type: ignore[arg-type]
        spacing=tuple(round(s, 4) for s in loaded.spacing),  # type: ignore[arg-type]
        n_lesions=n_lesions,
        skeleton_labels=skeleton_labels,
    )


def check_cohort(
    cfg: Config,
    splits_file: str | Path | None = None,
    progress: bool = True,
    on_case: Callable[[CaseSummary], None] | None = None,
) -> CheckReport:
    """Validate every case of the cohort (and a splits file when given). Collects all errors."""
    cohort = discover_cohort(cfg.data)  # layout problems (missing channel, id collision) raise at once
    report = CheckReport()
    for case in tqdm(cohort.cases, desc="checking cases", unit="case", disable=not progress):
        try:
            summary = check_case(case, cfg)
        except SapError as exc:
            report.errors.append(str(exc))
            continue
        if case.group == "healthy" and summary.skeleton_labels is None:
            report.errors.append(f"{case.case_id}: healthy exam without skeleton labels (needed for skeletal pretraining)")
        if case.group == "patients" and summary.n_lesions is None:
            report.errors.append(f"{case.case_id}: patient exam without a lesion mask (GT)")
        report.summaries.append(summary)
        if on_case is not None:
            on_case(summary)
    if splits_file is not None:
        import json

        from sap.data.splits import splits_from_json

        path = Path(splits_file)
        try:
            splits_from_json(json.loads(path.read_text()), str(path), cohort)
        except (OSError, json.JSONDecodeError) as exc:
            report.errors.append(f"{path}: cannot read splits file ({exc})")
        except SapError as exc:
            report.errors.append(str(exc))
    return report
