"""The downloader against a local HTTP server on 127.0.0.1 (no internet here, nor needed)."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fulora.cli import main
from fulora.data.download import download_dataset, fetch, zenodo_files
from fulora.errors import DownloadError


class Server:
    """Serves ``files`` with Range support; can cut the first transfer of a file halfway."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()  # paths whose next full transfer stops halfway
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if self.path in outer.cut and not rng:
                    outer.cut.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


def _zip_release(csv: str, header: str, rows: list[tuple[str, str]], images: str) -> bytes:
    """A zip shaped like a dataset release: a CSV (``header`` + each row's line) and one small
    PNG per row, named by the row's image name, in the folder ``images``."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, (name, _) in enumerate(rows):
            png = io.BytesIO()
            Image.new("L", (20, 16), 40 * i).save(png, format="PNG")
            zf.writestr(f"{images}/{name}.png", png.getvalue())
        zf.writestr(csv, "\r\n".join([header] + [line for _, line in rows]))
    return buffer.getvalue()


def _zip_with_african_layout() -> bytes:
    """The African release: a folder with a cohort CSV and its images."""
    rows = []
    for i, plane in enumerate(["Fetal brain", "Fetal femur", "Fetal abdomen"]):
        name = f"patient00{i + 1}_GHA_plane{i}"
        rows.append((name, f"{i + 1},{plane},1,Ghana,{name}"))
    header = "Patient_num,Plane,Train,Center,Image_name"
    return _zip_release("release/African_planes_database.csv", header, rows, "release")


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    body = bytes(range(256)) * 4000
    server.files["/big.bin"] = body
    server.cut.add("/big.bin")
    dest = tmp_path / "big.bin"
    checksum = "sha256:" + hashlib.sha256(body).hexdigest()
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch(server.url + "/big.bin", dest, checksum=checksum, retries=0, progress=False)
    part = tmp_path / "big.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(body)
    kept = part.stat().st_size
    fetch(server.url + "/big.bin", dest, checksum=checksum, retries=0, progress=False)
    assert dest.read_bytes() == body and not part.exists()
    assert server.requests[-1] == ("/big.bin", f"bytes={kept}-")


def test_retries_resume_within_one_call(server, tmp_path, monkeypatch):
    monkeypatch.setattr("fulora.data.download.time.sleep", lambda s: None)
    body = b"x" * 100_000
    server.files["/f"] = body
    server.cut.add("/f")
    fetch(server.url + "/f", tmp_path / "f", retries=2, progress=False)
    assert (tmp_path / "f").read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]


def test_bad_checksum_is_rejected_and_removed(server, tmp_path):
    server.files["/f"] = b"hello"
    with pytest.raises(DownloadError, match="checksum mismatch .* expected md5:0+, got md5:"):
        fetch(server.url + "/f", tmp_path / "f", checksum="md5:" + "0" * 32, progress=False)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()


def test_http_errors_and_unreachable_hosts(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url + "/missing", tmp_path / "m", progress=False)
    with pytest.raises(DownloadError, match="Downloading needs network access"):
        zenodo_files("1", api="http://127.0.0.1:9/api", timeout=2)


def test_zenodo_record_end_to_end(server, tmp_path):
    data = _zip_with_african_layout()
    server.files["/files/african.zip"] = data
    server.files["/api/records/7540448"] = json.dumps(
        {
            "id": 7540448,
            "files": [
                {
                    "key": "african.zip",
                    "size": len(data),
                    "checksum": "md5:" + hashlib.md5(data).hexdigest(),
                    "links": {"self": server.url + "/files/african.zip"},
                }
            ],
        }
    ).encode()
    server.cut.add("/files/african.zip")
    dest = tmp_path / "african"
    code = main(
        [
            "data",
            "download",
            "african-planes",
            "--dest",
            str(dest),
            "--api",
            server.url + "/api",
            "--retries",
            "0",
        ]
    )
    assert code == 2  # interrupted: a clear error, partial file kept
    assert (dest / ".downloads" / "african.zip.part").is_file()
    code = main(
        ["data", "download", "african-planes", "--dest", str(dest), "--api", server.url + "/api"]
    )
    assert code == 0
    manifest_csv = dest / "manifest.csv"
    from fulora.data.manifest import Manifest

    m = Manifest.read(manifest_csv)
    assert m.counts("label") == {"abdomen": 1, "brain": 1, "femur": 1}
    assert set(m.frame["domain"]) == {"Ghana"} and all(p.is_file() for p in m.paths)
    record = json.loads((dest / "download.json").read_text())
    assert record["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    # a rerun downloads nothing again
    before = len(server.requests)
    download_dataset("african-planes", dest, api=server.url + "/api", progress=False)
    assert [p for p, _ in server.requests[before:]] == ["/api/records/7540448"]


def test_github_archive_keeps_only_the_data_folder(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("FU-LoRA-main/README.md", "readme")
        inner = zipfile.ZipFile(io.BytesIO(_zip_with_african_layout()))
        for info in inner.infolist():
            zf.writestr(
                "FU-LoRA-main/data/african_test/" + info.filename.split("/", 1)[1], inner.read(info)
            )
    data = buffer.getvalue()
    server.files["/main.zip"] = data
    dest = tmp_path / "sample"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset(
            "fu-lora-sample", dest, url=server.url + "/main.zip", sha256="0" * 64, progress=False
        )
    m = download_dataset(
        "fu-lora-sample",
        dest,
        url=server.url + "/main.zip",
        sha256=hashlib.sha256(data).hexdigest(),
        progress=False,
    )
    assert len(m) == 3 and not (dest / "README.md").exists()
    assert (dest / "african_test" / "African_planes_database.csv").is_file()


def test_zip_paths_cannot_escape(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("FU-LoRA-main/data/../../evil.txt", "x")
    server.files["/evil.zip"] = buffer.getvalue()
    with pytest.raises(DownloadError, match="escapes"):
        download_dataset(
            "fu-lora-sample", tmp_path / "d", url=server.url + "/evil.zip", progress=False
        )
    assert not (tmp_path / "evil.txt").exists()


# --- Downloads that lie (issue 13, class 6) ---------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_a_closed_port_says_refused_and_claims_no_partial_file(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("fulora.data.download.time.sleep", lambda s: None)
    url = f"http://127.0.0.1:{_closed_port()}/data.zip"
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "data.zip", retries=2, progress=False)
    message = str(err.value)
    assert "connection refused" in message and "nothing was downloaded" in message
    assert "partial" not in message and "resuming" not in caplog.text
    assert "retrying" in caplog.text
    assert not list(tmp_path.iterdir())


def test_a_server_that_never_answers_fails_in_seconds(tmp_path):
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does) and never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/data.zip"
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"no answer within 1 s \(timed out\)"):
            fetch(url, tmp_path / "data.zip", retries=5, timeout=1, max_stall=2, progress=False)
        assert time.monotonic() - started < 10
    finally:
        listener.close()


@pytest.mark.parametrize(
    "checksum", ["sha256:abc", "sha256:" + "g" * 64, "crc32:1234", "md5:" + "0" * 64]
)
def test_malformed_checksums_are_refused_before_downloading(server, tmp_path, checksum):
    from fulora.errors import ConfigError

    server.files["/f"] = b"hello"
    with pytest.raises(ConfigError, match="checksum"):
        fetch(server.url + "/f", tmp_path / "f", checksum=checksum, progress=False)
    assert server.requests == []


def test_a_wrong_pin_says_so_and_keeps_nothing(server, tmp_path):
    server.files["/main.zip"] = _zip_with_african_layout()
    actual = hashlib.sha256(server.files["/main.zip"]).hexdigest()
    with pytest.raises(DownloadError) as err:
        download_dataset(
            "fu-lora-sample",
            tmp_path,
            url=server.url + "/main.zip",
            sha256="1" * 64,
            progress=False,
        )
    message = str(err.value)
    assert f"got sha256:{actual}" in message and "pin the new value with --sha256" in message
    assert "run the same command again" not in message
    assert not list((tmp_path / ".downloads").iterdir())


def test_an_html_page_instead_of_the_archive_is_not_kept(server, tmp_path):
    server.files["/main.zip"] = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    with pytest.raises(DownloadError, match="an HTML page .* not a zip archive"):
        download_dataset("fu-lora-sample", tmp_path, url=server.url + "/main.zip", progress=False)
    assert not list((tmp_path / ".downloads").iterdir())
    with pytest.raises(DownloadError, match="not a zip"):  # and is not reused by the next run
        download_dataset("fu-lora-sample", tmp_path, url=server.url + "/main.zip", progress=False)


def _hub(server, files: dict[str, bytes], oids: dict[str, str] | None = None) -> None:
    """The Hub's tree listing (LFS files with their SHA-256) and resolve URLs for ``files``."""
    listing = [
        {
            "type": "file",
            "path": name,
            "size": 134,  # the LFS pointer's size; the content's is under lfs
            "lfs": {
                "oid": (oids or {}).get(name, hashlib.sha256(body).hexdigest()),
                "size": len(body),
            },
        }
        for name, body in files.items()
    ] + [{"type": "file", "path": "README.md", "size": 10}]
    server.files["/api/models/fangyijie/fu-lora/tree/main"] = json.dumps(listing).encode()
    for name, body in files.items():
        server.files[f"/fangyijie/fu-lora/resolve/main/{name}"] = body


LORAS = [f"fetal_ultrasound_v{v}.0.safetensors" for v in (1, 2, 3)]


def test_the_papers_loras_come_from_the_hub_resumed_and_checked(server, tmp_path):
    bodies = {name: bytes([i]) * (40_000 + i) for i, name in enumerate(LORAS)}
    _hub(server, bodies)
    server.cut.add(f"/fangyijie/fu-lora/resolve/main/{LORAS[0]}")
    dest = tmp_path / "loras"
    args = ["data", "download", "fu-lora-loras", "--dest", str(dest), "--endpoint", server.url]
    assert main([*args, "--retries", "0"]) == 2  # cut halfway: a clear error, .part kept
    assert (dest / f"{LORAS[0]}.part").is_file()
    assert main(args) == 0
    for name, body in bodies.items():
        assert (dest / name).read_bytes() == body
    assert ("/fangyijie/fu-lora/resolve/main/" + LORAS[0], "bytes=20000-") in server.requests
    record = json.loads((dest / "download.json").read_text())
    assert [f["published_checksum"] for f in record["files"]] == [
        "sha256:" + hashlib.sha256(bodies[n]).hexdigest() for n in LORAS
    ]
    assert not (dest / "manifest.csv").exists()  # model files, not images


def test_a_hub_file_that_does_not_match_its_published_sha256_is_refused(server, tmp_path):
    bodies = {name: b"lora" * 100 for name in LORAS}
    _hub(server, bodies, oids={LORAS[1]: "0" * 64})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("fu-lora-loras", tmp_path, endpoint=server.url, progress=False)
    assert not (tmp_path / LORAS[1]).exists()


def test_a_file_missing_from_the_hub_repository_is_named(server, tmp_path):
    _hub(server, {LORAS[0]: b"x"})
    with pytest.raises(DownloadError, match=r"has no file 'fetal_ultrasound_v2\.0.*README\.md"):
        download_dataset("fu-lora-loras", tmp_path, endpoint=server.url, progress=False)


def test_the_papers_synthetic_set_is_read_with_its_labels(server, tmp_path):
    """Zenodo 13228158's layout as the notebook reads it: CSV beside a folder of its name."""
    rows = []
    for i, plane in enumerate(["Fetal brain", "Fetal femur", "Other"]):
        name = f"{i:05d}-{2671683618 + i}"
        rows.append((name, f"{name},{plane},1"))
    header = "\ufeffImage_name,Plane,Train"  # a BOM, as the paper's CSVs have
    data = _zip_release("synthetic_train_5000.csv", header, rows, "synthetic_train_5000")
    server.files["/files/synthetic.zip"] = data
    server.files["/api/records/13228158"] = json.dumps(
        {
            "files": [
                {
                    "key": "synthetic.zip",
                    "size": len(data),
                    "checksum": "md5:" + hashlib.md5(data).hexdigest(),
                    "links": {"self": server.url + "/files/synthetic.zip"},
                }
            ]
        }
    ).encode()
    m = download_dataset("fu-lora-synthetic", tmp_path, api=server.url + "/api", progress=False)
    assert m.counts("label") == {"brain": 1, "femur": 1, "other": 1}
    assert set(m.frame["source"]) == {"synthetic"}
    assert sorted(m.frame["seed"].astype(int)) == [2671683618, 2671683619, 2671683620]
    assert all(p.is_file() for p in m.paths)
