"""Convert and check label maps: TotalSegmentator → the SAP skeleton scheme (0–9).

  sap labels from-totalseg IN OUT [--table total|total_mr] [--class-map JSON] [--vertebrae-rule R]
  sap labels check FILE --as skeleton|lesions|generic
"""

from __future__ import annotations

import argparse

from sap.data.labels import VERTEBRAE_RULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    convert = sub.add_parser(
        "from-totalseg",
        help="map TotalSegmentator labels to the SAP skeleton scheme by class name",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    convert.add_argument("input", help="TotalSegmentator label map (NIfTI/NRRD/MHA)")
    convert.add_argument("output", help="skeleton label map to write (same grid and orientation as the input)")
    convert.add_argument("--table", default="total", help="class table in the class map: total or total_mr")
    convert.add_argument("--class-map", default=None,
                         help="class-map JSON {table: {value: name}}; default: the v2 tables shipped with sap")
    convert.add_argument("--vertebrae-rule", choices=sorted(VERTEBRAE_RULES), default=None,
                         help="how to split total_mr's single 'vertebrae' class: "
                         + "; ".join(f"{k}: {v}" for k, v in VERTEBRAE_RULES.items()))
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    check = sub.add_parser("check", help="read a label map and check it as a skeleton, lesion mask or generic map",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("input", help="label map file or DICOM folder")
    check.add_argument("--as", dest="kind", choices=["skeleton", "lesions", "generic"], default="generic",
                       help="which rules to apply")
    check.add_argument("--binarize", action="store_true", help="lesions: accept any non-zero value")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sap.data.io import write_image
    from sap.data.labels import (
        SKELETON_CLASSES,
        check_lesion_mask,
        check_skeleton,
        convert_totalseg,
        load_class_map,
        read_label_map,
    )
    from sap.errors import SapError
    from sap.files import check_not_input, check_writable

    if args.labels_command == "from-totalseg":

        from sap.data.io import check_image_name

        output = check_image_name(args.output)
        check_not_input([output], [args.input, args.class_map])  # refuse before any work
        check_writable(output, args.overwrite)
        tables = load_class_map(args.class_map)
        if args.table not in tables:
            raise SapError(f"{args.class_map or 'shipped class map'}: no table {args.table!r} "
                           f"(has {', '.join(sorted(tables))})")
        image = read_label_map(args.input)
        skeleton = convert_totalseg(image.array, tables[args.table], args.vertebrae_rule, source=str(args.input))
        write_image(skeleton, image.geometry, output, overwrite=args.overwrite)
        present = [f"{SKELETON_CLASSES[v]} ({int((skeleton == v).sum())} voxels)"
                   for v in np.unique(skeleton) if v > 0]
        print(f"wrote {output}: {', '.join(present) or 'no skeletal region found'}")
        return 0

    from sap.data.io import read_image

    image = read_image(args.input)
    if args.kind == "skeleton":
        array = check_skeleton(image.array, str(args.input))
    elif args.kind == "lesions":
        array = check_lesion_mask(image.array, str(args.input), binarize=args.binarize)
    else:
        array = read_label_map(args.input).array
    values = np.unique(array)
    shown = ", ".join(str(int(v)) for v in values[:30]) + (" …" if values.size > 30 else "")
    print(f"{args.input}: {args.kind} label map, {'×'.join(map(str, array.shape))} voxels "
          f"({image.geometry.axcodes}), values {shown}")
    return 0
