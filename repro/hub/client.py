"""huggingface_hub, whichever release is installed: the few public calls the kit makes, from 0.x to 2.x.

    check_client_version()      # -> "0.36.2"; HubClientError if missing or older than MIN_HUB_VERSION
    meta = file_metadata(url, token=..., timeout=..., endpoint=...)
    except hub_errors("GatedRepoError"): ...

Kaggle and Colab images carry whatever huggingface_hub their transformers pins (4.x pins <1.0, 5.x
takes 1.x), and replacing it breaks transformers, so the kit runs on any release from MIN_HUB_VERSION
on. Between releases the client changed transport (requests in 0.x, httpx in 1.x, httpx2 in 2.x),
moved its errors (`huggingface_hub.utils` -> `huggingface_hub.errors`) and split EntryNotFoundError
(RemoteEntryNotFoundError from 1.0). So this module:

- uses public names only (top level, `huggingface_hub.errors`, `huggingface_hub.utils`), looked up
  with getattr at call time, so a name a release lacks never breaks an import;
- never imports the client's transport: a failure to reach the server is recognised by the package
  that raised it (`is_transport_error`);
- passes only the keyword arguments the installed `get_hf_file_metadata` accepts.

Importing this module imports nothing outside the standard library (step 1 checks the version before
anything is installed). MIN_HUB_VERSION is the oldest release the download tests pass with:
tests/test_hub_versions.py runs them against it and a 1.x release (.ci/run prepares both).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from typing import Any

from repro.errors import ReproError

# Keep equal to requirements.txt's huggingface_hub>= (a test checks). 0.16 and older fail the download
# tests: their hf_hub_url has no `endpoint`, so HF_ENDPOINT set after import would be ignored.
MIN_HUB_VERSION = "0.17.0"

# Packages a client's transport failure can come from (requests 0.x, httpx 1.x, httpx2 2.x and theirs).
_TRANSPORT_PACKAGES = frozenset({"requests", "urllib3", "httpx", "httpcore", "httpx2", "httpcore2", "h11", "h2",
                                 "anyio", "socket", "ssl"})
_ERROR_MODULES = ("huggingface_hub.errors", "huggingface_hub.utils", "huggingface_hub")


class HubClientError(ReproError):
    """huggingface_hub is missing or older than the kit supports."""


def installed_version() -> str | None:
    """The installed huggingface_hub's version, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version("huggingface_hub")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """(0, 36, 2) from "0.36.2", "0.36.2rc1", "1.0.0.dev0"; enough to compare with the lower bound."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)


def check_client_version(version: str | None = "installed") -> str:
    """The installed huggingface_hub version (or `version`, if given), or HubClientError saying what to install."""
    if version == "installed":
        version = installed_version()
    fix = f"pip install 'huggingface_hub>={MIN_HUB_VERSION}'"
    if version is None:
        raise HubClientError(f"huggingface_hub is not installed; run {fix}")
    if _release(version) < _release(MIN_HUB_VERSION):
        raise HubClientError(f"huggingface_hub {version} is older than {MIN_HUB_VERSION}, the oldest release the "
                             f"kit works with; run {fix} (any 0.x, 1.x or 2.x from there on works, so the release "
                             f"your transformers needs can stay)")
    return version


def hub_errors(*names: str) -> tuple[type[BaseException], ...]:
    """The first of `names` the installed client exports publicly, as a 1-tuple; () if none (catches nothing)."""
    for name in names:
        for module_name in _ERROR_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                return (cls,)
    return ()


def is_transport_error(exc: BaseException) -> bool:
    """True for "the server could not be reached" errors of any client release (refused, DNS, TLS, timeout)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any((getattr(c, "__module__", "") or "").partition(".")[0] in _TRANSPORT_PACKAGES
               for c in type(exc).__mro__)


def http_status(exc: BaseException) -> int | str:
    """The HTTP status of a client HTTP error (requests and httpx responses both have status_code)."""
    return getattr(getattr(exc, "response", None), "status_code", None) or "?"


def _accepted(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def file_metadata(url: str, *, token: str | bool, timeout: float, endpoint: str, library_version: str):
    """`get_hf_file_metadata` (a HEAD on /resolve, the CDN redirect not followed), no retries."""
    from huggingface_hub import get_hf_file_metadata

    kwargs = dict(token=token, timeout=timeout, endpoint=endpoint, library_name="repro",
                  library_version=library_version, retry_on_errors=False)
    return get_hf_file_metadata(url, **_accepted(get_hf_file_metadata, kwargs))


def file_url(repo_id: str, filename: str, *, repo_type: str, revision: str, endpoint: str) -> str:
    """The /resolve URL on `endpoint` (read from HF_ENDPOINT now, not when the client was imported)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)


def request_headers(token: str | bool, library_version: str) -> dict[str, str]:
    """The headers the client itself sends (user agent, authorization)."""
    from huggingface_hub.utils import build_hf_headers

    return dict(build_hf_headers(**_accepted(build_hf_headers, dict(token=token, library_name="repro",
                                                                    library_version=library_version))))


def saved_token() -> str | None:
    """The token `hf auth login` / `huggingface-cli login` saved (or a Colab secret), if any."""
    import huggingface_hub

    get_token = getattr(huggingface_hub, "get_token", None)
    if get_token is None and getattr(huggingface_hub, "HfFolder", None) is not None:
        get_token = huggingface_hub.HfFolder.get_token
    return get_token() if get_token is not None else None


def client_offline() -> bool:
    """HF_HUB_OFFLINE as the client read it when it was imported."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def find_in_cache(repo_id: str, filename: str, *, cache_dir, revision: str, repo_type: str) -> Any:
    from huggingface_hub import try_to_load_from_cache

    return try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type)


def repo_folder_name(repo_id: str, repo_type: str) -> str:
    """`models--owner--name`: the cache folder of a repo, as documented for huggingface_hub's cache layout."""
    return "--".join([f"{repo_type}s", *repo_id.split("/")])
