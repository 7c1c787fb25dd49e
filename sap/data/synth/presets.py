"""Cohort presets: counts, grid and voxel size of each synthetic cohort (SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sap.errors import SapError

#: the phantom's field of view (mm, array axis order R-L, P-A, I-S): neck to proximal thighs
FIELD_OF_VIEW_MM = (352.0, 256.0, 704.0)


#: the difficulty features a preset can switch on (``sap synth --difficulty``)
DIFFICULTY_FEATURES: tuple[str, ...] = ("low_contrast", "marrow", "bone_mimics")


@dataclass(frozen=True)
class Difficulty:
    """What makes real whole-body MRI hard, as knobs (issue 15). Paper 002 (§5) names the
    difficulties (low-contrast lesions, regional marrow variation, in-bone mimics such as healed
    fractures and treatment-related sclerosis) but gives no numbers: every value here is ours.
    All zero (the default) leaves a cohort exactly as it was before these features existed."""

    #: share of lesions drawn at reduced contrast
    low_contrast_fraction: float = 0.0
    #: their contrast factor c, uniform in this range: lesion signal = marrow + c x (lesion - marrow)
    low_contrast_range: tuple[float, float] = (0.15, 0.45)
    #: amplitude (0 off, 1 full) of regional marrow cellularity: per bone and in patches, red
    #: marrow darkens T1 and raises b1000 (and HU), up to lesion-like levels
    marrow_variation: float = 0.0
    #: in-bone mimics per patient (healed/healing fractures, treated sclerotic foci), uniform in
    #: [low, high]; never in GT
    bone_mimics: tuple[int, int] = (0, 0)

    @property
    def features(self) -> tuple[str, ...]:
        """The features switched on, in :data:`DIFFICULTY_FEATURES` order."""
        on = {"low_contrast": self.low_contrast_fraction > 0, "marrow": self.marrow_variation > 0,
              "bone_mimics": self.bone_mimics[1] > 0}
        return tuple(f for f in DIFFICULTY_FEATURES if on[f])

    def only(self, features: tuple[str, ...] | list[str]) -> Difficulty:
        """This difficulty with every feature not in ``features`` switched off."""
        unknown = sorted(set(features) - set(DIFFICULTY_FEATURES))
        if unknown:
            raise SapError(f"--difficulty {','.join(unknown)}: unknown feature; choose from {', '.join(DIFFICULTY_FEATURES)} or none")
        off = Difficulty()
        return replace(
            self,
            low_contrast_fraction=self.low_contrast_fraction if "low_contrast" in features else off.low_contrast_fraction,
            marrow_variation=self.marrow_variation if "marrow" in features else off.marrow_variation,
            bone_mimics=self.bone_mimics if "bone_mimics" in features else off.bone_mimics,
        )

    def record(self) -> dict:
        """What cohort.json records."""
        return {"features": list(self.features), "low_contrast_fraction": self.low_contrast_fraction,
                "low_contrast_range": list(self.low_contrast_range), "marrow_variation": self.marrow_variation,
                "bone_mimics": list(self.bone_mimics)}


#: the study-cpu cohort's difficulty (issue 15), set on cohort seed 1 before the study: without it a
#: model from scratch finds every large lesion below 1 false positive per exam (docs/cohort.md)
STUDY_DIFFICULTY = Difficulty(low_contrast_fraction=0.5, marrow_variation=1.0, bone_mimics=(1, 3))


@dataclass(frozen=True)
class Preset:
    """What one preset builds. ``grid`` and ``spacing`` are in canonical array order (RAS+)."""

    name: str
    grid: tuple[int, int, int]
    spacing: tuple[float, float, float]  #: mm
    scans_per_subject: tuple[int, ...]  #: healthy cohort: one entry per subject
    n_patients: int
    n_lesion_free: int
    max_lesions: int  #: upper end of the high-burden group
    #: lesion and mimic volumes are the study's distribution times this factor (1 = the paper's
    #: median 0.5 mL); a coarse grid needs larger lesions to span learnable voxel counts
    lesion_volume_scale: float = 1.0
    difficulty: Difficulty = field(default_factory=Difficulty)

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or min(self.grid) < 8 or len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise SapError(f"preset {self.name}: grid must be three sizes >= 8 and spacing three positive mm values")
        if not self.lesion_volume_scale > 0:
            raise SapError(f"preset {self.name}: lesion_volume_scale must be positive")
        if not 0 <= self.n_lesion_free <= self.n_patients or min(self.scans_per_subject, default=1) < 1:
            raise SapError(f"preset {self.name}: needs 0 <= lesion-free <= patients and >= 1 scan per subject")

    @property
    def n_healthy(self) -> int:
        return sum(self.scans_per_subject)

    def describe(self) -> str:
        scaled = f", lesion volumes x{self.lesion_volume_scale:g}" if self.lesion_volume_scale != 1 else ""
        if self.difficulty.features:
            scaled += f", difficulty: {'+'.join(self.difficulty.features)}"
        return (
            f"{self.name}: {self.n_healthy} healthy scans from {len(self.scans_per_subject)} subjects, "
            f"{self.n_patients} patients ({self.n_lesion_free} lesion-free), grid "
            f"{'x'.join(map(str, self.grid))} at {'x'.join(f'{s:g}' for s in self.spacing)} mm{scaled}"
        )


PRESETS: dict[str, Preset] = {
    # tests: seconds to build; same voxel size and lesion scale as demo, so lesions behave the same
    "tiny": Preset("tiny", (64, 64, 128), (5.5, 4.0, 5.5), (2, 2), 6, 1, 14, lesion_volume_scale=8.0),
    # the demo: neck to thighs, all nine regions in every exam. At 0.121 mL a voxel the study's
    # lesions (median 0.5 mL) would be 4 voxels; x8 gives a median of ~33 voxels, the order of
    # the paper's lesions at 2 mm (0.5 mL = 62 voxels), and about a quarter >= 8 mL
    "demo": Preset("demo", (64, 64, 128), (5.5, 4.0, 5.5), (2, 2, 2), 9, 1, 25, lesion_volume_scale=8.0),
    # the CPU study (issue 15): the demo's grid and lesion scale, the paper's patient count, and
    # the difficulty features on, so the study measures more than a bright-spot detector
    "study-cpu": Preset("study-cpu", (64, 64, 128), (5.5, 4.0, 5.5), (2,) * 6, 40, 3, 25,
                        lesion_volume_scale=8.0, difficulty=STUDY_DIFFICULTY),
    # paper scale: 71 healthy scans of 24 subjects, 40 patients, 2 mm
    "paper": Preset("paper", (176, 128, 352), (2.0, 2.0, 2.0), (3,) * 23 + (2,), 40, 3, 40),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SapError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
