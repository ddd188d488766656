"""Shows what the reader makes of one study folder (and, optionally, its mask).

    python -m data_prep.inspect STUDY_DIR [--mask MASK.nii[.gz]] [--series_uid UID] [--json]

Prints the slice count, volume shape, pixel and slice spacing, slice order (normal or reversed), HU
range, transfer syntaxes and skipped files. With --mask, each label's voxel count on the series grid
and the share of its voxels above 150 HU (bone): a quick check that a mask is aligned, since a
vertebra label on the right voxels is mostly bone. --json prints the same as one JSON object with
keys num_slices, shape, pixel_spacing, slice_spacing, reversed, hu_min, hu_max, skipped, labels, ...
Exit status: 0 on success, 1 when the study or mask cannot be read (the reason goes to stderr).
"""
import json
import sys

from absl import app
from absl import flags

from cspine_jax.io import dicom
from cspine_jax.io import inspect as inspect_lib

_MASK = flags.DEFINE_string("mask", None, "segmentation NIfTI to align with the series")
_SERIES_UID = flags.DEFINE_string(
    "series_uid", None, "SeriesInstanceUID to read when the folder mixes several, or "
    f"'{dicom.AUTO_SERIES}' for the one with the most axial slices")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object")


def main(argv) -> int:
  if len(argv) != 2:
    raise app.UsageError(f"expected one STUDY_DIR, got {argv[1:]}")
  try:
    info = inspect_lib.inspect_study(argv[1], _MASK.value, series_uid=_SERIES_UID.value)
  except (dicom.SeriesError, ValueError, OSError) as e:  # MaskError is a ValueError too.
    print(f"error: {e}", file=sys.stderr)
    return 1
  if _JSON.value:
    json.dump(info, sys.stdout)
    sys.stdout.write("\n")
  else:
    print(inspect_lib.format_text(info))
  return 0


if __name__ == "__main__":
  app.run(main)
