"""The procedural whole-body phantom: body outline, organs and a labelled skeleton, neck to thighs.

Everything is built from ellipsoids, tapered tubes and superellipse cross-sections on a voxel grid
(see :mod:`sap.data.synth.shapes`), with adult proportions scaled per subject. Body coordinates are
millimetres in RAS+ directions (x → patient Right, y → Anterior, z → Superior) with the origin at the
midline, trunk centre, at the height of the hip joints.

Two label arrays come out, both in canonical array order:

* ``tissue`` (uint8, :data:`TISSUES`): what the intensity models render;
* ``bone`` (uint8): 1–9 the SAP skeleton regions, :data:`RIB` for ribs (skeleton background, lesion
  site "rib/other") and :data:`OTHER_BONE` for forearm bones (background, no lesions).

Subjects vary in size, build, spine curvature, arm pose and organ placement
(:class:`SubjectParams`); exams of one subject vary by a small shift, breathing and arm pose
(:class:`ExamPose`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sap.data.synth.shapes import Canvas, ellipsoid, paint, rotation, tube

#: tissue class → name (index = value in the ``tissue`` array)
TISSUES: tuple[str, ...] = (
    "air", "fat", "muscle", "lung", "liver", "spleen", "kidney", "bladder", "bowel", "blood",
    "marrow", "cortex", "csf", "disc", "visceral_fat",
)
T = {name: i for i, name in enumerate(TISSUES)}
RIB = 10
OTHER_BONE = 11

#: body-frame height (mm at scale 1) of the top of the field of view: mid cervical spine (C2/C3)
FOV_TOP_MM = 690.0


@dataclass(frozen=True)
class SubjectParams:
    """Per-subject anatomy: stays the same across a subject's exams."""

    scale: float = 0.85  #: overall size (1 = a tall adult)
    build: float = 1.0  #: trunk girth factor (BMI-like)
    fat_mm: float = 18.0  #: subcutaneous fat thickness at scale 1
    lordosis_mm: float = 10.0
    kyphosis_mm: float = 16.0
    pelvis_width: float = 1.0
    shoulder_width: float = 1.0
    kidney_drop_mm: float = 12.0  #: right kidney sits lower than the left
    liver_size: float = 1.0
    spleen_size: float = 1.0
    bowel_seed: int = 0  #: places the bowel loops

    @staticmethod
    def sample(rng: np.random.Generator) -> SubjectParams:
        return SubjectParams(
            scale=float(rng.uniform(0.80, 0.90)),
            build=float(rng.uniform(0.92, 1.15)),
            fat_mm=float(rng.uniform(10.0, 28.0)),
            lordosis_mm=float(rng.uniform(5.0, 16.0)),
            kyphosis_mm=float(rng.uniform(10.0, 24.0)),
            pelvis_width=float(rng.uniform(0.93, 1.08)),
            shoulder_width=float(rng.uniform(0.95, 1.05)),
            kidney_drop_mm=float(rng.uniform(5.0, 20.0)),
            liver_size=float(rng.uniform(0.9, 1.1)),
            spleen_size=float(rng.uniform(0.8, 1.25)),
            bowel_seed=int(rng.integers(0, 2**31 - 1)),
        )


@dataclass(frozen=True)
class ExamPose:
    """Per-exam variation of one subject: table position, breathing, arm pose."""

    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    breath_mm: float = 0.0  #: diaphragm, liver and spleen move down on inspiration
    arm_abduction: float = 0.0  #: extra lateral offset of the elbows, mm
    curvature_mm: tuple[float, float] = (0.0, 0.0)  #: lordosis, kyphosis change from lying differently

    @staticmethod
    def sample(rng: np.random.Generator) -> ExamPose:
        return ExamPose(
            shift_mm=tuple(float(v) for v in rng.uniform(-6.0, 6.0, size=3)),  # type: ignore[arg-type]
            breath_mm=float(rng.uniform(-8.0, 8.0)),
            arm_abduction=float(rng.uniform(-4.0, 6.0)),
            curvature_mm=tuple(float(v) for v in rng.uniform(-2.5, 2.5, size=2)),  # type: ignore[arg-type]
        )


@dataclass
class Phantom:
    """Label arrays of one exam (canonical RAS+ order) and the canvas they live on."""

    canvas: Canvas
    tissue: np.ndarray  #: uint8, :data:`TISSUES`
    bone: np.ndarray  #: uint8, 0 none, 1–9 skeleton regions, RIB, OTHER_BONE
    cortex: np.ndarray  #: bool, the outer voxel rim of every bone (stands for the cortex)

    @property
    def skeleton(self) -> np.ndarray:
        """SAP skeleton labels 0–9 (ribs and other bone are background)."""
        return np.where(self.bone <= 9, self.bone, 0).astype(np.uint8)


@dataclass(frozen=True)
class Vertebra:
    name: str
    region: int
    z: float  #: body centre height, mm
    y: float  #: body centre, anterior-posterior, mm
    height: float
    width: float
    depth: float


def canvas_for(shape: tuple[int, int, int], spacing: tuple[float, float, float], subject: SubjectParams, pose: ExamPose) -> Canvas:
    """Place the field of view: centred left-right and front-back, top at the mid cervical spine."""
    s = subject.scale
    extent = [(n - 1) * d for n, d in zip(shape, spacing, strict=True)]
    top = FOV_TOP_MM * s
    origin = (
        -extent[0] / 2 - pose.shift_mm[0],
        -extent[1] / 2 - pose.shift_mm[1],
        top - extent[2] - pose.shift_mm[2],
    )
    return Canvas(shape=shape, spacing=spacing, origin=origin)


def spine_y(z: np.ndarray | float, subject: SubjectParams) -> np.ndarray | float:
    """Anterior-posterior position of the vertebral body centres at height ``z`` (mm, scale 1)."""
    z = np.asarray(z, dtype=float)
    lordosis = subject.lordosis_mm * np.exp(-(((z - 190.0) / 75.0) ** 2))
    kyphosis = -subject.kyphosis_mm * np.exp(-(((z - 440.0) / 110.0) ** 2))
    cervical = 0.6 * subject.lordosis_mm * np.exp(-(((z - 640.0) / 45.0) ** 2))
    return -30.0 + lordosis + kyphosis + cervical


def vertebrae(subject: SubjectParams) -> list[Vertebra]:
    """The 24 presacral vertebrae, stacked from the sacrum up (scale-1 millimetres)."""
    levels = (
        [(f"L{i}", 3, 27.0, 48.0, 34.0, 10.0) for i in range(5, 0, -1)]
        + [(f"T{i}", 2, 16.0 + 8.0 * (i - 1) / 11, 30.0 + 14.0 * (i - 1) / 11, 22.0 + 10.0 * (i - 1) / 11, 6.0) for i in range(12, 0, -1)]
        + [(f"C{i}", 1, 13.0, 24.0, 17.0, 5.0) for i in range(7, 0, -1)]
    )
    out = []
    z = 112.0  # upper endplate of S1
    for name, region, height, width, depth, disc in levels:
        z += disc
        centre = z + height / 2
        out.append(Vertebra(name, region, centre, float(spine_y(centre, subject)), height, width, depth))
        z += height
    return out


def build_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    subject: SubjectParams,
    pose: ExamPose,
) -> Phantom:
    """Build the tissue and bone label arrays of one exam.

    ``shape``/``spacing`` are canonical (array axis order, mm). Vectorised: every structure is
    evaluated on its own bounding box.
    """
    canvas = canvas_for(shape, spacing, subject, pose)
    # the spine bends a little differently in every exam (a small, smooth deformation)
    subject = dataclasses.replace(
        subject,
        lordosis_mm=subject.lordosis_mm + pose.curvature_mm[0],
        kyphosis_mm=subject.kyphosis_mm + pose.curvature_mm[1],
    )
    tissue = np.zeros(shape, dtype=np.uint8)
    bone = np.zeros(shape, dtype=np.uint8)

    _body(canvas, tissue, subject, pose)
    _organs(canvas, tissue, subject, pose)
    verts = vertebrae(subject)
    _spine(canvas, tissue, bone, verts, subject.scale)
    _ribs(canvas, bone, verts, subject)
    _pelvis_and_femurs(canvas, bone, subject)
    _shoulders_and_arms(canvas, bone, subject, pose)

    bone_mask = bone > 0
    tissue[bone_mask] = T["marrow"]
    # The cortex is thinner than a voxel at whole-body resolution: the outer rim of each bone stands for it.
    eroded = ndimage.binary_erosion(bone_mask, structure=ndimage.generate_binary_structure(3, 1))
    cortex = bone_mask & ~eroded
    return Phantom(canvas=canvas, tissue=tissue, bone=bone, cortex=cortex)


def _superellipse_slab(canvas: Canvas, z_levels, half_width, half_depth, y_centre, inset: float, power: float = 2.6) -> np.ndarray:
    """Boolean volume of a trunk whose axial cross-section is a superellipse varying with height."""
    z = canvas.axis(2)
    a = np.interp(z, z_levels, half_width, left=0.0, right=0.0) - inset
    b = np.interp(z, z_levels, half_depth, left=0.0, right=0.0) - inset
    yc = np.interp(z, z_levels, y_centre)
    valid = (a > 0) & (b > 0)
    a = np.where(valid, a, 1.0)[None, None, :]
    b = np.where(valid, b, 1.0)[None, None, :]
    x = canvas.axis(0)[:, None, None]
    y = canvas.axis(1)[None, :, None]
    q = np.abs(x / a) ** power + np.abs((y - yc[None, None, :]) / b) ** power
    return (q <= 1.0) & valid[None, None, :]


def _limbs(canvas: Canvas, subject: SubjectParams, pose: ExamPose, inset: float) -> list:
    """Soft-tissue tubes of the neck, shoulders, arms and thighs (radii reduced by ``inset``)."""
    s = subject.scale
    sw = subject.shoulder_width
    g = subject.build
    shapes = []
    # neck
    shapes.append(tube(canvas, np.array([[0, -18, 540], [0, -22, 760]]) * s, max(58 * s * (0.9 + 0.1 * g) - inset, 1)))
    for side in (-1, 1):
        elbow_x = (172 * sw + pose.arm_abduction / s) * side
        arm = np.array([[150 * sw * side, -14, 520], [elbow_x, -14, 240], [(168 * sw + pose.arm_abduction / s) * side, 18, -10]]) * s
        shapes.append(tube(canvas, arm, np.array([46 * g, 40 * g, 33 * g]) * s - inset))
        shoulder = np.array([[60 * side, -10, 520], [148 * sw * side, -12, 522]]) * s
        shapes.append(tube(canvas, shoulder, np.array([55, 48]) * s * g - inset))
        thigh = np.array([[92 * side * subject.pelvis_width, 0, 20], [84 * side, 8, -500]]) * s
        shapes.append(tube(canvas, thigh, np.array([88 * g, 72 * g]) * s - inset))
    return shapes


def _body(canvas: Canvas, tissue: np.ndarray, subject: SubjectParams, pose: ExamPose) -> None:
    s, g = subject.scale, subject.build
    pw = subject.pelvis_width
    z_levels = np.array([-45, 0, 120, 220, 330, 450, 520, 555]) * s
    half_width = np.array([150 * pw, 172 * pw, 160 * pw, 142, 152, 158, 150, 95]) * s * g
    half_depth = np.array([95, 108, 104, 100, 104, 110, 100, 70]) * s * g
    y_centre = np.array([5, 5, 5, 5, 8, 8, 2, -15]) * s
    fat = subject.fat_mm * s * g
    outer = _superellipse_slab(canvas, z_levels, half_width, half_depth, y_centre, inset=0.0)
    inner = _superellipse_slab(canvas, z_levels, half_width, half_depth, y_centre, inset=fat)
    tissue[outer] = T["fat"]
    for shape in _limbs(canvas, subject, pose, inset=0.0):
        paint(tissue, T["fat"], shape)
    tissue[inner] = T["muscle"]
    for shape in _limbs(canvas, subject, pose, inset=fat * 0.8):
        paint(tissue, T["muscle"], shape)
    # Abdominal and pelvic cavity: visceral fat between the organs.
    cavity = ellipsoid(canvas, np.array([0, 22, 165]) * s, np.array([118 * g, 72 * g, 150]) * s)
    paint(tissue, T["visceral_fat"], cavity, where=tissue == T["muscle"])


def _organs(canvas: Canvas, tissue: np.ndarray, subject: SubjectParams, pose: ExamPose) -> None:
    s, g = subject.scale, subject.build
    br = pose.breath_mm
    lung_r = np.array([62, 78, 125]) * s
    for side in (-1, 1):
        paint(tissue, T["lung"], ellipsoid(canvas, np.array([72 * side, 2, 440]) * s + [0, 0, -br / 2], lung_r))
    # The diaphragm domes (liver right, spleen/stomach left) cut the lung bases.
    paint(tissue, T["blood"], ellipsoid(canvas, np.array([-22, 42, 425]) * s, np.array([58, 48, 56]) * s))
    liver = np.array([58, 14, 335]) * s + [0, 0, -br]
    paint(tissue, T["liver"], ellipsoid(canvas, liver, np.array([96, 80, 72]) * s * subject.liver_size, rotation(yaw=0.25)))
    spleen = np.array([-92, -38, 352]) * s + [0, 0, -br]
    paint(tissue, T["spleen"], ellipsoid(canvas, spleen, np.array([32, 26, 52]) * s * subject.spleen_size, rotation(yaw=-0.5)))
    for side in (-1, 1):
        drop = subject.kidney_drop_mm if side == 1 else 0.0
        centre = np.array([70 * side, -52, 268]) * s + [0, 0, -drop * s - br / 3]
        paint(tissue, T["kidney"], ellipsoid(canvas, centre, np.array([27, 24, 52]) * s, rotation(yaw=0.35 * side, roll=-0.2 * side)))
    paint(tissue, T["bladder"], ellipsoid(canvas, np.array([0, 52, 22]) * s, np.array([46, 38, 36]) * s))
    # Aorta in front of the spine.
    paint(tissue, T["blood"], tube(canvas, np.array([[-14, -12, 110], [-16, -14, 300], [-10, 0, 420]]) * s, 11 * s))
    # Bowel loops: a few random blobs in the lower abdomen, placed per subject.
    # Psoas muscles run from the lumbar spine down and out towards the hips.
    for side in (-1, 1):
        psoas = np.array([[30 * side, -30, 290], [48 * side, -22, 150], [66 * side, 8, 30]]) * s
        paint(tissue, T["muscle"], tube(canvas, psoas, np.array([11, 20, 16]) * s), where=tissue == T["visceral_fat"])
    bowel_rng = np.random.default_rng(subject.bowel_seed)
    for _ in range(14):
        centre = np.array([bowel_rng.uniform(-90, 90), bowel_rng.uniform(-10, 62), bowel_rng.uniform(60, 240)]) * s
        radii = bowel_rng.uniform(16, 32, size=3) * s * g ** 0.5
        paint(tissue, T["bowel"], ellipsoid(canvas, centre, radii), where=tissue == T["visceral_fat"])


def _spine(canvas: Canvas, tissue: np.ndarray, bone: np.ndarray, verts: list[Vertebra], s: float) -> None:
    # Spinal canal (CSF and cord) behind the bodies, painted first so the arches surround it.
    canal_pts = []
    for v in verts[::3] + [verts[-1]]:
        canal_pts.append([0.0, v.y - v.depth / 2 - 10.0, v.z])
    canal_pts.insert(0, [0.0, verts[0].y - verts[0].depth / 2 - 12.0, 60.0])
    paint(tissue, T["csf"], tube(canvas, np.array(canal_pts) * s, 9.0 * s))
    previous = None
    for v in verts:
        centre = np.array([0.0, v.y, v.z])
        body = ellipsoid(canvas, centre * s, np.array([v.width / 2, v.depth / 2, v.height / 2 * 1.25]) * s)
        if body is not None:
            box, mask = body
            # flat endplates: clip the ellipsoid's poles
            z = canvas.coords(box)[2]
            mask = mask & (np.abs(z - v.z * s) <= v.height / 2 * s)
            paint(bone, v.region, (box, mask))
        canal_r = 10.0 if v.region == 3 else 8.5
        canal_y = v.y - v.depth / 2 - canal_r
        # neural arch: a half ring around the canal, its ends (pedicles) joining the body
        angles = np.linspace(-2.2, 2.2, 7)
        ring_r = canal_r + 2.0
        ring_pts = np.stack([ring_r * np.sin(angles), canal_y - ring_r * np.cos(angles), np.full(7, v.z)], axis=1)
        paint(bone, v.region, tube(canvas, np.array(ring_pts) * s, 3.6 * s))
        back = canal_y - canal_r - 2.0
        slope = {1: 4.0, 2: 14.0, 3: 4.0}[v.region]
        length = {1: 18.0, 2: 24.0, 3: 28.0}[v.region]
        paint(bone, v.region, tube(canvas, np.array([[0, back, v.z], [0, back - length, v.z - slope]]) * s, np.array([4.5, 3.5]) * s))
        reach = {1: 10.0, 2: 22.0, 3: 30.0}[v.region]
        for side in (-1, 1):
            tp = np.array([[side * canal_r, canal_y - 2, v.z], [side * (v.width / 2 + reach), canal_y - 8.0, v.z]])
            paint(bone, v.region, tube(canvas, tp * s, 4.0 * s))
        if previous is not None:
            gap_lo = previous.z + previous.height / 2
            gap_hi = v.z - v.height / 2
            disc = ellipsoid(canvas, np.array([0.0, (v.y + previous.y) / 2, (gap_lo + gap_hi) / 2]) * s,
                             np.array([v.width / 2, v.depth / 2, max(gap_hi - gap_lo, 2.0) / 2 + 1.0]) * s)
            paint(tissue, T["disc"], disc, where=bone == 0)
        previous = v
    # Sacrum: five fused segments curving backwards and down, with wide alae at S1.
    seg = [(100, -36, 52, 17), (80, -46, 42, 15), (62, -56, 32, 13), (46, -64, 22, 11), (32, -70, 14, 9)]
    for z, y, half_width, half_depth in seg:
        paint(bone, 4, ellipsoid(canvas, np.array([0, y, z]) * s, np.array([half_width, half_depth, 11]) * s))
    paint(bone, 4, tube(canvas, np.array([[0, -74, 28], [0, -78, 10]]) * s, 5 * s))  # coccyx


def _ribs(canvas: Canvas, bone: np.ndarray, verts: list[Vertebra], subject: SubjectParams) -> None:
    s = subject.scale
    g = subject.build
    thoracic = {v.name: v for v in verts if v.region == 2}
    for k in range(1, 13):
        v = thoracic[f"T{k}"]
        # half-axes of the rib's path around the chest, widest at ribs 6-8
        shape = np.exp(-(((k - 7.0) / 4.2) ** 2))
        a = (70.0 + 78.0 * shape) * (0.9 + 0.1 * g)
        b = (48.0 + 52.0 * shape) * (0.9 + 0.1 * g)
        if k >= 9:
            a *= 1.0 - 0.04 * (k - 8)
        end = np.pi * (0.88 if k <= 7 else 0.78 if k <= 10 else 0.48 if k == 11 else 0.38)
        drop = 18.0 + 5.0 * min(k, 8)
        phi = np.linspace(0.3, end, 14)
        yc = v.y - v.depth / 2 + b * np.cos(0.3) - 6.0
        for side in (-1, 1):
            pts = np.stack([
                side * a * np.sin(phi),
                yc - b * np.cos(phi),
                v.z - drop * (phi - phi[0]) / np.pi + 8.0 * np.sin(phi) * 0.5,
            ], axis=1)
            # start at the transverse process
            pts = np.vstack([[side * (v.width / 2 + 6.0), v.y - v.depth / 2 - 8.0, v.z], pts])
            paint(bone, RIB, tube(canvas, pts * s, 4.6 * s), where=bone == 0)


def _pelvis_and_femurs(canvas: Canvas, bone: np.ndarray, subject: SubjectParams) -> None:
    s = subject.scale
    pw = subject.pelvis_width
    for side in (-1, 1):
        hip = np.array([88 * pw * side, 0, 0])
        # femur: head, neck, greater trochanter, shaft
        femur = 5
        paint(bone, femur, ellipsoid(canvas, hip * s, np.array([23, 23, 23]) * s))
        neck_end = np.array([122 * pw * side, -6, -34])
        paint(bone, femur, tube(canvas, np.array([hip, neck_end]) * s, np.array([14, 15]) * s))
        paint(bone, femur, ellipsoid(canvas, np.array([128 * pw * side, -12, -24]) * s, np.array([15, 19, 24]) * s))
        shaft = np.array([[122 * pw * side, -4, -40], [108 * side, 4, -200], [92 * side, 10, -440]])
        paint(bone, femur, tube(canvas, shaft * s, np.array([15, 14, 14]) * s))
        # pelvis: acetabulum around the head (a cartilage gap kept free), ilium, pubis, ischium
        pelvis = 4
        head_gap = ellipsoid(canvas, hip * s, np.array([27, 27, 27]) * s)
        acetabulum = ellipsoid(canvas, (hip + [-4 * side, -4, 8]) * s, np.array([30, 36, 34]) * s)
        if acetabulum is not None and head_gap is not None:
            box, mask = acetabulum
            free = np.ones(bone.shape, dtype=bool)
            paint(free, 0, head_gap)
            paint(bone, pelvis, (box, mask & free[box] & (bone[box] == 0)))
        wing = ellipsoid(
            canvas,
            np.array([96 * pw * side, -22, 112]) * s,
            np.array([8, 58, 54]) * s,
            rotation(yaw=-0.62 * side, roll=0.42 * side),
        )
        paint(bone, pelvis, wing)
        paint(bone, pelvis, tube(canvas, np.array([[92 * pw * side, -18, 72], [86 * pw * side, -8, 24]]) * s, 15 * s))
        # sacroiliac joint region: ilium meets the sacrum
        paint(bone, pelvis, tube(canvas, np.array([[48 * side, -48, 96], [84 * pw * side, -34, 98]]) * s, 11 * s))
        paint(bone, pelvis, tube(canvas, np.array([[80 * pw * side, 24, 2], [16 * side, 56, -6]]) * s, 9 * s))  # pubic ramus
        ischium = np.array([[86 * pw * side, -22, -8], [66 * side, -22, -52], [24 * side, 36, -30]])
        paint(bone, pelvis, tube(canvas, ischium * s, np.array([12, 11, 8]) * s))


def _shoulders_and_arms(canvas: Canvas, bone: np.ndarray, subject: SubjectParams, pose: ExamPose) -> None:
    s = subject.scale
    sw = subject.shoulder_width
    for side in (-1, 1):
        head = np.array([150 * sw * side, -14, 520])
        elbow = np.array([(172 * sw + pose.arm_abduction / s) * side, -14, 242])
        paint(bone, 6, ellipsoid(canvas, head * s, np.array([23, 23, 23]) * s))
        paint(bone, 6, tube(canvas, np.array([head + [0, 0, -20], elbow]) * s, np.array([12, 10]) * s))
        wrist = np.array([(168 * sw + pose.arm_abduction / s) * side, 16, -8])
        for offset in (-7, 7):
            paint(bone, OTHER_BONE, tube(canvas, np.array([elbow + [offset, 0, -14], wrist + [offset * 0.6, 0, 0]]) * s, 5.5 * s), where=bone == 0)
        # scapula: a tilted plate on the back of the chest, with its spine, acromion and glenoid neck
        superior = np.array([62 * side, -98, 560], dtype=float)
        inferior = np.array([82 * side, -88, 420], dtype=float)
        glenoid = np.array([128 * sw * side, -36, 520])
        centre = (superior + inferior + glenoid) / 3
        u = inferior - superior
        u /= np.linalg.norm(u)
        w = glenoid - superior
        w = w - (w @ u) * u
        w /= np.linalg.norm(w)
        n = np.cross(u, w)
        paint(bone, 7, ellipsoid(canvas, centre * s, np.array([72, 40, 6]) * s, np.stack([u, w, n])))
        paint(bone, 7, tube(canvas, np.array([centre, glenoid]) * s, np.array([8, 11]) * s))
        acromion = np.array([[66 * side, -104, 540], [128 * sw * side, -62, 548], [146 * sw * side, -30, 548]])
        paint(bone, 7, tube(canvas, acromion * s, np.array([6, 6, 7]) * s))
        # clavicle: S-curved from the manubrium to the acromion
        clavicle = np.array([[18 * side, 70, 560], [64 * side, 66, 570], [112 * sw * side, 34, 566], [140 * sw * side, -22, 552]])
        paint(bone, 8, tube(canvas, clavicle * s, 7.0 * s))
    # sternum: manubrium, body, xiphoid on the front of the chest
    paint(bone, 9, ellipsoid(canvas, np.array([0, 84, 538]) * s, np.array([27, 9, 20]) * s))
    paint(bone, 9, ellipsoid(canvas, np.array([0, 96, 462]) * s, np.array([16, 8, 58]) * s, rotation(pitch=0.18)))
    paint(bone, 9, tube(canvas, np.array([[0, 104, 404], [0, 102, 388]]) * s, 5 * s))
