"""Batch scoring behind `snodevit score`: inputs (folders, globs, list files), a resumable partial file, and the
final CSV / JSONL / Parquet with the same records the service answers with."""
