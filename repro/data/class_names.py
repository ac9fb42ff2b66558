"""Class names: labels given as names or ids, and the names sample figures are titled with.

    names, source = names_for(num_classes=1000, data_path=None)   # ImageNet's 1000 names (torchvision), offline
    resolve_labels(["golden retriever", 207, "tabby cat"], names, source)   # -> [207, 207, 281]
    resolve_labels(["goldn retriever"], names, source)   # ReproError: ... did you mean 'golden retriever' (207)?

Where the names come from (`names_for`), first that applies: the names given (`--class-names`: the names
in label order, or one file with a name per line); the class folders step 6 recorded for the config's
data.data_path (extract_report.json); ImageNet's names when the model has 1000 classes (the official
checkpoints), from torchvision's bundled list `torchvision.models._meta._IMAGENET_CATEGORIES` (no download).

A name matches a class when it equals it ignoring case, '_' and '-' ("Golden_Retriever" is
"golden retriever"); failing that, when exactly one class's name is all contained in it, the longest such
name ("tabby cat" is ImageNet's "tabby", 281; "a tiger cat" is "tiger cat", not "tiger").
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from repro.errors import ReproError

IMAGENET_CLASSES = 1000
SUGGESTIONS = 5  # how many close names a did-you-mean error offers


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names in label order, from the list torchvision ships with its weights' metadata."""
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES as names
    except ImportError as e:
        raise ReproError(f"ImageNet class names come from torchvision's bundled list "
                         f"(torchvision.models._meta._IMAGENET_CATEGORIES), which this install lacks ({e}); "
                         f"install torchvision (pip install 'torchvision>=0.16'), or give class ids 0-999") from None
    if len(names) != IMAGENET_CLASSES:
        raise ReproError(f"torchvision.models._meta._IMAGENET_CATEGORIES has {len(names)} names, expected "
                         f"{IMAGENET_CLASSES}; give class ids 0-999, or the names with --class-names")
    return [str(n) for n in names]


def _read_given(given: str | os.PathLike | Sequence[str]) -> tuple[list[str], str]:
    """The names as given: a list, or one file (a path, or a one-item list naming a file) with a name a line."""
    items = [given] if isinstance(given, (str, os.PathLike)) else list(given)
    if len(items) == 1 and Path(items[0]).is_file():
        path = Path(items[0])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ReproError(f"--class-names {path}: cannot read it ({e}); give a UTF-8 text file with one "
                             f"class name a line, in label order") from None
        return [line.strip() for line in lines if line.strip()], f"the class names in {path}"
    return [str(n) for n in items], "--class-names"


def names_for(num_classes: int, data_path: Optional[str | os.PathLike] = None,
              given: Optional[str | os.PathLike | Sequence[str]] = None) -> tuple[Optional[list[str]], str]:
    """(names in label order, where they came from), or (None, why there are none). See the module docstring."""
    from repro.data.extract import report_class_names

    if given:
        names, source = _read_given(given)
        if len(names) != num_classes:
            raise ReproError(f"{source}: {len(names)} class name(s) but data.num_classes is {num_classes}; "
                             f"give one name per class, in label order")
        return names, source
    if data_path:
        folder = Path(data_path)
        folder = folder if folder.is_dir() else folder.parent
        names = report_class_names(folder)
        if names is not None and len(names) == num_classes:  # another folder's record: no names rather than wrong
            return names, f"the class folders step 6 recorded in {folder}"
    if num_classes == IMAGENET_CLASSES:
        try:
            return imagenet_class_names(), "ImageNet's 1000 class names (torchvision's list)"
        except ReproError as e:
            return None, str(e)
    return None, (f"this config's {num_classes} classes have no names (no extract_report.json from step 6 beside "
                  f"data.data_path, and not ImageNet's 1000)")


def _key(text: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", text.strip().lower())).strip()


def _as_id(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or array
        return int(value.item())
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else None


def _suggestions(key: str, names: Sequence[str]) -> list[str]:
    """Names sharing a word with `key` ("cat" -> "tiger cat", "Persian cat"), then difflib's close ones
    ("goldn retriever" -> "golden retriever"); each group closest first."""
    keys = [_key(n) for n in names]
    words = set(key.split())

    def closeness(i: int) -> float:
        return difflib.SequenceMatcher(None, key, keys[i]).ratio()

    sharing = sorted((i for i, k in enumerate(keys) if words & set(k.split())), key=closeness, reverse=True)
    close = difflib.get_close_matches(key, keys, n=SUGGESTIONS, cutoff=0.6)
    order = sharing + [i for k in close for i, name_key in enumerate(keys) if name_key == k]
    return list(dict.fromkeys(f"{names[i]!r} ({i})" for i in order))[:SUGGESTIONS]


def resolve_label(value, names: Optional[Sequence[str]], source: str = "the class names") -> int:
    """One label: an id (int or digits) as it is, a name as its class id; an unknown name is a ReproError
    naming the closest names."""
    label = _as_id(value)
    if label is not None:
        return label
    if not isinstance(value, str):
        raise ReproError(f"label {value!r} is not an integer class index or a class name")
    shown = value
    if not names:
        raise ReproError(f"label {shown!r} is a name, but {source}; give class ids instead, or the names in "
                         f"label order with --class-names")
    key = _key(shown)
    keys = [_key(n) for n in names]
    exact = [i for i, k in enumerate(keys) if k == key]
    if len(exact) > 1:
        raise ReproError(f"label {shown!r} names {len(exact)} classes in {source} "
                         f"({', '.join(f'{names[i]!r} ({i})' for i in exact)}); give the id")
    if exact:
        return exact[0]
    words = set(key.split())
    within = [i for i, k in enumerate(keys) if k and set(k.split()) <= words]
    longest = max((len(keys[i].split()) for i in within), default=0)
    within = [i for i in within if len(keys[i].split()) == longest]
    if len(within) == 1:
        return within[0]
    hint = _suggestions(key, names)
    if len(within) > 1:
        raise ReproError(f"label {shown!r} could be any of {', '.join(f'{names[i]!r} ({i})' for i in within)} "
                         f"in {source}; give the full name or the id")
    raise ReproError(f"label {shown!r} is not a class name in {source}"
                     + (f"; did you mean {', '.join(hint)}?" if hint else "")
                     + f" Give a name from that list or a class id 0-{len(names) - 1}")


def resolve_labels(values: Sequence, names: Optional[Sequence[str]], source: str = "the class names") -> list[int]:
    """Each label resolved with `resolve_label` (ids stay ids; range checks are the caller's)."""
    return [resolve_label(v, names, source) for v in values]


def describe_labels(labels: Sequence[int], names: Optional[Sequence[str]]) -> str:
    """'207 golden retriever, 281 tabby' (ids alone without names): what a run prints about its labels."""
    if not names:
        return ", ".join(str(int(i)) for i in labels)
    return ", ".join(f"{int(i)} {names[int(i)]}" if 0 <= int(i) < len(names) else str(int(i)) for i in labels)
