"""Patch samplers over memory-mapped cases (SPEC §6, §7).

Three samplers share one shape: an epoch is a list of :class:`PatchRequest` (which case, which kind
of patch), drawn from ``numpy.random.default_rng([seed, epoch])`` so it is the same on every rank and
after a restart; a request becomes a concrete patch position (:meth:`PatchSampler.resolve`) with its
own generator seeded by ``(seed, epoch, request.index)``, so the result does not depend on which
process or DataLoader worker reads it, nor on the order of reading.

- :class:`InstanceBalancedSampler` (fine-tuning, paper ref. 33): every epoch holds exactly one
  positive patch per lesion instance, placed at a random offset that keeps the whole lesion inside
  the patch (a lesion wider than the patch: centred on one of its voxels, drawn uniformly), plus
  ``round(neg_ratio × positives)`` negatives: patches centred on body voxels that contain no lesion
  voxel, spread evenly over the cases (lesion-free exams included). Small and large lesions are seen
  equally often.
- :class:`PosNegSampler` (the ablation, MONAI ``RandCropByPosNegLabeld`` style): a patch is centred
  on a lesion voxel with probability ``1 / (1 + neg_ratio)``, drawn uniformly over all lesion voxels
  of the case (so large lesions dominate), otherwise on a body voxel outside the lesions (the patch
  may still touch a lesion).
- :class:`ClassBalancedSampler` (skeletal pretraining): pick a class uniformly among the labels
  present in the case (background included unless ``include_background=False``), then centre the
  patch on a voxel of that class drawn uniformly. Give each case a ``label_map`` (the skeleton,
  values 0-9) when building :class:`SamplingCase`; the patch's label is that label map.

Distributed training: ``world_size`` ranks split each epoch without duplicates
(``plan[rank::world_size]``); the epoch is padded (extra negatives, or extra draws) to a multiple of
``world_size × batch_size`` so every rank runs the same number of full batches. The reference code
of the paper gives every rank all positives; here each lesion is seen exactly once per epoch in total.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sap.errors import SapError
from sap.sampling.index import CaseIndex, build_case_index
from sap.sampling.patches import read_patch, start_around, start_bounds

POSITIVE = "pos"
NEGATIVE = "neg"
CLASS = "cls"

#: rejection draws per batch and batches before falling back to an exhaustive search of the box
_DRAWS_PER_BATCH = 32
_REJECTION_BATCHES = 4


@dataclass
class SamplingCase:
    """One case as the samplers see it: arrays (typically memory-mapped) plus its index.

    Attributes:
        case_id: identifier (error messages, bookkeeping).
        image: ``(C, X, Y, Z)`` float array (normalised channels).
        lesions: ``(X, Y, Z)`` binary lesion mask, or None (a lesion-free exam).
        body: ``(X, Y, Z)`` body mask, or None (every voxel counts as body).
        label_map: ``(X, Y, Z)`` integer labels for :class:`ClassBalancedSampler` (skeleton), or None.
        index: the precomputed :class:`CaseIndex`; built on first use when None.
    """

    case_id: str
    image: np.ndarray
    lesions: np.ndarray | None = None
    body: np.ndarray | None = None
    label_map: np.ndarray | None = None
    index: CaseIndex | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise SapError(f"case {self.case_id}: image must be (C, X, Y, Z), got shape {self.image.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])

    def get_index(self, connectivity: int = 26) -> CaseIndex:
        if self.index is None:
            self.index = build_case_index(
                self.case_id, self.shape, self.lesions, self.body, self.label_map, connectivity=connectivity
            )
        return self.index

    @classmethod
    def from_cached(
        cls, cached: Any, label_map: str | None = None, index_path: str | Path | None | bool = True
    ) -> SamplingCase:
        """Wrap a cached case (``sap.data.cache.load_cached``: ``image``, ``lesions``, ``body`` …).

        Args:
            cached: object with attributes ``case_id``, ``image``, ``lesions``, ``body``, ``path``
                (the cache entry folder) and, for ``label_map="skeleton"``, ``skeleton``.
            label_map: name of the attribute holding a label map for class-balanced sampling.
            index_path: where the sampling index is stored (built and saved there when missing);
                True = inside the cache entry (``cached.path``); None/False = keep it in memory.
        """
        case = cls(
            case_id=str(cached.case_id),
            image=cached.image,
            lesions=getattr(cached, "lesions", None),
            body=getattr(cached, "body", None),
            label_map=getattr(cached, label_map) if label_map else None,
        )
        if index_path is True:
            folder = getattr(cached, "path", None)
            suffix = f"-{label_map}" if label_map else ""
            index_path = Path(folder) / f"sampling_index{suffix}.npz" if folder else None
        if index_path:
            index_path = Path(index_path)
            if index_path.is_file():
                try:
                    index = CaseIndex.load(index_path)
                    case.index = index if index.shape == case.shape else None
                except SapError:  # stale or damaged: rebuilt below
                    case.index = None
            if case.index is None:
                try:
                    case.get_index().save(index_path)
                except OSError:  # read-only cache: keep the index in memory
                    pass
        return case


class PatchRequest(NamedTuple):
    """One entry of an epoch: position ``index`` in the epoch's plan, the case, and what to draw."""

    index: int
    case: int
    kind: str  #: "pos", "neg" or "cls"
    target: int  #: lesion number for "pos", label value for "cls", -1 otherwise


class Patch(NamedTuple):
    """A resolved request: the patch box ``[start, start + size)`` in the case's voxel grid."""

    request: PatchRequest
    start: np.ndarray


def _random_voxel(
    rng: np.random.Generator,
    box: np.ndarray,
    accept: Callable[[np.ndarray], np.ndarray] | None,
    crop_accept: Callable[[tuple[slice, ...]], np.ndarray] | None = None,
) -> np.ndarray | None:
    """A voxel drawn uniformly among the voxels of ``box`` that ``accept`` keeps, or None if none.

    Rejection sampling on a few batches of candidates (memory-mapped reads of single voxels), then
    an exhaustive search of the box (``crop_accept`` gives the boolean mask of a crop) so even a
    sparse class is found. Both stages are uniform over the accepted voxels.
    """
    lo, hi = box[:3], box[3:]
    if accept is None:
        return rng.integers(lo, hi)
    for _ in range(_REJECTION_BATCHES):
        candidates = rng.integers(lo, hi, size=(_DRAWS_PER_BATCH, 3))
        hits = np.flatnonzero(accept(candidates))
        if hits.size:
            return candidates[hits[0]]
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    mask = crop_accept(crop) if crop_accept is not None else None
    if mask is None:
        return None
    found = np.flatnonzero(mask)
    if found.size == 0:
        return None
    return np.array(np.unravel_index(found[rng.integers(found.size)], mask.shape), np.int64) + lo


class PatchSampler:
    """Shared machinery: epochs, padding, sharding and reading (see the module docstring)."""

    def __init__(
        self,
        cases: Sequence[SamplingCase],
        patch_size: Sequence[int],
        seed: int = 42,
        batch_size: int = 1,
        world_size: int = 1,
        connectivity: int = 26,
    ) -> None:
        if not cases:
            raise SapError("patch sampler: no training cases")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise SapError(f"patch sampler: patch size {list(patch_size)} must be three positive sizes")
        if batch_size < 1 or world_size < 1:
            raise SapError("patch sampler: batch_size and world_size must be at least 1")
        self.cases = list(cases)
        self.patch_size = np.asarray(patch_size, np.int64)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.indices = [case.get_index(connectivity) for case in self.cases]

    # ----------------------------------------------------------------------------- epoch plan
    def _draw(self, rng: np.random.Generator) -> list[tuple[int, str, int]]:
        """The epoch's (case, kind, target) entries before padding and shuffling."""
        raise NotImplementedError

    def _pad(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        """``count`` extra entries that fill the last batch of every rank."""
        raise NotImplementedError

    def plan(self, epoch: int) -> list[PatchRequest]:
        """The whole epoch (all ranks), shuffled, padded to a multiple of ``world_size × batch_size``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        entries = self._draw(rng)
        multiple = self.world_size * self.batch_size
        missing = -len(entries) % multiple
        if missing:
            entries = entries + self._pad(rng, missing)
        order = rng.permutation(len(entries))
        return [PatchRequest(i, *entries[j]) for i, j in enumerate(order)]

    def shard(self, epoch: int, rank: int = 0) -> list[PatchRequest]:
        """The requests of one rank for ``epoch``: disjoint across ranks, equal in length."""
        if not 0 <= rank < self.world_size:
            raise SapError(f"patch sampler: rank {rank} outside world size {self.world_size}")
        return self.plan(epoch)[rank :: self.world_size]

    def epoch_length(self, epoch: int = 0) -> int:
        """Patches per rank in ``epoch``."""
        return len(self.plan(epoch)) // self.world_size

    def _spread_cases(
        self, rng: np.random.Generator, count: int, among: Sequence[int] | None = None
    ) -> list[int]:
        """``count`` case numbers spread evenly: a fresh random order of the cases, repeated."""
        pool = np.arange(len(self.cases)) if among is None else np.asarray(among)
        out: list[int] = []
        while len(out) < count:
            out.extend(int(c) for c in rng.permutation(pool))
        return out[:count]

    # ----------------------------------------------------------------------------- patches
    def resolve(self, request: PatchRequest, epoch: int) -> Patch:
        """Place ``request``: deterministic for (seed, epoch, request.index)."""
        rng = np.random.default_rng([self.seed, int(epoch), int(request.index), 1])
        case_no, start = self._place(rng, request)
        if case_no != request.case:  # a negative that had to come from another case
            request = request._replace(case=case_no)
        return Patch(request, np.asarray(start, np.int64))

    def _place(self, rng: np.random.Generator, request: PatchRequest) -> tuple[int, np.ndarray]:
        """(case number, patch start) of a request."""
        raise NotImplementedError

    #: labels are binary lesion masks (False: class values of a label map)
    binary_labels = True

    def label_source(self, case: SamplingCase) -> np.ndarray | None:
        """The array whose patch is the training label."""
        return case.lesions

    def read(self, patch: Patch) -> tuple[np.ndarray, np.ndarray]:
        """``(image (C, *size) float32, label (*size) uint8)`` of a resolved patch, zero-padded."""
        images, labels = self.read_batch([patch])
        return images[0], labels[0]

    def read_batch(self, patches: Sequence[Patch]) -> tuple[np.ndarray, np.ndarray]:
        """``(images (B, C, *size) float32, labels (B, *size) uint8)``: each patch is copied once,
        straight from the (memory-mapped) case arrays into the batch arrays."""
        size = self.patch_size.tolist()
        channels = self.cases[patches[0].request.case].image.shape[0] if patches else 0
        images = np.empty((len(patches), channels, *size), np.float32)
        labels = np.zeros((len(patches), *size), np.uint8)
        for slot, patch in enumerate(patches):
            case = self.cases[patch.request.case]
            if case.image.shape[0] != channels:
                raise SapError(f"case {case.case_id}: {case.image.shape[0]} channels, expected {channels}")
            read_patch(case.image, patch.start, self.patch_size, out=images[slot])
            source = self.label_source(case)
            if source is None:
                continue
            if source.dtype == np.uint8:
                read_patch(source, patch.start, self.patch_size, out=labels[slot])
                if self.binary_labels:
                    np.minimum(labels[slot], 1, out=labels[slot])
            else:
                raw = read_patch(source, patch.start, self.patch_size)
                labels[slot] = (raw != 0) if self.binary_labels else raw.astype(np.uint8)
        return images, labels

    def sample(self, request: PatchRequest, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`resolve` then :meth:`read`."""
        return self.read(self.resolve(request, epoch))

    # ----------------------------------------------------------------------------- helpers
    def _body_voxels(
        self, rng: np.random.Generator, case_no: int, count: int, exclude_lesions: bool = False
    ) -> np.ndarray:
        """Up to ``count`` voxels ``(n, 3)``, each uniform over the case's body (optionally outside
        every lesion); fewer (possibly none) when a batch of rejection draws finds fewer."""
        case, index = self.cases[case_no], self.indices[case_no]
        body = case.body if index.has_body_mask else None
        lesions = case.lesions if exclude_lesions and index.n_lesions else None
        lo, hi = index.body_bbox[:3], index.body_bbox[3:]
        if body is None and lesions is None:
            return rng.integers(lo, hi, size=(count, 3))
        found: list[np.ndarray] = []
        n_found = 0
        for _ in range(_REJECTION_BATCHES):
            candidates = rng.integers(lo, hi, size=(max(count, _DRAWS_PER_BATCH), 3))
            ix = (candidates[:, 0], candidates[:, 1], candidates[:, 2])
            ok = np.ones(len(candidates), bool)
            if body is not None:
                ok &= np.asarray(body[ix]) != 0
            if lesions is not None:
                ok &= np.asarray(lesions[ix]) == 0
            found.append(candidates[ok])
            n_found += int(ok.sum())
            if n_found >= count:
                break
        if n_found == 0:  # a sparse body: one exhaustive draw
            single = self._body_voxel(rng, case_no, exclude_lesions)
            return np.zeros((0, 3), np.int64) if single is None else single[None]
        return np.concatenate(found)[:count]

    def _body_voxel(
        self, rng: np.random.Generator, case_no: int, exclude_lesions: bool = False
    ) -> np.ndarray | None:
        """A voxel drawn uniformly from the case's body (optionally outside every lesion)."""
        case, index = self.cases[case_no], self.indices[case_no]
        body = case.body if index.has_body_mask else None
        lesions = case.lesions if exclude_lesions and index.n_lesions else None
        if body is None and lesions is None:
            return rng.integers(index.body_bbox[:3], index.body_bbox[3:])

        def accept(points: np.ndarray) -> np.ndarray:
            ok = np.ones(len(points), bool)
            ix = (points[:, 0], points[:, 1], points[:, 2])
            if body is not None:
                ok &= np.asarray(body[ix]) != 0
            if lesions is not None:
                ok &= np.asarray(lesions[ix]) == 0
            return ok

        def crop_accept(crop: tuple[slice, ...]) -> np.ndarray:
            ok = np.ones(tuple(s.stop - s.start for s in crop), bool)
            if body is not None:
                ok &= np.asarray(body[crop]) != 0
            if lesions is not None:
                ok &= np.asarray(lesions[crop]) == 0
            return ok

        return _random_voxel(rng, index.body_bbox, accept, crop_accept)


class InstanceBalancedSampler(PatchSampler):
    """One positive patch per lesion instance per epoch, plus ``neg_ratio ×`` lesion-free negatives.

    See the module docstring. ``max_tries`` bounds the centre draws per case when looking for a
    lesion-free patch; a case where none is found hands the negative to the other cases in turn.
    Cases where ``max_tries`` trial draws at start-up find no lesion-free patch at all (heavy
    burden, patch as large as the body) get no negatives assigned (:attr:`roomy_cases`).
    When no case has room for a lesion-free patch (small volumes, large patches, many lesions),
    the draw with the fewest lesion voxels is used, with a warning; its label is still exact.
    """

    def __init__(
        self,
        cases: Sequence[SamplingCase],
        patch_size: Sequence[int],
        neg_ratio: float = 1.0,
        seed: int = 42,
        batch_size: int = 1,
        world_size: int = 1,
        connectivity: int = 26,
        max_tries: int = 64,
    ) -> None:
        super().__init__(cases, patch_size, seed, batch_size, world_size, connectivity)
        if neg_ratio < 0:
            raise SapError(f"instance sampler: neg_ratio {neg_ratio} must be >= 0")
        self.neg_ratio = float(neg_ratio)
        self.max_tries = int(max_tries)
        self.lesions = [
            (c, lesion) for c, index in enumerate(self.indices) for lesion in range(index.n_lesions)
        ]
        if not self.lesions:
            raise SapError("instance sampler: the training cases hold no lesion")
        self.roomy_cases = self._find_roomy_cases()

    def _find_roomy_cases(self) -> list[int]:
        """Cases where a lesion-free patch was found among ``max_tries`` trial draws.

        Negatives are spread over these cases only, so heavy-burden exams where the patch cannot
        avoid every lesion do not cost failed searches each epoch (all cases when none is roomy).
        The trial draws use their own generator (seeded by ``seed``): deterministic, epoch-free.
        """
        size = self.patch_size
        roomy = []
        for case_no, index in enumerate(self.indices):
            if index.n_lesions == 0:
                roomy.append(case_no)
                continue
            rng = np.random.default_rng([self.seed, 0x5A9, case_no])
            centres = self._body_voxels(rng, case_no, self.max_tries)
            low, high = start_bounds(index.shape, size)
            starts = np.clip(centres - size // 2, low, high)
            if index.first_lesion_free_box(starts, size) is not None:
                roomy.append(case_no)
        return roomy or list(range(len(self.cases)))

    @property
    def n_positives(self) -> int:
        return len(self.lesions)

    @property
    def n_negatives(self) -> int:
        """Negatives per epoch before padding: ``round(neg_ratio × positives)``."""
        return int(round(self.neg_ratio * self.n_positives))

    def _draw(self, rng: np.random.Generator) -> list[tuple[int, str, int]]:
        positives = [(c, POSITIVE, lesion) for c, lesion in self.lesions]
        return positives + self._pad(rng, self.n_negatives)

    def _pad(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        return [(c, NEGATIVE, -1) for c in self._spread_cases(rng, count, among=self.roomy_cases)]

    def _place(self, rng: np.random.Generator, request: PatchRequest) -> tuple[int, np.ndarray]:
        index = self.indices[request.case]
        size = self.patch_size
        if request.kind == POSITIVE:
            box = index.lesion_bboxes[request.target]
            lo, hi = box[:3], box[3:]
            if np.any(hi - lo > size):
                voxels = index.lesion_voxels(request.target)
                return request.case, start_around(voxels[rng.integers(len(voxels))], index.shape, size)
            low, high = start_bounds(index.shape, size)
            # Every start in [a, b] keeps the lesion inside the patch and the patch on the volume.
            a = np.maximum(hi - size, low)
            b = np.minimum(lo, high)
            return request.case, rng.integers(a, b + 1)
        # Negative: the assigned case first, then the other roomy cases in a random order.
        # Candidate centres are uniform body voxels; the first whose patch is lesion-free wins, so
        # the centre is uniform over the body voxels that admit a lesion-free patch.
        others = [int(c) for c in rng.permutation(self.roomy_cases) if c != request.case]
        for case_no in [request.case, *others]:
            index = self.indices[case_no]
            low, high = start_bounds(index.shape, size)
            tried = 0
            while tried < self.max_tries:
                centres = self._body_voxels(rng, case_no, min(_DRAWS_PER_BATCH, self.max_tries - tried))
                if len(centres) == 0:
                    break
                tried += len(centres)
                starts = np.clip(centres - size // 2, low, high)
                row = index.first_lesion_free_box(starts, size)
                if row is not None:
                    return case_no, starts[row]
        # Lesions everywhere (small volumes, large patches): the least-lesion patch of a batch of
        # candidates in the assigned case, labelled correctly.
        index = self.indices[request.case]
        low, high = start_bounds(index.shape, size)
        centres = self._body_voxels(rng, request.case, _DRAWS_PER_BATCH)
        if len(centres) == 0:
            raise SapError(f"instance sampler: case {self.cases[request.case].case_id} has no body voxel")
        starts = np.clip(centres - size // 2, low, high)
        touched = [index.lesion_voxels_in_box(start, size) for start in starts]
        least = int(np.argmin(touched))
        warnings.warn(
            f"instance sampler: no lesion-free patch of size {size.tolist()} found in any training case; "
            f"a negative patch holds {touched[least]} lesion voxels",
            RuntimeWarning,
            stacklevel=2,
        )
        return request.case, starts[least]


class PosNegSampler(PatchSampler):
    """Voxel-uniform positive/negative centres (the ``sampler: posneg`` ablation, MONAI style).

    Args:
        neg_ratio: negatives per positive (MONAI ``pos=1, neg=neg_ratio``).
        patches_per_epoch: patches per epoch (all ranks, before padding); default the instance
            sampler's ``n_lesions × (1 + neg_ratio)`` so both see the same number of patches.
    """

    def __init__(
        self,
        cases: Sequence[SamplingCase],
        patch_size: Sequence[int],
        neg_ratio: float = 1.0,
        seed: int = 42,
        batch_size: int = 1,
        world_size: int = 1,
        connectivity: int = 26,
        patches_per_epoch: int | None = None,
    ) -> None:
        super().__init__(cases, patch_size, seed, batch_size, world_size, connectivity)
        if neg_ratio < 0:
            raise SapError(f"posneg sampler: neg_ratio {neg_ratio} must be >= 0")
        self.neg_ratio = float(neg_ratio)
        n_lesions = sum(index.n_lesions for index in self.indices)
        if patches_per_epoch is None:
            patches_per_epoch = max(1, int(round(n_lesions * (1 + self.neg_ratio))))
        self.patches_per_epoch = int(patches_per_epoch)

    def _entries(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        p_pos = 1.0 / (1.0 + self.neg_ratio)
        out = []
        for case_no in self._spread_cases(rng, count):
            positive = rng.random() < p_pos and self.indices[case_no].n_lesions > 0
            out.append((case_no, POSITIVE if positive else NEGATIVE, -1))
        return out

    def _draw(self, rng: np.random.Generator) -> list[tuple[int, str, int]]:
        return self._entries(rng, self.patches_per_epoch)

    def _pad(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        return self._entries(rng, count)

    def _place(self, rng: np.random.Generator, request: PatchRequest) -> tuple[int, np.ndarray]:
        index = self.indices[request.case]
        if request.kind == POSITIVE:
            centre = index.lesion_coords[rng.integers(len(index.lesion_coords))]
        else:
            centre = self._body_voxel(rng, request.case, exclude_lesions=True)
            if centre is None:  # no background voxel in the body: any voxel
                centre = rng.integers(0, index.shape)
        return request.case, start_around(centre, index.shape, self.patch_size)


class ClassBalancedSampler(PatchSampler):
    """Skeletal pretraining patches: a class uniformly among those present, then one of its voxels.

    Each :class:`SamplingCase` needs a ``label_map`` (skeleton labels 0-9); the label patch returned
    by :meth:`read` is that label map (uint8 class values), not a binary mask.

    Args:
        patches_per_epoch: patches per epoch (all ranks, before padding); default one per case.
        include_background: whether background (label 0) is one of the classes drawn.
    """

    def __init__(
        self,
        cases: Sequence[SamplingCase],
        patch_size: Sequence[int],
        seed: int = 42,
        batch_size: int = 1,
        world_size: int = 1,
        patches_per_epoch: int | None = None,
        include_background: bool = True,
    ) -> None:
        for case in cases:
            if case.label_map is None:
                raise SapError(f"class-balanced sampler: case {case.case_id} has no label map (skeleton)")
        super().__init__(cases, patch_size, seed, batch_size, world_size)
        self.include_background = include_background
        self.patches_per_epoch = int(patches_per_epoch or len(self.cases))
        for case, index in zip(self.cases, self.indices, strict=True):
            if len(self._classes(index)) == 0:
                raise SapError(f"class-balanced sampler: case {case.case_id} holds no foreground class")

    def _classes(self, index: CaseIndex) -> np.ndarray:
        return index.classes if self.include_background else index.classes[index.classes != 0]

    def _entries(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        out = []
        for case_no in self._spread_cases(rng, count):
            classes = self._classes(self.indices[case_no])
            out.append((case_no, CLASS, int(classes[rng.integers(len(classes))])))
        return out

    def _draw(self, rng: np.random.Generator) -> list[tuple[int, str, int]]:
        return self._entries(rng, self.patches_per_epoch)

    def _pad(self, rng: np.random.Generator, count: int) -> list[tuple[int, str, int]]:
        return self._entries(rng, count)

    binary_labels = False

    def label_source(self, case: SamplingCase) -> np.ndarray | None:
        return case.label_map

    def _place(self, rng: np.random.Generator, request: PatchRequest) -> tuple[int, np.ndarray]:
        case, index = self.cases[request.case], self.indices[request.case]
        labels = case.label_map
        value = request.target
        row = int(np.flatnonzero(index.classes == value)[0])
        box = index.class_bboxes[row]

        def accept(points: np.ndarray) -> np.ndarray:
            return np.asarray(labels[points[:, 0], points[:, 1], points[:, 2]]) == value

        def crop_accept(crop: tuple[slice, ...]) -> np.ndarray:
            return np.asarray(labels[crop]) == value

        centre = _random_voxel(rng, box, accept, crop_accept)
        if centre is None:  # background outside the body box only: anywhere in the volume
            whole = np.array([0, 0, 0, *index.shape], np.int64)
            centre = _random_voxel(rng, whole, accept, crop_accept)
        return request.case, start_around(centre, index.shape, self.patch_size)


def build_sampler(
    kind: str,
    cases: Sequence[SamplingCase],
    patch_size: Sequence[int],
    neg_ratio: float = 1.0,
    seed: int = 42,
    batch_size: int = 1,
    world_size: int = 1,
) -> PatchSampler:
    """The fine-tuning sampler named by ``finetune.sampler`` (``instance`` or ``posneg``)."""
    if kind == "instance":
        return InstanceBalancedSampler(cases, patch_size, neg_ratio, seed, batch_size, world_size)
    if kind == "posneg":
        return PosNegSampler(cases, patch_size, neg_ratio, seed, batch_size, world_size)
    raise SapError(f"unknown sampler {kind!r}; choose instance or posneg")


@dataclass
class EpochCursor:
    """Where a rank is in the stream of epochs: resumable mid-epoch (state = epoch + position).

    ``position`` counts the requests of the rank's shard already handed out in ``epoch``.
    """

    epoch: int = 0
    position: int = 0

    def remaining(self, sampler: PatchSampler, rank: int = 0) -> list[PatchRequest]:
        """The requests of the current epoch not yet handed out (rolls over to the next epoch)."""
        shard = sampler.shard(self.epoch, rank)
        if self.position >= len(shard):
            self.epoch, self.position = self.epoch + 1, 0
            shard = sampler.shard(self.epoch, rank)
        return shard[self.position :]

    def advance(self, count: int) -> None:
        self.position += int(count)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def lesion_size_bins(volumes_ml: np.ndarray, edges_ml: Sequence[float] = (0.1, 0.5, 1.0, 5.0)) -> np.ndarray:
    """Bin number of each lesion volume (``numpy.digitize`` with the given edges, mL)."""
    return np.digitize(np.asarray(volumes_ml, float), np.asarray(edges_ml, float))
