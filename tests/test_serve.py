"""``hiseg serve``'s API on the bundled photos and on bad input, its limits and its backpressure."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from live_server import live_server
from PIL import Image
from test_images import png as png_file

from hiseg.images import read_image
from hiseg.service import Settings, create_app

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = ROOT / "examples" / "astronaut.jpg"
GROUP = ROOT / "examples" / "group.jpg"
#: Small network input: fast tests, same code path.
LONG_SIDE = 256


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(models=["pascal-person-part", "person"], long_side=LONG_SIDE))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def person_app(**settings) -> object:
    return create_app(Settings(models=["person"], long_side=LONG_SIDE, **settings))


# -- answers on real photos -----------------------------------------------------------------------


def test_json_answer_holds_the_predictors_maps_shares_and_people(app, client):
    r = client.post("/v1/segment", content=ASTRONAUT.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    expected = app.state.models["pascal-person-part"].predictor.predict(read_image(ASTRONAUT))
    summary = expected.summary()
    assert body["model"] == "pascal-person-part"
    assert body["tree"]["name"] == "pascal-person-part"
    assert (body["width"], body["height"]) == (summary["width"], summary["height"])
    assert body["people"] == summary["people"] >= 1
    assert [level["index"] for level in body["levels"]] == [0, 1, 2]
    for level in body["levels"]:
        k = level["index"]
        labels = decode_png(level["png"])
        np.testing.assert_array_equal(labels, expected.level(k))
        names = [node["name"] for node in level["nodes"]]
        assert names == expected.tree.level(k).names
        counts = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        shares = [level["share"][name] for name in names]
        np.testing.assert_allclose(shares, counts, atol=1e-5)
        assert level["share"]["background"] < 0.99  # someone was found
    assert set(body["timing_ms"]) == {"read", "decode", "inference", "encode", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0


def test_multipart_upload_chosen_model_and_levels(app, client):
    files = {"file": ("whatever.txt", GROUP.read_bytes(), "text/plain")}  # the name may lie
    r = client.post("/v1/segment?model=person&levels=0", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "person" and [lv["index"] for lv in body["levels"]] == [0]
    expected = app.state.models["person"].predictor.predict(read_image(GROUP))
    np.testing.assert_array_equal(decode_png(body["levels"][0]["png"]), expected.level(0))


def test_a_multipart_content_type_in_capitals_is_multipart(client):
    """Media types are case-insensitive: the upload is found in the body, not sniffed as one."""
    photo = ASTRONAUT.read_bytes()
    body = (
        b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--XYZ--\r\n"
    )
    headers = {"Content-Type": "Multipart/Form-Data; boundary=XYZ"}
    r = client.post("/v1/segment?levels=0", content=body, headers=headers)
    assert r.status_code == 200, r.text


def test_png_format_is_the_leaf_label_map(app, client):
    r = client.post("/v1/segment?format=png", content=GROUP.read_bytes())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    labels = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = app.state.models["pascal-person-part"].predictor.predict(read_image(GROUP))
    np.testing.assert_array_equal(labels, expected.labels)


def test_models_health_and_openapi(client):
    models = client.get("/v1/models").json()
    assert models["default"] == "pascal-person-part"
    by_name = {m["name"]: m for m in models["models"]}
    assert [len(by_name[n]["levels"]) for n in ("pascal-person-part", "person")] == [3, 1]
    assert by_name["person"]["tree"]["name"] == "person"
    assert client.get("/healthz").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/models", "/healthz"} <= set(paths)
    docs = client.get("/docs")
    assert docs.status_code == 200
    # Swagger UI comes from the package, not a CDN: the page works offline
    assert "cdn." not in docs.text and "/docs-assets/swagger-ui-bundle.js" in docs.text
    script = client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


# -- bad input: one JSON error line each ----------------------------------------------------------


def bomb_bytes(tmp_path: Path, width: int, height: int, rows: int | None, bit_depth=8) -> bytes:
    return png_file(tmp_path / "x.png", width, height, rows, bit_depth).read_bytes()


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("empty", 400, "empty"),
        ("text", 415, "not an image"),
        ("gif", 415, "not an image"),
        ("truncated jpeg", 422, "truncated"),
        ("10 gigapixel header", 413, "Mpx"),
        ("zlib bomb", 413, "Mpx"),
        ("over the 40 Mpx limit", 413, "over the 40 Mpx limit"),
        ("multipart without file", 400, "no field named 'file'"),
        ("two file fields", 400, "2 fields named 'file'; send one"),
        ("multipart/mixed", 415, "multipart/mixed: send multipart/form-data or the raw image"),
        ("unknown model", 404, "no model 'nobody'"),
        ("bad levels", 422, "out of range"),
        ("bad format", 422, "format"),
    ],
)
def test_bad_input_is_one_json_error(client, tmp_path, case, status, words):
    photo = ASTRONAUT.read_bytes()
    url, kwargs = "/v1/segment", {}
    if case == "empty":
        kwargs["content"] = b""
    elif case == "text":
        kwargs["files"] = {"file": ("photo.jpg", b"just some text\n" * 50, "image/jpeg")}
    elif case == "gif":
        kwargs["content"] = b"GIF89a" + b"\0" * 100
    elif case == "truncated jpeg":
        kwargs["content"] = photo[: len(photo) // 2]
    elif case == "10 gigapixel header":
        kwargs["content"] = bomb_bytes(tmp_path, 100_000, 100_000, rows=1)
    elif case == "zlib bomb":  # 400 Mpx of real pixels in ~50 kB
        kwargs["content"] = bomb_bytes(tmp_path, 20_000, 20_000, rows=None, bit_depth=1)
    elif case == "over the 40 Mpx limit":  # under Pillow's limits, over the server's
        kwargs["content"] = bomb_bytes(tmp_path, 7_000, 7_000, rows=1)
    elif case == "multipart without file":
        kwargs["files"] = {"image": ("a.jpg", photo, "image/jpeg")}
    elif case == "two file fields":  # which one is meant is unknowable
        kwargs["files"] = [("file", ("a.jpg", photo, "image/jpeg")), ("file", ("b.txt", b"x", ""))]
    elif case == "multipart/mixed":
        kwargs["content"] = b"--XYZ\r\n\r\n" + photo + b"\r\n--XYZ--\r\n"
        kwargs["headers"] = {"Content-Type": "multipart/mixed; boundary=XYZ"}
    elif case == "unknown model":
        url, kwargs["content"] = "/v1/segment?model=nobody", photo
    elif case == "bad levels":
        url, kwargs["content"] = "/v1/segment?levels=0,3", photo
    elif case == "bad format":
        url, kwargs["content"] = "/v1/segment?format=gif", photo
    r = client.post(url, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert "\n" not in r.json()["error"]


def test_oversized_upload_is_413_from_its_declared_length():
    with TestClient(person_app(max_upload_bytes=1_000_000)) as c:
        r = c.post("/v1/segment", content=b"\xff\xd8\xff" + b"\0" * 1_000_000)
        assert r.status_code == 413 and "over the 1000000 byte limit" in r.json()["error"]
        ok = c.post("/v1/segment", content=ASTRONAUT.read_bytes())  # 68 kB: under the limit
        assert ok.status_code == 200


def test_chunked_upload_is_cut_at_the_limit_not_read_in_full():
    """No Content-Length: the server answers 413 once 1 MB has arrived, while the client still
    has most of its 50 MB to send."""
    with live_server(person_app(max_upload_bytes=1_000_000)) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"\xff" * 65536
        sent = 0
        answer = b""
        sock.settimeout(0.05)
        while sent < 50_000_000:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # the server closed on us: it stopped reading
                break
            if answer:
                break
        sock.settimeout(5)
        while b"\r\n\r\n" not in answer:
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            if not more:
                break
            answer += more
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 10_000_000, f"{sent} bytes were taken before the 413"


def test_api_key_is_required_on_every_api_call_when_set(monkeypatch):
    with TestClient(person_app(api_key="s3cret")) as c:
        photo = ASTRONAUT.read_bytes()
        for headers, status in [
            ({}, 401),
            ({"X-API-Key": "wrong"}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"X-API-Key": "s3cret"}, 200),
            ({"Authorization": "Bearer s3cret"}, 200),
        ]:
            r = c.post("/v1/segment?levels=0", content=photo, headers=headers)
            assert r.status_code == status, (headers, r.text)
            assert c.get("/v1/models", headers=headers).status_code == status
        assert "missing API key" in c.get("/v1/models").json()["error"]
        assert "wrong API key" in c.get("/v1/models", headers={"X-API-Key": "x"}).json()["error"]
        assert c.get("/healthz").status_code == 200  # health probes need no key
        assert c.get("/").status_code == 200  # the page asks for the key itself


def test_cors_is_off_unless_an_origin_is_given():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with TestClient(person_app()) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with TestClient(person_app(cors=["https://app.example"])) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/v1/segment", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# -- uploads stay in memory -----------------------------------------------------------------------

#: Paths opened for writing while a test watches (an audit hook cannot be removed: it is gated,
#: and added only when the test first runs).
_watched: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if _watched is None or event != "open":
        return
    path, mode, flags = args
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
    )
    if writing:
        _watched.append(str(path))


def test_a_5mb_multipart_upload_is_never_written_to_disk(client, tmp_path, monkeypatch):
    """Starlette's form parser spools parts over 1 MB to a temporary file (on Linux one with no
    name, O_TMPFILE): the temp dir must stay empty and nothing be opened for writing at all."""
    global _watched, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    noise = np.random.default_rng(0).integers(0, 256, (1300, 1300, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=0)
    upload = buffer.getvalue()
    assert len(upload) > 5_000_000
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    _watched = []
    try:
        r = client.post("/v1/segment?model=person", files={"file": ("big.png", upload)})
        opened = list(_watched)
    finally:
        _watched = None
    assert r.status_code == 200, r.text
    assert r.json()["width"] == 1300
    assert list(spool.iterdir()) == []
    assert opened == [], f"opened for writing during the upload: {opened}"


# -- backpressure and timeouts --------------------------------------------------------------------


def blocking_predict(app, release: threading.Event):
    """The served predictor, made to wait for ``release`` (a stand-in for a slow inference)."""
    predictor = app.state.models["person"].predictor
    predict = predictor.predict

    def slow(image):
        release.wait(30)
        return predict(image)

    return predictor, slow


def post(url: str, data: bytes, out: list) -> None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as r:
            out.append((r.status, dict(r.headers), json.loads(r.read())))
    except urllib.error.HTTPError as err:
        out.append((err.code, dict(err.headers), json.loads(err.read())))


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_requests_beyond_workers_and_queue_get_503_with_retry_after(monkeypatch):
    app = person_app(workers=1, queue=1)
    release = threading.Event()
    predictor, slow = blocking_predict(app, release)
    monkeypatch.setattr(predictor, "predict", slow)
    photo = ASTRONAUT.read_bytes()
    with live_server(app) as url:
        answers: list = []
        threads = []
        for admitted in (1, 2):  # one runs, one waits
            t = threading.Thread(target=post, args=(f"{url}/v1/segment", photo, answers))
            t.start()
            threads.append(t)
            wait_until(lambda n=admitted: app.state.gate.admitted == n)
        refused: list = []
        post(f"{url}/v1/segment", photo, refused)
        status, headers, body = refused[0]
        assert status == 503 and headers["retry-after"] == "1" and "busy" in body["error"]
        release.set()
        for t in threads:
            t.join(60)
        assert sorted(a[0] for a in answers) == [200, 200]
        assert app.state.gate.admitted == 0
        after: list = []
        post(f"{url}/v1/segment", photo, after)
        assert after[0][0] == 200


def test_a_stalled_upload_holds_no_slot_and_gets_504(monkeypatch):
    """A client that sends part of its body and stops must not lock out the others: the only
    slot stays free for a whole request, and the stalled one ends at the timeout."""
    import socket

    app = person_app(workers=1, queue=0, timeout=2)
    photo = ASTRONAUT.read_bytes()
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabcd"
        )
        time.sleep(0.3)  # the server is now reading it
        assert app.state.gate.admitted == 0
        answers: list = []
        post(f"{url}/v1/segment?levels=0", photo, answers)
        assert answers[0][0] == 200, answers
        stalled.settimeout(10)
        reply = ""
        while "}" not in reply:  # the headers and the JSON body may come in two pieces
            piece = stalled.recv(4096).decode()
            assert piece, reply
            reply += piece
        stalled.close()
        assert reply.startswith("HTTP/1.1 504") and "upload not received within 2 s" in reply


def test_a_request_past_its_timeout_gets_504_and_its_slot_comes_back(monkeypatch):
    app = person_app(workers=1, queue=0, timeout=0.5)
    release = threading.Event()
    predictor, slow = blocking_predict(app, release)
    monkeypatch.setattr(predictor, "predict", slow)
    with TestClient(app) as c:
        r = c.post("/v1/segment", content=ASTRONAUT.read_bytes())
        assert r.status_code == 504 and "0.5 s" in r.json()["error"]
        assert app.state.gate.admitted == 1  # the inference still holds its worker
        release.set()
        wait_until(lambda: app.state.gate.admitted == 0)
        assert c.post("/v1/segment", content=ASTRONAUT.read_bytes()).status_code == 200


def test_an_unexpected_failure_is_a_json_500_and_frees_its_slot(monkeypatch):
    app = person_app(workers=1, queue=0)

    def out_of_memory(image):
        raise MemoryError

    monkeypatch.setattr(app.state.models["person"].predictor, "predict", out_of_memory)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/segment", content=ASTRONAUT.read_bytes())
        assert r.status_code == 500 and r.json() == {"error": "internal error (MemoryError)"}
        wait_until(lambda: app.state.gate.admitted == 0)


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--queue", "-1"], "--queue must be at least 0"),
        (["--long-side", "8"], "--long-side must be between 32 and 4096"),
        (["--model", "nobody"], "nobody: no such model file and no bundled model"),
        (["--model", "person", "--model", "person"], "two models named 'person'"),
        (["--api-key", "clé"], "API key must be printable ASCII"),  # curl sends UTF-8
        (["--api-key", "s3cret "], "no space at either end"),  # HTTP strips it
    ],
)
def test_serve_command_refuses_bad_options_in_one_line(args, words):
    from typer.testing import CliRunner

    from hiseg.cli import app

    result = CliRunner().invoke(app, ["serve", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and words in lines[0], result.output


def test_serve_command_names_a_port_in_use_before_loading_models():
    import socket

    from typer.testing import CliRunner

    from hiseg.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a model that can't load would be the error if the address were tried after loading
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "-m", "nobody"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == f"error: 127.0.0.1:{port}: cannot listen there (Address already in use)"
