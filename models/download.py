"""The paper's published checkpoints one flag away: a row's file (the table of :mod:`models.summary`) is downloaded
once into ``torch.hub.get_dir()/checkpoints/`` and checked before every use, so a file that is not what the table says
is never loaded.

A known sha256 must match. The Drive-only files have none published: a file is accepted when it loads strictly into
the row's model with the row's parameter count, and the hash it had then is recorded beside it (``<file>.sha256``) and
checked on later uses. ``SHARED_BASES_MIRROR=<base URL>`` fetches ``<base URL>/<file name>`` instead (same checks).
Standard-library HTTP only; downloads are atomic (:mod:`models.atomic`), so an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import torch

from .atomic import atomic_path, atomic_write_bytes
from .pretrained import CheckpointError, error_line, load_model
from .summary import PaperRow, count_params, params_as_printed

MIRROR_ENV = "SHARED_BASES_MIRROR"
_CHUNK = 1 << 16
_PAGE_LIMIT = 1 << 20  # an HTML answer is read this far to see what it says
_TIMEOUT = 60  # seconds without a byte before a connection counts as lost
_HEADERS = {"User-Agent": "shared-bases-checkpoints (python urllib)"}


class DownloadError(CheckpointError):
    """A published checkpoint that could not be fetched or is not the published file; the message says what to do."""


class _Unavailable(Exception):
    """This source did not deliver a file (no network, an HTTP error, a web page, a broken transfer)."""


def cache_path(row: PaperRow) -> str:
    """Where ``row``'s file lives: ``torch.hub.get_dir()/checkpoints/<file name>`` (``TORCH_HOME`` moves it)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", row.weights.file)


def fetch(row: PaperRow, progress: bool | None = None) -> str:
    """The path of ``row``'s checked file, downloaded first unless it is in the cache (then no network is used).
    ``progress``: a progress bar on stderr (default: when stderr is a terminal). DownloadError: one line."""
    path = cache_path(row)
    if os.path.isfile(path):
        _record(path, _check(row, path, path))
        return path
    mirror = os.environ.get(MIRROR_ENV)
    urls = [f"{mirror.rstrip('/')}/{urllib.parse.quote(row.weights.file)}"] if mirror else row.weights.urls
    failures = []
    for url in urls:
        try:
            with atomic_path(path) as tmp:
                _download(url, tmp, path, sys.stderr.isatty() if progress is None else progress)
                new_hash = _check(row, tmp, path)
            _record(path, new_hash)
            return path
        except _Unavailable as e:
            failures.append(str(e))
        except OSError as e:  # the cache, not the network
            raise DownloadError(f"cannot write {path} ({error_line(e)}): set TORCH_HOME to a writable folder") from None
    raise DownloadError(
        f"{'; '.join(failures)}: download {row.weights.file} in a browser from {row.weights.browser_url} and put it "
        f"at {path}"
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _recorded(path: str) -> str | None:
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


def _record(path: str, sha256: str | None) -> None:
    if sha256 is not None:
        atomic_write_bytes(f"{sha256}  {os.path.basename(path)}\n".encode(), path + ".sha256")


def _check(row: PaperRow, file: str, path: str) -> str | None:
    """Refuse ``file`` (to become ``path``) unless it is ``row``'s; removed when refused. Returns the hash to record
    (an unknown-hash file's first acceptance), else None."""
    actual = _sha256(file)
    expected = row.weights.sha256 or _recorded(path)
    if expected is not None:
        if actual != expected:
            os.remove(file)
            whose = "published" if row.weights.sha256 else f"first accepted (recorded in {path}.sha256)"
            raise DownloadError(
                f"{path} has sha256 {actual}, not the {whose} {expected} of {row.row} ({row.dataset}): the file was "
                f"removed; run again to download it again"
            )
        return None
    try:
        model, _ = load_model(file, model=row.model, dataset=row.dataset, **dict(row.ranks))
    except CheckpointError as e:
        os.remove(file)
        raise DownloadError(f"{path} is not the published {row.row} ({row.dataset}), so it was removed: {e}") from None
    params = params_as_printed(count_params(model), row.params)
    if params != row.params:
        os.remove(file)
        raise DownloadError(
            f"{path} holds {params} parameters, not the {row.params} of the published {row.row} ({row.dataset}), "
            f"so it was removed"
        )
    return actual


class _Page(HTMLParser):
    """An HTML answer's title and the hidden fields of its forms."""

    def __init__(self):
        super().__init__()
        self.title, self.forms, self._in_title = "", [], False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in_title = True
        elif tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("type", "").lower() == "hidden" and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _what_the_page_says(page: _Page, text: str) -> str:
    title = " ".join(page.title.split()) or "no title"
    lower = text.lower()
    if "quota" in lower or "too many users" in lower:
        return f"its download quota is exceeded for now ({title!r})"
    if "sign in" in lower or "request access" in lower or "need access" in lower or "permission" in lower:
        return f"it needs permission to download ({title!r})"
    return f"a page this program does not know ({title!r})"


def _download(url: str, tmp: str, path: str, progress: bool) -> None:
    """Stream ``url`` into ``tmp``; Google Drive's virus-scan form (hidden id, export, confirm, uuid) is submitted.
    A web page is never written as the file: _Unavailable says what it was."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    host = urllib.parse.urlsplit(url).netloc
    print(f"Downloading {url} to {path}", file=sys.stderr)
    answer, first = _open(opener, url, host)
    if _is_html(answer, first):
        text = (first + _read(answer, host, _PAGE_LIMIT - len(first))).decode("utf-8", "replace")
        answer.close()
        page = _Page()
        page.feed(text)
        form = next((f for f in page.forms if {"id", "confirm"} <= f[1].keys()), None)
        if form is None:
            raise _Unavailable(f"{host} answered with a web page, not the file: {_what_the_page_says(page, text)}")
        action = urllib.parse.urljoin(answer.url, form[0])
        answer, first = _open(opener, f"{action}?{urllib.parse.urlencode(form[1])}", host)
        if _is_html(answer, first):
            text = (first + _read(answer, host, _PAGE_LIMIT - len(first))).decode("utf-8", "replace")
            answer.close()
            page = _Page()
            page.feed(text)
            raise _Unavailable(
                f"{host} answered its download form with a web page, not the file: {_what_the_page_says(page, text)}"
            )
    with answer, open(tmp, "wb") as f:
        total = int(answer.headers.get("Content-Length") or 0)
        done = 0
        block = first
        while block:
            f.write(block)
            done += len(block)
            if progress:
                of = f"/{total / 1e6:.1f} MB ({100 * done // total}%)" if total else " MB"
                sys.stderr.write(f"\r{os.path.basename(path)}: {done / 1e6:.1f}{of}")
            block = _read(answer, host, _CHUNK)
        if progress:
            sys.stderr.write("\n")
    if total and done != total:
        raise _Unavailable(f"the transfer from {host} stopped after {done} of {total} bytes")


def _open(opener, url: str, host: str):
    """The answer to GET ``url`` and its first bytes."""
    try:
        answer = opener.open(urllib.request.Request(url, headers=_HEADERS), timeout=_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise _Unavailable(f"{host} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise _Unavailable(f"cannot reach {host} ({reason})") from None
    return answer, _read(answer, host, _CHUNK)


def _read(answer, host: str, size: int) -> bytes:
    try:
        return answer.read(size)
    except (OSError, http.client.HTTPException) as e:
        raise _Unavailable(f"the transfer from {host} broke ({type(e).__name__}: {e})") from None


def _is_html(answer, first: bytes) -> bool:
    kind = answer.headers.get("Content-Type", "").lower()
    return kind.startswith("text/html") or first.lstrip()[:14].lower().startswith((b"<!doctype html", b"<html"))
