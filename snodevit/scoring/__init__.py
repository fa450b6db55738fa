"""Streaming batch scoring behind ``snodevit score``: image files in, one answer row per image out, resumable and
fault tolerant, with the same records the service answers with.

Data flows in one direction with bounded memory, one module per step:

1. ``inputs``: :func:`expand_inputs` lists the images (files, folders walked recursively, glob patterns, list
   files) into a packed :class:`PathTable` (paths, never pixels) with an optional true label per image, from
   class sub-folders (an image folder) or a ``path,label`` CSV (:func:`read_labels_file`).
2. ``files``: :class:`ImageFiles` decodes and preprocesses one file in a DataLoader worker with the service's
   decoder; a file that cannot be read becomes an error item (the service's error code) instead of an exception.
3. ``run``: :func:`score_files` sends each batch through ``LoadedModel.predict`` and turns it into rows
   (``rows``: :func:`record_row` of ``prediction_records``, or :func:`error_row`) appended to ``OUT.partial``
   (``partial``: :class:`PartialFile`, the resumable stream, and :func:`plan_output`) after every batch.
4. ``output``: :func:`finalise` converts the partial file into CSV, JSONL or Parquet (in chunks), computes the
   run's figures (through ``calibration``'s metrics when labels are known) and moves the result into place
   atomically.

Memory. Paths are packed into two numpy arrays (no per-path Python objects that forked workers would copy on
write); rows are never held beyond one batch, and the output is converted in chunks. What grows with the run: the
set of finished paths on resume, and for labelled images their probability vectors (N_labelled x classes
float32), which the calibration metrics need at the end.
"""

from snodevit.scoring.errors import ScoreError, ScoreWriteError
from snodevit.scoring.files import ImageFiles
from snodevit.scoring.inputs import InputListing, PathTable, expand_inputs, read_labels_file
from snodevit.scoring.output import ScoreSummary, finalise
from snodevit.scoring.partial import OUTPUT_FORMATS, PARTIAL_SUFFIX, OutputFormat, OutputPlan, PartialFile, plan_output
from snodevit.scoring.rows import ROW_FIELDS, error_row, record_row
from snodevit.scoring.run import ScoreSettings, run_header, score_files

__all__ = [
    "OUTPUT_FORMATS", "PARTIAL_SUFFIX", "ROW_FIELDS", "ImageFiles", "InputListing", "OutputFormat", "OutputPlan",
    "PartialFile", "PathTable", "ScoreError", "ScoreSettings", "ScoreWriteError", "ScoreSummary", "error_row", "expand_inputs",
    "finalise", "plan_output", "read_labels_file", "record_row", "run_header", "score_files",
]
