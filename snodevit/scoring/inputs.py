"""What a scoring run reads: the command line's INPUT arguments expanded into a packed list of image paths, each
with its true label where one is known (class sub-folders, or a ``path,label`` CSV).

Forms: files, folders walked recursively, glob patterns, and list files (``@FILE`` or ``*.txt``). Paths are packed
into two numpy arrays (:class:`PathTable`), never a list of Python strings, so forked DataLoader workers share them.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from snodevit.data import IMAGE_EXTENSIONS
from snodevit.scoring.errors import ScoreError

_GLOB_CHARS = frozenset("*?[")
_UNLABELLED = -1  # label of an image whose class is not known


class PathTable:
    """An immutable list of paths packed into one byte buffer and an offset array.

    A list of a million ``str`` objects would be copied page by page into every forked DataLoader worker as
    the workers touch reference counts; two numpy arrays are shared for good.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        buf = bytearray()
        offsets = [0]
        for p in paths:
            buf += p.encode("utf-8", "surrogateescape")
            offsets.append(len(buf))
        self._data = np.frombuffer(bytes(buf), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)  # (N + 1,)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._data[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class InputListing:
    """The images of a run, in scoring order."""

    paths: PathTable  # the path of each image as it appears in the output's ``path`` column
    labels: np.ndarray  # (N,) int32 index into ``class_names`` of the true class, -1 where unknown
    class_names: list[str]  # the model's classes
    warnings: list[str] = field(default_factory=list)  # inputs that matched nothing, and the like
    labelled_folders: list[str] = field(default_factory=list)  # folder inputs read as image folders

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())


def _is_list_file(arg: str) -> bool:
    return arg.startswith("@") or (arg.lower().endswith(".txt") and os.path.isfile(arg))


def _walk_images(top: str) -> Iterator[str]:
    """Image files under ``top`` in sorted order; hidden files and folders skipped, folder links not followed."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.normpath(os.path.join(dirpath, name))


def _folder_classes(top: str, class_names: Sequence[str]) -> bool:
    """True when ``top`` is an image folder of this model: it has sub-folders and all of them are class names."""
    try:
        subdirs = [e.name for e in os.scandir(top) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return False
    return bool(subdirs) and set(subdirs) <= set(class_names)


def _read_list_file(path: str) -> Iterator[str]:
    """Paths listed one per line; blank lines and ``#`` comments skipped; relative to the list file's folder."""
    base = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield os.path.normpath(os.path.join(base, line))
    except OSError as err:
        raise ScoreError(f"cannot read the list file {path}: {err.strerror or err}") from None


def read_labels_file(path: str | os.PathLike[str], class_names: Sequence[str]) -> dict[str, int]:
    """Read a ``path,label`` CSV into {absolute path: class index}.

    Relative paths are relative to the CSV's folder. A first row ``path,label`` is a header and skipped. Labels
    are class names of the model.

    Raises:
        ScoreError: the file cannot be read, a row does not have two fields, a label is not a class name, or a
            path is given two different labels.
    """
    path = os.fspath(path)
    base = os.path.dirname(path)
    index = {name: i for i, name in enumerate(class_names)}
    out: dict[str, int] = {}
    unknown: set[str] = set()
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 2:
                    raise ScoreError(f"{path}:{lineno}: expected two fields 'path,label', got {len(row)}")
                p, label = row[0].strip(), row[1].strip()
                if lineno == 1 and (p.lower(), label.lower()) == ("path", "label"):
                    continue
                if label not in index:
                    unknown.add(label)
                    continue
                key = os.path.abspath(os.path.join(base, p))
                if out.get(key, index[label]) != index[label]:
                    raise ScoreError(f"{path}:{lineno}: {p} is labelled twice, differently")
                out[key] = index[label]
    except OSError as err:
        raise ScoreError(f"cannot read the labels file {path}: {err.strerror or err}") from None
    if unknown:
        raise ScoreError(f"{path}: labels {sorted(unknown)[:10]} are not classes of the model; its classes are "
                         f"{list(class_names)[:20]}")
    return out


class _Collector:
    """The listing being built: each path once (by absolute path), with its label; the labels file wins."""

    def __init__(self, class_names: Sequence[str], labels: dict[str, int] | None) -> None:
        self.names = list(class_names)
        self.class_index = {n: i for i, n in enumerate(self.names)}
        self.labels = labels
        self.seen: set[str] = set()
        self.paths: list[str] = []
        self.label_list: list[int] = []
        self.labelled_folders: list[str] = []

    def add(self, path: str, label: int = _UNLABELLED) -> None:
        key = os.path.abspath(path)
        if key in self.seen:
            return
        self.seen.add(key)
        if self.labels is not None and key in self.labels:
            label = self.labels[key]
        self.paths.append(path)
        self.label_list.append(label)

    def add_folder(self, top: str) -> None:
        """Every image below ``top``; in an image folder, each labelled by its class sub-folder."""
        if not _folder_classes(top, self.names):
            for p in _walk_images(top):
                self.add(p)
            return
        self.labelled_folders.append(top)
        for p in _walk_images(top):
            first = os.path.relpath(p, top).split(os.sep, 1)[0]
            self.add(p, self.class_index.get(first, _UNLABELLED))

    def add_input(self, arg: str) -> None:
        """One INPUT argument, in the order of forms :func:`expand_inputs` documents."""
        if _is_list_file(arg):
            list_path = arg[1:] if arg.startswith("@") else arg
            if not os.path.isfile(list_path):
                raise ScoreError(f"list file {list_path!r} does not exist")
            for p in _read_list_file(list_path):
                self.add(p)
        elif os.path.isdir(arg):
            self.add_folder(arg)
        elif os.path.exists(arg):
            self.add(os.path.normpath(arg))
        elif _GLOB_CHARS & set(arg):
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    self.add_folder(match)
                else:
                    self.add(os.path.normpath(match))
        else:
            raise ScoreError(f"input {arg!r} does not exist (give image files, folders, glob patterns or @list.txt)")


def expand_inputs(inputs: Sequence[str], class_names: Sequence[str],
                  labels: dict[str, int] | None = None) -> InputListing:
    """List the images named by the command line's INPUT arguments, in a deterministic order.

    Forms (tried in this order):

    * ``@FILE``, or an existing ``*.txt`` file: a list of image paths, one per line, relative to the list
      file's folder (blank lines and ``#`` comments skipped). A listed path that is missing becomes an error row.
    * a folder: every image file below it (by extension, see ``snodevit.data.IMAGE_EXTENSIONS``; hidden files
      and folders skipped; folder symlinks not followed), sorted. When every sub-folder is named after a class
      of the model it is an image folder and each image's class folder is its true label.
    * an existing file: that file, whatever its extension.
    * a pattern with ``*``, ``?`` or ``[`` (``**`` recurses): the matching files, and the images below matching
      folders.

    A path that appears twice is scored once. ``labels`` (absolute path -> class index, from
    :func:`read_labels_file`) takes precedence over folder labels.

    Raises:
        ScoreError: a named file, folder or list file does not exist, or nothing matched at all.
    """
    found = _Collector(class_names, labels)
    warnings: list[str] = []
    for arg in inputs:
        before = len(found.paths)
        found.add_input(arg)
        if len(found.paths) == before:
            warnings.append(f"input {arg!r} matched no (new) image files")
    if not found.paths:
        raise ScoreError(f"no input images matched {list(inputs)}; folders are searched recursively for files "
                         f"ending in {sorted(IMAGE_EXTENSIONS)}")
    # pack, then let the per-path Python objects go before any worker forks
    table = PathTable(found.paths)
    label_arr = np.asarray(found.label_list, dtype=np.int32)
    return InputListing(table, label_arr, found.names, warnings, found.labelled_folders)
