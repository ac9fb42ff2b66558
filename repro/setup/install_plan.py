"""Install only what is missing: compare requirements.txt ranges with what is installed.

Kaggle and Colab ship a torch built for their GPUs and CUDA; `pip install -r requirements.txt`
can silently replace it with a wheel for another CUDA. So the kit never installs torch,
torchvision or torchaudio: they are reported as kept, with a warning when out of range.
A failed pip run is an error carrying pip's own message, never a warning.

    items = plan_installs(parse_requirements("requirements.txt"))
    print(format_plan(items))
    execute_plan(items)                 # python -m pip install <missing or out-of-range specs>
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from repro.errors import ReproError

# Preinstalled CUDA builds on Kaggle/Colab: replacing them breaks the GPU stack.
PROTECTED = frozenset({"torch", "torchvision", "torchaudio"})


@dataclass
class PlanItem:
    requirement: Requirement
    installed: Optional[str]  # installed version, None when missing
    action: str  # "ok" | "install" | "upgrade" | "keep" (protected) | "skip" (marker false)
    reason: str

    @property
    def name(self) -> str:
        return self.requirement.name

    @property
    def needs_pip(self) -> bool:
        return self.action in ("install", "upgrade")


def parse_requirements(source: str | os.PathLike | Iterable[str], _seen: Optional[set] = None) -> list[Requirement]:
    """Requirements from a file path or an iterable of lines; `-r other.txt` is followed.

    A line pip would need options for (`--index-url`, `-e`, URLs) is an error naming file and line:
    the planner cannot compare those with installed versions.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ReproError(f"requirements file not found: {path} (pass --requirements with an existing file)")
        lines, origin, base = path.read_text().splitlines(), str(path), path.parent
    else:
        lines, origin, base = list(source), "<requirements>", Path.cwd()
    seen = _seen if _seen is not None else set()
    out: list[Requirement] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            nested = (base / line.split(None, 1)[1].strip()).resolve()
            if nested not in seen:
                seen.add(nested)
                out += parse_requirements(nested, seen)
            continue
        if line.startswith("-"):
            raise ReproError(f"{origin}:{number}: pip option '{line}' is not supported by the install planner; "
                             "keep only 'name[extras] <version range>' lines")
        try:
            out.append(Requirement(line))
        except InvalidRequirement as e:
            raise ReproError(f"{origin}:{number}: invalid requirement '{line}': {e}") from None
    return out


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan_installs(requirements: Sequence[Requirement],
                  installed: Optional[Mapping[str, Optional[str]] | Callable[[str], Optional[str]]] = None,
                  ) -> list[PlanItem]:
    """One PlanItem per requirement. `installed` (name -> version, for tests) defaults to importlib.metadata."""
    if installed is None:
        lookup = installed_version
    elif callable(installed):
        lookup = installed
    else:
        table = {canonicalize_name(k): v for k, v in installed.items()}
        lookup = lambda n: table.get(canonicalize_name(n))  # noqa: E731
    items = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            items.append(PlanItem(req, None, "skip", f"marker '{req.marker}' is false on this platform"))
            continue
        have = lookup(req.name)
        protected = canonicalize_name(req.name) in PROTECTED
        if have is None:
            satisfied, why = False, "not installed"
        else:
            try:
                satisfied = req.specifier.contains(Version(have), prereleases=True)
                why = f"{have} is installed" if satisfied else f"{have} is outside '{req.specifier}'"
            except InvalidVersion:
                satisfied, why = False, f"installed version '{have}' is not a valid version"
        if protected:
            note = "kept as installed (the kit never replaces the platform's CUDA build)"
            items.append(PlanItem(req, have, "keep", note if satisfied else f"WARNING: {why}; {note}"))
        elif satisfied:
            items.append(PlanItem(req, have, "ok", why))
        else:
            items.append(PlanItem(req, have, "install" if have is None else "upgrade", why))
    return items


def format_plan(items: Sequence[PlanItem]) -> str:
    width = max([len(i.name) for i in items] + [8])
    todo = [i for i in items if i.needs_pip]
    lines = [f"{i.action:8s} {i.name:{width}s} {str(i.requirement.specifier) or '(any)':14s} {i.reason}" for i in items]
    lines.append(f"plan: {len(todo)} to install, {sum(i.action == 'ok' for i in items)} satisfied, "
                 f"{sum(i.action == 'keep' for i in items)} kept, {sum(i.action == 'skip' for i in items)} skipped"
                 + (f": python -m pip install {' '.join(_spec(i) for i in todo)}" if todo else ""))
    return "\n".join(lines)


def warnings_of(items: Sequence[PlanItem]) -> list[str]:
    """The 'kept but out of range' lines, for the report."""
    return [f"{i.name}: {i.reason}" for i in items if i.action == "keep" and i.reason.startswith("WARNING")]


def _spec(item: PlanItem) -> str:
    req = item.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def pip_command(items: Sequence[PlanItem], pip_args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *pip_args, *(_spec(i) for i in items if i.needs_pip)]


def execute_plan(items: Sequence[PlanItem], pip_args: Sequence[str] = (), echo: bool = True) -> list[str]:
    """Run pip for the items that need it; returns the specs installed. A failure raises ReproError."""
    todo = [i for i in items if i.needs_pip]
    if not todo:
        return []
    cmd = pip_command(todo, pip_args)
    if echo:
        print("running: " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    err_tail: collections.deque[str] = collections.deque(maxlen=15)
    reader = threading.Thread(target=lambda: err_tail.extend(proc.stderr), daemon=True)  # drain stderr alongside
    reader.start()
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
    rc = proc.wait()
    reader.join()
    specs = [_spec(i) for i in todo]
    if rc != 0:
        tail = " | ".join(line.rstrip() for line in err_tail if line.strip()) or "(pip printed nothing on stderr)"
        raise ReproError(f"pip install failed (exit {rc}) for {' '.join(specs)}: {tail} -- fix the requirement, "
                         "the network or the package index, then run `python -m steps.step1_install` again")
    importlib.invalidate_caches()
    still = [i for i in plan_installs([i.requirement for i in todo]) if i.needs_pip]
    if still:
        raise ReproError("pip reported success but these are still missing or out of range: "
                         + "; ".join(f"{i.name} ({i.reason})" for i in still)
                         + " -- check that pip installs into this Python: " + sys.executable)
    return specs
