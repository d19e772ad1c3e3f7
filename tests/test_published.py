"""The paper's published checkpoints (issue 26): the table's real sources, and the download path against a real HTTP
server on this machine's loopback (started here) that imitates GitHub's raw path, Google Drive's virus-scan form and
quota page, a truncated transfer, a wrong file and no server at all; the cache, the mirror, and ``--pretrained=paper``
through eval, train and torch.hub. Nothing here reaches outside this machine: the table's URL bases are pointed at
the local server (the real table keeps the real URLs, checked below)."""

import functools
import hashlib
import http.server
import io
import os
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from models import get_model
from models import summary as S
from models.download import MIRROR_ENV, DownloadError, cache_path, fetch
from models.pretrained import build_model, read_checkpoint, state_dict_of

try:  # importable both as a package module and from the tests/ directory
    from tests.fakedata import write_fake_cifar
except ImportError:  # pragma: no cover
    from fakedata import write_fake_cifar

REPO = Path(__file__).resolve().parents[1]
COMMIT = "f044af38186dd6aceb4906d510d6342b6771b90c"
# The issue's facts, measured on the authors' repository at COMMIT (paper row -> file, bytes, sha256).
CIFAR10_FILES = {
    "ResNet32-S8U1": (
        "CIFAR10_ResNet32_S8U1_8.08err.pth",
        1304202,
        "185a6171e02568d493efcff7b3b66e1c373a16272ac5ec06eb2eced6e5fc94e1",
    ),
    "ResNet32-S16U1": (
        "CIFAR10_ResNet32_S16U1_7.43err.pth",
        1680358,
        "b2655776ab427765ef6751c7ad455cf607ef59b0c6a307ecede2fea8e7f66df1",
    ),
    "ResNet32-S16U1*": (
        "CIFAR10_ResNet32_Double_S16U1_6.93err.pth",
        2070667,
        "2b31e2705d2589103740def51f4692aa9cd92545c15cd8d51b3e0ed09695dbee",
    ),
    "ResNet56-S8U1": (
        "CIFAR10_ResNet56_S8U1_7.52err.pth.pth",
        1799211,
        "ef056837ba6e6f7009eb254d32f29afd88dd0b83ec427f99513a4cf511c09d8f",
    ),
    "ResNet56-S16U1": (
        "CIFAR10_ResNet56_S16U1_7.46err.pth.pth",
        2358073,
        "0b42e649f1a52de78e04f20eea89f6faa55affcd3686d79399c349265d894f1e",
    ),
    "ResNet56-S16U1*": (
        "CIFAR10_ResNet56_Double_S16U1_6.30err.pth",
        2751687,
        "889c13b2fad03351233c11b77dc417cf2ccd6d3533ffc1eb25202b27e6f7c38d",
    ),
}
# The Google Drive file ids of the paper's README download links (its three tables).
DRIVE_IDS = {
    ("cifar100", "ResNet34-S8U1"): "1x98ur2Z6HHAaUWKeYPlqrN1VFbySXKqd",
    ("cifar100", "ResNet34-S16U1"): "18ROzpBVNoIcmqMrwOQ8C9-32XuKghaFD",
    ("cifar100", "ResNet34-S32U1"): "1DsYNhRBeqAkDGRZGa7oRXHjC0NU9M_f_",
    ("cifar100", "DenseNet121-S64U4"): "1FeLPbEAkkrT2bZTvnCrNOU3dkJxrp3-D",
    ("cifar100", "ResNeXt50-S16U1"): "1e7UlAOFqN0sMwA4jy6tvAzZsvKYpXA6e",
    ("cifar100", "MobileNetV2-Shared"): "1JjPHAYbEvIjg869ZysPeGI2IAwOoTe58",
    ("cifar10", "ResNet32-S8U1"): "1X-L2JLkENiRkQ17h5bfi7zrVIBj3_yx8",
    ("cifar10", "ResNet32-S16U1"): "1svowDpevZCeOvgMzHSrwwOgBFBu383g-",
    ("cifar10", "ResNet32-S16U1*"): "1lGqQJEjMVr-ruMV61byFAPJVFJwU2xEU",
    ("cifar10", "ResNet56-S8U1"): "1e77A4ALCVgbN2FwB6bE6I-A2tfUKKcV3",
    ("cifar10", "ResNet56-S16U1"): "1QBdflDIqV254P1sKEeLSVGjnHpn-KPGi",
    ("cifar10", "ResNet56-S16U1*"): "1CMtt0vOWQcJXKJ98zfRx00XjOEiZEFAD",
    ("ilsvrc", "ResNet34-S32U1*"): "1LG-dSNjg_VrfimhoDyICU5OGir0tYdyz",
    ("ilsvrc", "ResNet34-S48U1*"): "12pN0JobnfgKKFX0MFNmFJ22BHTojpwIM",
    ("ilsvrc", "MobileNetV2-Shared"): "1EWYOVj0URjc7j93ciYaRONorlPU2v4DX",
}
ROW = "ResNet32-S8U1"  # the row the download tests use: the smallest published model (its params match the paper's)
S8 = {"shared_rank": 8, "unique_rank": 1}


# ---------------------------------------------------------------------------------------------------------------------
# the real table
# ---------------------------------------------------------------------------------------------------------------------


def test_table_has_the_fifteen_published_files_with_their_real_sources():
    published = {(r.dataset, r.row): r for r in S.PAPER_ROWS if r.weights is not None}
    assert set(published) == set(DRIVE_IDS)
    raw = f"https://raw.githubusercontent.com/ssregibility/Net_RL2/{COMMIT}/pretrained/"
    for (dataset, name), row in published.items():
        w = row.weights
        assert w.urls[-1] == f"https://drive.google.com/uc?export=download&id={DRIVE_IDS[dataset, name]}"
        if dataset == "cifar10":
            file, size, sha256 = CIFAR10_FILES[name]
            assert (w.file, w.size, w.sha256) == (file, size, sha256)
            assert w.urls[0] == raw + file and w.browser_url == raw + file and len(w.urls) == 2
        else:
            assert w.sha256 is None and w.size is None and len(w.urls) == 1
            assert w.browser_url == f"https://drive.google.com/file/d/{DRIVE_IDS[dataset, name]}/view"
            assert w.file.endswith(f"_{row.top1_err.rstrip('%')}err.pth")
    assert len({r.weights.file for r in published.values()}) == 15  # one cache file per row
    assert not any(r.weights for r in S.LATER_ROWS)  # the later README's models have no published files


def test_no_other_code_spells_a_checkpoint_url():
    """One table: every published URL is in models/summary.py."""
    hosts = ("githubusercontent", "drive.google", "drive.usercontent", "Net_RL2/")
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts or path == REPO / "models" / "summary.py":
            continue
        text = path.read_text()
        assert not [h for h in hosts if h in text], path


def test_published_row_picks_by_model_and_ranks():
    assert S.published_row("cifar10", "ResNet56_DoubleShared").row == "ResNet56-S16U1*"  # its one row
    assert S.published_row("cifar10", "ResNet32_SingleShared", {"shared_rank": 16}).row == "ResNet32-S16U1"
    assert S.published_row("ilsvrc", "MobileNetV2_Shared", {"shared_rank": 16}).row == "MobileNetV2-Shared"
    with pytest.raises(ValueError, match="several published checkpoints: give the rank flags") as e:
        S.published_row("cifar10", "ResNet32_SingleShared")
    assert "ResNet32-S8U1 (--model=ResNet32_SingleShared --shared_rank=8 --unique_rank=1)" in str(e.value)
    with pytest.raises(ValueError, match="--model=ResNet56_DoubleShared --shared_rank=8 on cifar10 has no published"):
        S.published_row("cifar10", "ResNet56_DoubleShared", {"shared_rank": 8})
    with pytest.raises(ValueError) as e:
        S.published_row("cifar100", "ResNext50_SingleShared", {"shared_rank": 16, "unique_rank": 1})
    assert "ResNeXt50-S16U1 (--model=ResNext50_SingleShared --shared_rank=64 --unique_rank=4)" in str(e.value)
    assert "MobileNetV2-Shared (--model=MobileNetV2_Shared)" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# a local server and files in the authors' format
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache  # legacy files hold storage addresses: each save has other bytes, so each file is made once
def authors_file(name="ResNet32_SingleShared", seed=0, **ranks) -> bytes:
    """A checkpoint as the authors' scripts wrote it (SPEC section 7): four keys, legacy (non-zip) serialisation."""
    torch.manual_seed(seed)
    model = get_model(name, "cifar10", **(ranks or S8))
    sgd = dict(lr=0.001, momentum=0.9, dampening=0, weight_decay=5e-4, nesterov=False)  # SGD's state_dict layout
    sgd["params"] = list(range(len(list(model.parameters()))))
    buffer = io.BytesIO()
    state = {
        "net_state_dict": model.state_dict(),
        "optimizer_state_dict": {"state": {}, "param_groups": [sgd]},
        "acc": torch.tensor(91.92),
        "epoch": 287,
    }
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """``http.server`` on 127.0.0.1 in a thread; ``routes`` maps a request path (with its query) to a handler."""

    def __init__(self):
        self.routes, self.requests = {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                route = outer.routes.get(self.path) or outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, body: bytes, kind="application/octet-stream", length=None):
    handler.send_response(200)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes, kind="application/octet-stream"):
    return lambda h: send(h, body, kind)


def truncated(body: bytes):
    """Announces the whole file, sends half of it, and closes the connection."""

    def route(h):
        h.close_connection = True
        send(h, body[: len(body) // 2], length=len(body))

    return route


QUOTA_PAGE = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body><p>Too many users have "
    b"viewed or downloaded this file recently. Please try accessing the file again later.</p></body></html>"
)


def virus_scan_page(action: str, file_id: str, uuid: str) -> bytes:
    """Drive's answer for a large file: a form whose hidden fields must be submitted to get the file."""
    return (
        "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
        "<p>Google Drive can't scan this file for viruses.</p>"
        f'<form id="download-form" action="{action}" method="get">'
        '<input type="submit" id="uc-download-link" value="Download anyway"/>'
        f'<input type="hidden" name="id" value="{file_id}"><input type="hidden" name="export" value="download">'
        f'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="{uuid}">'
        "</form></body></html>"
    ).encode()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def table(server, tmp_path, monkeypatch):
    """The table's URL bases on the local server (same paths as the real hosts); TORCH_HOME in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.setattr(S, "GITHUB_RAW", f"{server.url}/ssregibility/Net_RL2/{COMMIT}/pretrained/")
    monkeypatch.setattr(S, "DRIVE_DOWNLOAD", f"{server.url}/uc?export=download&id=")
    monkeypatch.setattr(S, "DRIVE_VIEW", f"{server.url}/file/d/{{}}/view")
    return tmp_path / "torch" / "hub" / "checkpoints"


def set_row(monkeypatch, name=ROW, **weights):
    """Row ``name`` of the table with other ``weights`` fields (the test file's hash: the real one cannot be made)."""
    rows = list(S.PAPER_ROWS)
    i = next(i for i, r in enumerate(rows) if (r.dataset, r.row) == ("cifar10", name))
    rows[i] = rows[i]._replace(weights=rows[i].weights._replace(**weights))
    monkeypatch.setattr(S, "PAPER_ROWS", tuple(rows))
    return rows[i]


def github_path(file: str) -> str:
    return f"/ssregibility/Net_RL2/{COMMIT}/pretrained/{file}"


def drive_dance(server, file_id: str, body: bytes):
    """Drive's two steps: /uc answers the virus-scan form, whose submission (all four fields) gets the file."""
    uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    server.routes[f"/uc?export=download&id={file_id}"] = serve(
        virus_scan_page(f"{server.url}/download", file_id, uuid), "text/html; charset=utf-8"
    )

    def download(h):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query))
        if query == {"id": file_id, "export": "download", "confirm": "t", "uuid": uuid}:
            send(h, body)
        else:
            send(h, b"<html><title>Bad request</title></html>", "text/html")

    server.routes["/download"] = download


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------------------------------


def test_github_download_is_checked_cached_and_used_without_network(server, table, monkeypatch):
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    server.routes[github_path(row.weights.file)] = serve(body)
    path = fetch(row)
    assert path == str(table / "CIFAR10_ResNet32_S8U1_8.08err.pth") == cache_path(row)
    assert Path(path).read_bytes() == body and leftovers(table) == [row.weights.file]  # no temporary file, no record
    assert server.requests == [github_path(row.weights.file)]  # the first URL delivered: Drive was not asked
    loaded = read_checkpoint(path)
    assert loaded["epoch"] == 287 and set(loaded) == {"net_state_dict", "optimizer_state_dict", "acc", "epoch"}
    server.close()  # the cached file is used without the network
    assert fetch(row) == path and len(server.requests) == 1


def test_drive_virus_scan_form_is_followed_and_the_first_hash_recorded(server, table, monkeypatch):
    body = authors_file()
    row = set_row(monkeypatch, on_github=False, sha256=None, size=None)
    drive_dance(server, row.weights.drive_id, body)
    path = fetch(row)
    assert Path(path).read_bytes() == body
    assert [p.split("?")[0] for p in server.requests] == ["/uc", "/download"]
    assert Path(path + ".sha256").read_text().split() == [sha256(body), row.weights.file]
    # later uses check the recorded hash: a changed file is removed, with one line naming both hashes
    Path(path).write_bytes(authors_file(seed=1))
    with pytest.raises(DownloadError) as e:
        fetch(row)
    message = str(e.value)
    assert sha256(body) in message and sha256(authors_file(seed=1)) in message and "\n" not in message
    assert not Path(path).exists() and len(server.requests) == 2
    # downloaded again, the same file passes the recorded hash
    assert fetch(row) == path and Path(path).read_bytes() == body


def test_unknown_hash_file_that_is_not_the_rows_model_is_refused(server, table, monkeypatch):
    row = set_row(monkeypatch, on_github=False, sha256=None, size=None)
    wrong = authors_file(shared_rank=16, unique_rank=1)  # the S16U1 row's model, served for S8U1
    drive_dance(server, row.weights.drive_id, wrong)
    with pytest.raises(
        DownloadError, match=r"is not the published ResNet32-S8U1 \(cifar10\).*shared_rank=16, unique_rank=1"
    ):
        fetch(row)
    assert leftovers(table) == []  # neither the file nor a record
    # a file put there by hand is checked the same way
    table.mkdir(parents=True, exist_ok=True)
    (table / row.weights.file).write_bytes(wrong)
    with pytest.raises(DownloadError, match="is not the published ResNet32-S8U1"):
        fetch(row)
    assert leftovers(table) == []


def test_unknown_hash_file_needs_the_rows_parameter_count(server, table, monkeypatch):
    """ResNet32-S16U1* is 245,642 parameters (0.25M) where the paper prints 0.24M: without a known hash it fails."""
    row = set_row(monkeypatch, "ResNet32-S16U1*", on_github=False, sha256=None, size=None)
    drive_dance(server, row.weights.drive_id, authors_file("ResNet32_DoubleShared", shared_rank=16, unique_rank=1))
    with pytest.raises(DownloadError, match="holds 0.25M parameters, not the 0.24M of the published ResNet32-S16U1"):
        fetch(row)
    assert leftovers(table) == []


def test_quota_page_is_never_saved(server, table, monkeypatch):
    row = set_row(monkeypatch, on_github=False, sha256=None, size=None)
    server.routes[f"/uc?export=download&id={row.weights.drive_id}"] = serve(QUOTA_PAGE, "text/html")
    with pytest.raises(DownloadError) as e:
        fetch(row)
    message = str(e.value)
    assert "answered with a web page, not the file: its download quota is exceeded" in message
    assert f"{server.url}/file/d/{row.weights.drive_id}/view" in message  # the browser link
    assert f"put it at {table / row.weights.file}" in message and "\n" not in message
    assert leftovers(table) == []


def test_web_page_after_the_form_is_never_saved(server, table, monkeypatch):
    """The form submitted, Drive still answers a page (here: a sign-in page) instead of the file."""
    row = set_row(monkeypatch, on_github=False, sha256=None, size=None)
    drive_dance(server, row.weights.drive_id, b"")
    server.routes["/download"] = serve(b"<html><title>Sign in - Google Accounts</title>Sign in</html>", "text/html")
    with pytest.raises(DownloadError, match="form with a web page, not the file: it needs permission"):
        fetch(row)
    assert leftovers(table) == []


def test_truncated_transfer_leaves_nothing(server, table, monkeypatch):
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    server.routes[github_path(row.weights.file)] = truncated(body)
    server.routes[f"/uc?export=download&id={row.weights.drive_id}"] = truncated(body)
    with pytest.raises(DownloadError) as e:
        fetch(row)
    assert "127.0.0.1" in str(e.value) and f"put it at {table / row.weights.file}" in str(e.value)
    assert leftovers(table) == []  # no partial file under the cache name or a temporary one
    assert len(server.requests) == 2  # GitHub, then Drive


def test_wrong_hash_is_refused_and_removed(server, table, monkeypatch):
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    other = authors_file(seed=1)
    server.routes[github_path(row.weights.file)] = serve(other)
    with pytest.raises(DownloadError) as e:
        fetch(row)
    assert f"has sha256 {sha256(other)}, not the published {sha256(body)} of ResNet32-S8U1" in str(e.value)
    assert leftovers(table) == []
    # a cached file with the wrong hash is removed
    table.mkdir(parents=True, exist_ok=True)
    (table / row.weights.file).write_bytes(other)
    with pytest.raises(DownloadError, match="the file was removed"):
        fetch(row)
    assert leftovers(table) == [] and len(server.requests) == 1


def test_the_real_hash_refuses_any_other_file(server, table, monkeypatch):
    """The table's own sha256 (not a test's): a file that is not the authors' exact one is refused."""
    row = next(r for r in S.PAPER_ROWS if r.row == ROW)
    server.routes[github_path(row.weights.file)] = serve(authors_file())
    with pytest.raises(DownloadError, match=f"not the published {CIFAR10_FILES[ROW][2]}"):
        fetch(row)


def test_no_server_is_one_line_with_the_browser_link_and_the_cache_path(table, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(S, "GITHUB_RAW", f"http://127.0.0.1:{port}/ssregibility/Net_RL2/{COMMIT}/pretrained/")
    monkeypatch.setattr(S, "DRIVE_DOWNLOAD", f"http://127.0.0.1:{port}/uc?export=download&id=")
    row = next(r for r in S.PAPER_ROWS if r.row == ROW)
    with pytest.raises(DownloadError) as e:
        fetch(row)
    message = str(e.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port} (") and "\n" not in message
    assert f"in a browser from http://127.0.0.1:{port}/ssregibility/Net_RL2/{COMMIT}/pretrained/" in message
    assert message.endswith(f"and put it at {table / row.weights.file}")
    assert leftovers(table) == []


def test_unwritable_cache_is_one_line(published, tmp_path, monkeypatch):
    row, _ = published
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "not_a_folder"))
    with pytest.raises(DownloadError, match=r"cannot write .*not_a_folder/hub/checkpoints/.*set TORCH_HOME"):
        fetch(row)


def test_mirror_serves_every_file_with_the_same_checks(server, table, monkeypatch):
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    monkeypatch.setenv(MIRROR_ENV, f"{server.url}/lab/checkpoints/")
    server.routes[f"/lab/checkpoints/{row.weights.file}"] = serve(authors_file(seed=1))
    with pytest.raises(DownloadError, match="not the published"):
        fetch(row)
    server.routes[f"/lab/checkpoints/{row.weights.file}"] = serve(body)
    assert Path(fetch(row)).read_bytes() == body
    assert server.requests == [f"/lab/checkpoints/{row.weights.file}"] * 2  # never the table's URLs


def test_progress_bar_on_a_terminal_only(server, table, monkeypatch, capsys):
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    server.routes[github_path(row.weights.file)] = serve(body)
    fetch(row)
    err = capsys.readouterr().err
    assert "\r" not in err and f"Downloading {server.url}" in err
    os.remove(cache_path(row))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    fetch(row)
    mb = f"{len(body) / 1e6:.1f}"
    assert f"\r{row.weights.file}: {mb}/{mb} MB (100%)\n" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# one flag: eval, train, hub
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def published(server, table, monkeypatch):
    """ResNet32-S8U1 served by the local GitHub, with the test file's hash in the table."""
    body = authors_file()
    row = set_row(monkeypatch, sha256=sha256(body), size=len(body))
    server.routes[github_path(row.weights.file)] = serve(body)
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    return row, body


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root, "cifar10", n_train=16, n_test=16, seed=0)
    return str(root)


def test_eval_pretrained_paper(published, cifar10, capsys, one_thread):
    from tests.test_scripts import json_line
    from utils import cli

    row, _ = published
    flags = [f"--dataset_path={cifar10}", "--device=cpu", "--num_workers=0", "--batch_size=16"]
    assert (
        cli.eval_main("cifar10", ["--pretrained=paper", "--model=ResNet32_SingleShared", "--shared_rank=8", *flags])
        == 0
    )
    out = capsys.readouterr().out
    result = json_line(out)
    assert result["checkpoint"] == cache_path(row) and result["model_kwargs"] == S8
    assert "Compare: paper row ResNet32-S8U1:" in out
    assert cli.eval_main("cifar10", [f"--pretrained={cache_path(row)}", "--model=ResNet32_SingleShared", *flags]) == 0
    by_path = json_line(capsys.readouterr().out)
    assert (by_path["top1"], by_path["loss"]) == (result["top1"], result["loss"])  # the same file was evaluated


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model=ResNet32_SingleShared"], "has several published checkpoints: give the rank flags"),
        (["--model=ResNet56_DoubleShared", "--shared_rank=8"], "has no published checkpoint"),
        (["--model=ResNet20"], "the published cifar10 rows are ResNet32-S8U1 (--model=ResNet32_SingleShared"),
    ],
)
def test_eval_pretrained_paper_without_a_row_is_status_2(argv, needle, capsys, table):
    from utils import cli

    with pytest.raises(SystemExit) as e:
        cli.parse_eval_args("cifar10", ["--pretrained=paper", *argv], prog="eval_cifar10.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1
    assert "ResNet56-S16U1* (--model=ResNet56_DoubleShared --shared_rank=16 --unique_rank=1)" in err


def test_eval_pretrained_paper_defaults_to_the_models_one_row(table):
    from utils import cli

    args = cli.parse_eval_args("cifar10", ["--pretrained=paper"], prog="eval_cifar10.py")
    assert (args.model, args.shared_rank, args.unique_rank, args.published) == (
        "ResNet56_DoubleShared",
        16,
        1,
        "ResNet56-S16U1*",
    )
    assert args.pretrained == str(table / "CIFAR10_ResNet56_Double_S16U1_6.30err.pth")


@pytest.mark.slow
def test_train_pretrained_paper_fine_tunes_from_it(published, cifar10, tmp_path, capsys, one_thread):
    from utils import cli

    row, body = published
    argv = ["--pretrained=paper", "--model=ResNet32_SingleShared", "--shared_rank=8", "--unique_rank=1"]
    argv += ["--epochs=1", "--lr=0", "--batch_size=16", f"--dataset_path={cifar10}", f"--output_dir={tmp_path / 'o'}"]
    assert cli.train_main("cifar10", [*argv, "--device=cpu", "--num_workers=0"]) == 0
    assert f"Starting from {cache_path(row)}" in capsys.readouterr().out
    trained = state_dict_of(read_checkpoint(tmp_path / "o" / "CIFAR10-ResNet32_SingleShared-S8-U1-L10-0-last.pth"))
    start = state_dict_of(torch.load(io.BytesIO(body), weights_only=True))
    convs = [k for k in start if "conv" in k and k.endswith("weight")]
    assert convs and all(torch.equal(trained[k], start[k]) for k in convs)  # lr=0: the published weights, unchanged


def test_train_pretrained_paper_without_a_row_is_status_2(capsys, table):
    from utils import cli

    argv = ["--pretrained=paper", "--model=ResNext50_SingleShared"]
    with pytest.raises(SystemExit) as e:  # the authors' script defaults 16/1, given: no row (and no model) has them
        cli.parse_train_args("cifar100", [*argv, "--shared_rank=16", "--unique_rank=1"], prog="t.py")
    assert e.value.code == 2 and "ResNeXt50-S16U1 (--model=ResNext50_SingleShared --shared_rank=64" in (
        capsys.readouterr().err
    )
    resnext = cli.parse_train_args("cifar100", argv, prog="t.py")  # no rank flags: the paper's row, 64/4 (issue 24)
    assert resnext.published == "ResNeXt50-S16U1" and (resnext.shared_rank, resnext.unique_rank) == (64, 4)
    args = cli.parse_train_args("cifar10", ["--pretrained=paper"], prog="t.py")  # the default model and ranks
    assert args.published == "ResNet56-S16U1*" and args.pretrained.endswith("CIFAR10_ResNet56_Double_S16U1_6.30err.pth")


def test_hub_pretrained_true(published):
    row, body = published
    model = torch.hub.load(
        str(REPO), "ResNet32_SingleShared", source="local", dataset="cifar10", shared_rank=8, pretrained=True
    )
    start = state_dict_of(torch.load(io.BytesIO(body), weights_only=True))
    assert model.training and all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    same = build_model("ResNet32_SingleShared", shared_rank=8, pretrained=True)  # the name fixes the dataset
    assert all(torch.equal(v, start[k]) for k, v in same.state_dict().items())
    with pytest.raises(ValueError, match="several published checkpoints"):
        build_model("ResNet32_SingleShared", pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        build_model("ResNet32_SingleShared", shared_rank=8, pretrained=True, checkpoint=cache_path(row))


def test_readme_evaluation_starts_with_the_one_flag_form_and_lists_the_fifteen_files(table, monkeypatch):
    import re
    import shlex

    from utils import cli

    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    section = (REPO / "README.md").read_text().split("\n## Evaluation\n", 1)[1].split("\n### ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].splitlines()
    assert commands[0] == "python3 eval_cifar10.py --pretrained=paper --model=ResNet56_DoubleShared"  # the issue's
    for line in commands:
        argv = shlex.split(line.replace("<path_to_dataset>", "/data"))
        dataset = argv[1].removeprefix("eval_").removesuffix(".py")
        assert cli.parse_eval_args(dataset, argv[2:], prog=argv[1]).published is not None, line
    for file, _, _ in CIFAR10_FILES.values():
        assert f"`{file}`" in section
    assert len(re.findall(r"^\| (CIFAR-10|CIFAR-100|ILSVRC) \|.*\| `[^`]+\.pth` \|", section, flags=re.M)) == 15
    assert "SHARED_BASES_MIRROR" in section and "<torch.hub.get_dir()>/checkpoints/<file>" in section
