"""Install only what is missing: compare requirements.txt ranges with what is installed.

Kaggle and Colab ship a torch built for their GPUs and CUDA; `pip install -r requirements.txt`
can silently replace it with a wheel for another CUDA. So the kit never installs torch,
torchvision or torchaudio: they are reported as kept, with a warning when out of range.
A failed pip run is an error carrying pip's own message, never a warning.

A direct-URL requirement (`name @ https://...`, `name @ git+https://...@rev`) goes to pip exactly as
written, never as a bare `name` (that would fetch whatever the package index serves under that name).
It counts as satisfied only when the installed distribution's `direct_url.json` (PEP 610) says it came
from that URL; one installed from an index is replaced (`replace`), even at the same version.

    items = plan_installs(parse_requirements("requirements.txt"))
    print(format_plan(items))
    execute_plan(items)                 # python -m pip install <missing or out-of-range specs>
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

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
    # "ok" | "install" | "upgrade" | "replace" (a URL requirement installed from elsewhere)
    # | "keep" (protected) | "skip" (marker false)
    action: str
    reason: str

    @property
    def name(self) -> str:
        return self.requirement.name

    @property
    def needs_pip(self) -> bool:
        return self.action in ("install", "upgrade", "replace")


def parse_requirements(source: str | os.PathLike | Iterable[str], _seen: Optional[set] = None) -> list[Requirement]:
    """Requirements from a file path or an iterable of lines; `-r other.txt` is followed.

    A line pip would need options for (`--index-url`, `-e`, a bare URL) is an error naming file and
    line: the planner cannot compare those with installed versions. `name @ URL` lines are kept.
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


def installed_origin(name: str, path: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The installed distribution's `direct_url.json` (PEP 610) as a dict; None when it has none
    (installed from an index), is not installed, or the record is unreadable."""
    try:
        found = (next(iter(importlib.metadata.distributions(name=name, path=list(path)))) if path is not None
                 else importlib.metadata.distribution(name))
    except (StopIteration, importlib.metadata.PackageNotFoundError):
        return None
    text = found.read_text("direct_url.json")
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("url"), str) else None


def _source_key(url: str, vcs: str = "") -> tuple:
    """What identifies a source: vcs, scheme, host (credentials dropped), path, query, subdirectory."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if not vcs and "+" in scheme:
        vcs, scheme = scheme.split("+", 1)
    path = parts.path
    if vcs and "@" in path.rsplit("/", 1)[-1]:
        path = path.rsplit("@", 1)[0]  # `repo.git@rev`: the revision is compared separately
    fragment = dict(f.split("=", 1) for f in parts.fragment.split("&") if "=" in f)
    return (vcs, scheme.lower(), parts.netloc.rsplit("@", 1)[-1].lower(), path, parts.query,
            fragment.get("subdirectory", ""))


def origin_matches(url: str, record: Optional[dict]) -> tuple[bool, str]:
    """Does a PEP 610 `direct_url.json` record say the distribution came from `url`? (match, why)."""
    if record is None:
        return False, "installed from a package index, not from the URL"
    vcs_info = record.get("vcs_info") if isinstance(record.get("vcs_info"), dict) else {}
    vcs = vcs_info.get("vcs", "")
    # the record keeps the VCS name, revision and subdirectory in their own fields, not in the URL
    recorded = _source_key(record["url"], vcs)[:5] + (record.get("subdirectory") or "",)
    came_from = f"installed from {vcs + '+' if vcs else ''}{record['url']}"
    if _source_key(url) != recorded:
        return False, f"{came_from}, not from the URL"
    parts = urlsplit(url)
    if "+" in parts.scheme and "@" in parts.path.rsplit("/", 1)[-1]:
        rev = parts.path.rsplit("@", 1)[1]
        if rev not in (vcs_info.get("requested_revision"), vcs_info.get("commit_id")):
            return False, f"{came_from} at revision {vcs_info.get('commit_id')}, not {rev}"
    archive = record.get("archive_info") if isinstance(record.get("archive_info"), dict) else {}
    hashes = dict(archive.get("hashes") or {})
    if isinstance(archive.get("hash"), str) and "=" in archive["hash"]:
        hashes.setdefault(*archive["hash"].split("=", 1))
    for item in parts.fragment.split("&"):
        algo, _, value = item.partition("=")
        if algo in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512") and hashes.get(algo) != value:
            return False, f"{came_from} with {algo} {hashes.get(algo)}, not {value}"
    return True, came_from


def plan_installs(requirements: Sequence[Requirement],
                  installed: Optional[Mapping[str, Optional[str]] | Callable[[str], Optional[str]]] = None,
                  path: Optional[Sequence[str]] = None) -> list[PlanItem]:
    """One PlanItem per requirement. `installed` (name -> version, for tests) defaults to importlib.metadata;
    `path` looks for installed distributions in these folders instead of sys.path."""
    if path is not None:
        lookup = lambda n: next((d.version for d in importlib.metadata.distributions(name=n, path=list(path))),  # noqa: E731
                                None)
    elif installed is None:
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
        action_if_not = "install" if have is None else "upgrade"
        if have is None:
            satisfied, why = False, "not installed"
        elif req.url:
            # PEP 508 direct reference: only the distribution that came from this URL satisfies it
            from_url = installed_origin(req.name, path) if installed is None or path is not None else None
            satisfied, why = origin_matches(req.url, from_url)
            why = f"{have} {why}"
            action_if_not = "replace"
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
            items.append(PlanItem(req, have, action_if_not, why))
    return items


def format_plan(items: Sequence[PlanItem]) -> str:
    width = max([len(i.name) for i in items] + [8])
    todo = [i for i in items if i.needs_pip]
    lines = [f"{i.action:8s} {i.name:{width}s} {_wanted(i.requirement):14s} {i.reason}" for i in items]
    lines.append(f"plan: {len(todo)} to install, {sum(i.action == 'ok' for i in items)} satisfied, "
                 f"{sum(i.action == 'keep' for i in items)} kept, {sum(i.action == 'skip' for i in items)} skipped"
                 + (f": python -m pip install {shlex.join(_spec(i) for i in todo)}" if todo else ""))
    return "\n".join(lines)


def warnings_of(items: Sequence[PlanItem]) -> list[str]:
    """The 'kept but out of range' lines, for the report."""
    return [f"{i.name}: {i.reason}" for i in items if i.action == "keep" and i.reason.startswith("WARNING")]


def _wanted(req: Requirement) -> str:
    return f"@ {req.url}" if req.url else (str(req.specifier) or "(any)")


def _spec(item: PlanItem) -> str:
    """The requirement for pip's command line; a direct URL exactly as written."""
    req = item.requirement
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras} @ {req.url}" if req.url else f"{req.name}{extras}{req.specifier}"


def pip_command(items: Sequence[PlanItem], pip_args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *pip_args, *(_spec(i) for i in items if i.needs_pip)]


def _run_pip(cmd: list[str], specs: list[str], echo: bool) -> None:
    if echo:
        print("running: " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    err_tail: collections.deque[str] = collections.deque(maxlen=15)
    reader = threading.Thread(target=lambda: err_tail.extend(proc.stderr), daemon=True)  # drain stderr alongside
    reader.start()
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
    rc = proc.wait()
    reader.join()
    if rc != 0:
        tail = " | ".join(line.rstrip() for line in err_tail if line.strip()) or "(pip printed nothing on stderr)"
        raise ReproError(f"pip install failed (exit {rc}) for {' '.join(specs)}: {tail} -- fix the requirement, "
                         "the network or the package index, then run `python -m steps.step1_install` again")


def execute_plan(items: Sequence[PlanItem], pip_args: Sequence[str] = (), echo: bool = True) -> list[str]:
    """Run pip for the items that need it; returns the specs installed. A failure raises ReproError."""
    todo = [i for i in items if i.needs_pip]
    if not todo:
        return []
    specs = [_spec(i) for i in todo]
    _run_pip(pip_command(todo, pip_args), specs, echo)
    importlib.invalidate_caches()
    # pip keeps an index-installed distribution when a URL requirement has the same version
    # ("already satisfied"): put the URL's own build in its place, its dependencies are in already.
    stale = [i for i in plan_installs([i.requirement for i in todo]) if i.action == "replace"]
    if stale:
        cmd = [sys.executable, "-m", "pip", "install", *pip_args, "--force-reinstall", "--no-deps",
               *(_spec(i) for i in stale)]
        _run_pip(cmd, [_spec(i) for i in stale], echo)
        importlib.invalidate_caches()
    still = [i for i in plan_installs([i.requirement for i in todo]) if i.needs_pip]
    if still:
        raise ReproError("pip reported success but these are still missing, out of range or from another source: "
                         + "; ".join(f"{i.name} ({i.reason})" for i in still)
                         + " -- check that pip installs into this Python: " + sys.executable)
    return specs
