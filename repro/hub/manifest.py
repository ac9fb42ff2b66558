"""The asset manifest (`configs/assets.yaml`): which files the kit uses and where they live.

    m = load_manifest()                       # configs/assets.yaml of this checkout
    m.select(["vavae-f16d32"])                # -> [AssetSpec(...)], unknown names are an error
    m.select(["imagenet256-latents"])         # a `group` name selects every member (kit: issue 16)
    m.active_search_dirs()                    # folders to look in before fetching

Every problem is a ReproError naming the manifest file, the entry and the key at fault.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import yaml

from repro import resources
from repro.errors import ReproError
from repro.hub.untrusted import plain_segments

DEFAULT_MANIFEST = resources.configs_dir() / "assets.yaml"  # the checkout's, or the one `pip install` ships

_TOP_KEYS = ("version", "search_dirs", "assets")
_ASSET_KEYS = ("repo_id", "filename", "local_name", "revision", "repo_type", "url", "size", "sha256", "approx_size",
               "description", "group", "licence")
_SEARCH_KEYS = ("path", "when")
# Platforms a search dir can be limited to, with how each is detected (besides the folder existing).
_PLATFORM_ENV = {"kaggle": "KAGGLE_KERNEL_RUN_TYPE", "colab": "COLAB_RELEASE_TAG"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class AssetSpec:
    """One manifest entry: a Hugging Face file (`repo_id`) or a plain URL (`url`)."""

    name: str
    filename: str
    description: str
    approx_size: int
    repo_id: str | None = None
    revision: str = "main"
    repo_type: str = "model"
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    group: str | None = None  # kit (issue 16): fetched only when named, by its own or the group's name
    licence: str | None = None  # kit: the file's licence, said when step 2 fetches a restricted one
    local_name: str | None = None  # kit: its name under --dest / in search folders when not `filename`'s

    @property
    def is_hf(self) -> bool:
        return self.repo_id is not None

    @property
    def local_file(self) -> str:
        """The file's path under --dest and the plain-URL cache: `local_name`, else `filename` as it is.
        (The Hugging Face cache always keeps `filename`, the hub's own path.)"""
        return self.local_name or self.filename

    @property
    def search_names(self) -> tuple[str, ...]:
        """The names a search folder is searched for: the local file's own name, then the hub's (when it differs)."""
        return tuple(dict.fromkeys((Path(self.local_file).name, Path(self.filename).name)))

    @property
    def where(self) -> str:
        """`repo@revision, file F` or the URL: what every error message names."""
        if self.is_hf:
            return f"{self.repo_id}@{self.revision}, file {self.filename}"
        return f"{self.url}"


@dataclass(frozen=True)
class SearchDir:
    path: Path
    when: str | None = None  # None: always; "kaggle"/"colab": only on that platform

    def active(self, environ: Mapping[str, str] = os.environ) -> bool:
        if self.when is None:
            return True
        return _PLATFORM_ENV[self.when] in environ or self.path.is_dir()


@dataclass(frozen=True)
class Manifest:
    path: Path
    assets: dict[str, AssetSpec]
    search_dirs: tuple[SearchDir, ...] = ()

    def select(self, names: Iterable[str] | None = None) -> list[AssetSpec]:
        """The named assets (a group name stands for all its members); None: every asset outside a group."""
        if names is None:
            return [a for a in self.assets.values() if a.group is None]
        groups: dict[str, list[AssetSpec]] = {}
        for a in self.assets.values():
            if a.group is not None:
                groups.setdefault(a.group, []).append(a)
        out = []
        for name in names:
            if name not in self.assets and name not in groups:
                valid = [*self.assets, *groups]
                raise ReproError(f"unknown asset {name!r}{_nearest(name, valid)} in {self.path}; "
                                 f"valid names: {', '.join(valid)}")
            for spec in groups.get(name, [self.assets.get(name)]):
                if spec is not None and spec not in out:
                    out.append(spec)
        return out

    def active_search_dirs(self, environ: Mapping[str, str] = os.environ) -> list[Path]:
        return [d.path for d in self.search_dirs if d.active(environ)]


def parse_size(value: Any, where: str) -> int:
    """Bytes from an int or a string like "2 GB", "100 MB", "3.5GiB" (decimal and binary units)."""
    if isinstance(value, bool):
        raise ReproError(f"{where}: expected a size (bytes or e.g. '2 GB'), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ReproError(f"{where}: size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and (m.group(2).upper() or "B") in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper() or "B"])
    raise ReproError(f"{where}: expected a size (bytes or e.g. '2 GB', '100 MB'), got {value!r}")


def _nearest(key: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    # a name the typed one begins (vavae -> vavae-f16d32) before the closest spelling (vavae ~ vfm-vae)
    close = [v for v in valid if v.startswith(key)][:1] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: Mapping, valid: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in valid:
            raise ReproError(f"{where}: unknown key {key!r}{_nearest(str(key), valid)}; "
                             f"valid keys: {', '.join(valid)}")


def _parse_asset(name: str, raw: Any, src: Path) -> AssetSpec:
    where = f"{src}: asset {name!r}"
    if not isinstance(raw, Mapping):
        raise ReproError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    _check_keys(raw, _ASSET_KEYS, where)
    repo_id, url = raw.get("repo_id"), raw.get("url")
    if (repo_id is None) == (url is None):
        raise ReproError(f"{where}: give exactly one of 'repo_id' (Hugging Face file) or 'url' (plain URL)")
    for key in ("repo_id", "url", "filename", "local_name", "revision", "repo_type", "sha256", "description",
                "licence"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ReproError(f"{where}: key {key!r} must be a string, got {raw[key]!r}")
    if repo_id is not None and not _REPO_ID.match(repo_id):
        raise ReproError(f"{where}: key 'repo_id' must look like 'owner/name', got {repo_id!r}")
    if url is not None and urlparse(url).scheme not in ("http", "https"):
        raise ReproError(f"{where}: key 'url' must be an http(s) URL, got {url!r}")
    filename = raw.get("filename") or (Path(urlparse(url).path).name if url else None)
    if not filename:
        raise ReproError(f"{where}: missing key 'filename' (the file's name in the repo)")
    if url is not None and ("/" in filename or filename.startswith(".")):
        raise ReproError(f"{where}: key 'filename' must be a plain file name, got {filename!r}")
    # Both become cache paths (snapshots/<commit>/<filename>, refs/<revision>): no way out of the cache.
    if not plain_segments(filename):
        raise ReproError(f"{where}: key 'filename' must be a relative path without '.', '..' or empty parts, "
                         f"got {filename!r}")
    # A path built under --dest from the manifest: one plain file name, so it cannot leave that folder.
    local_name = raw.get("local_name")
    if local_name is not None and (not plain_segments(local_name) or "/" in local_name
                                   or local_name.startswith(".") or local_name.endswith(".part")):
        raise ReproError(f"{where}: key 'local_name' must be a plain file name (no '/', '\\', '..', no leading "
                         f"'.', not ending in '.part'), the name the file takes under --dest; got {local_name!r}")
    if raw.get("revision") is not None and not plain_segments(raw["revision"]):
        raise ReproError(f"{where}: key 'revision' must be a branch, tag or commit id (no '..' or empty parts), "
                         f"got {raw['revision']!r}")
    sha = raw.get("sha256")
    if sha is not None:
        sha = sha.lower()
        if not _SHA256.match(sha):
            raise ReproError(f"{where}: key 'sha256' must be 64 hex digits or null, got {raw['sha256']!r}")
    size = None if raw.get("size") is None else parse_size(raw["size"], f"{where}: key 'size'")
    approx = raw.get("approx_size")
    if approx is None and size is None:
        raise ReproError(f"{where}: give 'approx_size' (e.g. '2 GB') for the free-disk check, or an exact 'size'")
    approx = size if approx is None else parse_size(approx, f"{where}: key 'approx_size'")
    repo_type = raw.get("repo_type") or "model"
    if repo_type not in ("model", "dataset", "space"):
        raise ReproError(f"{where}: key 'repo_type' must be model, dataset or space, got {repo_type!r}")
    group = raw.get("group")
    if group is not None and (not isinstance(group, str) or not re.fullmatch(r"[\w.-]+", group)):
        raise ReproError(f"{where}: key 'group' must be a name (letters, digits, '.', '-', '_'), got {group!r}")
    return AssetSpec(name=name, filename=filename, description=raw.get("description") or name,
                     approx_size=approx, repo_id=repo_id, revision=raw.get("revision") or "main",
                     repo_type=repo_type, url=url, size=size, sha256=sha, group=group, licence=raw.get("licence"),
                     local_name=local_name)


def _parse_search_dir(i: int, raw: Any, src: Path) -> SearchDir:
    where = f"{src}: search_dirs[{i}]"
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
        raise ReproError(f"{where}: expected a folder path or {{path: ..., when: kaggle}}, got {raw!r}")
    _check_keys(raw, _SEARCH_KEYS, where)
    when = raw.get("when")
    if when is not None and when not in _PLATFORM_ENV:
        raise ReproError(f"{where}: key 'when' must be one of {', '.join(_PLATFORM_ENV)}, got {when!r}")
    return SearchDir(path=Path(os.path.expandvars(os.path.expanduser(raw["path"]))), when=when)


def manifest_from_dict(data: Any, src: str | os.PathLike = "<manifest>") -> Manifest:
    src = Path(src)
    if not isinstance(data, Mapping):
        raise ReproError(f"{src}: expected a mapping with an 'assets' section, got {type(data).__name__}")
    _check_keys(data, _TOP_KEYS, str(src))
    raw_assets = data.get("assets")
    if not isinstance(raw_assets, Mapping) or not raw_assets:
        raise ReproError(f"{src}: missing or empty 'assets' section")
    assets = {str(name): _parse_asset(str(name), raw, src) for name, raw in raw_assets.items()}
    # --dest (and the plain-URL cache) holds each file at its local path (`local_name`, else `filename`), so two
    # assets must not land on the same one; two sources' `model.safetensors` differ by a `local_name`.
    seen: dict[str, str] = {}
    for spec in assets.values():
        if spec.local_file in seen:
            raise ReproError(f"{src}: assets {seen[spec.local_file]!r} and {spec.name!r} would both be stored as "
                             f"{spec.local_file!r} under --dest; give one of them its own file name with the key "
                             f"'local_name' (e.g. local_name: {spec.name}-{Path(spec.local_file).name})")
        seen[spec.local_file] = spec.name
    for spec in assets.values():  # `a` and `a/b` cannot both be: one would be a file, the other a folder
        parents = Path(spec.local_file).parents
        folder = next((str(f) for f in parents if str(f) in seen), None)
        if folder is not None:
            raise ReproError(f"{src}: asset {seen[folder]!r} would be stored as {folder!r} under --dest, the folder "
                             f"asset {spec.name!r} ({spec.local_file!r}) needs; give one of them another file name "
                             f"with the key 'local_name'")
    clash = sorted({a.group for a in assets.values() if a.group is not None} & set(assets))
    if clash:
        raise ReproError(f"{src}: group {clash[0]!r} has the name of an asset; give the group another name")
    raw_dirs = data.get("search_dirs") or []
    if not isinstance(raw_dirs, list):
        raise ReproError(f"{src}: 'search_dirs' must be a list, got {type(raw_dirs).__name__}")
    dirs = tuple(_parse_search_dir(i, d, src) for i, d in enumerate(raw_dirs))
    return Manifest(path=src, assets=assets, search_dirs=dirs)


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest file (default: `configs/assets.yaml` of this checkout)."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    if not path.is_file():
        raise ReproError(f"asset manifest not found: {path}; pass --manifest FILE or restore configs/assets.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ReproError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return manifest_from_dict(data, path)
