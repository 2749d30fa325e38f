import contextlib
import io
import os
import select as io_select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from flows.serve_model import TOKEN_ENV, create_app, exposure_warning
from tasks.data.dataset import list_images, select
from tasks.data.image_check import blocking_rules, inspect_image
from tasks.inference.predictor import predict_files
from tasks.params import replace
from tasks.registry.champion import load_champion
from tasks.registry.decisions import rollback
from tasks.registry.store import RegistryError
from tests.bad_files import HOSTILE_IMAGES
from tests.conftest import BASE
from tests.tasks.champion_support import (
    copy_registry,
    flip_weight_bytes,
    gate_params,
    one_version_registry,
    review_band_registry,
    two_version_registry,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def registry(trained_workspace, tmp_path_factory, tmp_path):
    source = one_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    return copy_registry(source, tmp_path / "registry")


def serve_params(trained_workspace, registry, **serve):
    params = gate_params(trained_workspace["data_dir"], registry)
    return replace(params, serve=replace(BASE.serve, **serve))


@pytest.fixture
def validation_paths(trained_workspace):
    params = trained_workspace["params"]
    return [image.path for image in select(list_images(params.data.dir, params.data), "validation")][:6]


def upload(client, content, name="fan.png"):
    return client.post("/predict", files={"file": (name, content, "application/octet-stream")})


def test_predict_agrees_with_the_cli_and_the_service_describes_itself(
    trained_workspace, registry, validation_paths
):
    expected = predict_files(load_champion(registry), validation_paths, batch_size=8, limits=BASE.validate)
    with TestClient(create_app(serve_params(trained_workspace, registry))) as client:
        for path, row in zip(validation_paths, expected, strict=True):
            answer = upload(client, path.read_bytes())
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["probability"] == pytest.approx(row["probability"], abs=1e-6)
            assert body["label"] == row["label"]
            assert (body["threshold"], body["model_version"], body["positive_class"]) == (0.5, "v0001", "NG")
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["model_version"] == "v0001"
        card = client.get("/model").json()
        assert card["version"] == "v0001" and card["class_mapping"] == {"GO": 0, "NG": 1}
        schema = client.get("/openapi.json").json()
        assert {"/predict", "/health", "/model"} <= set(schema["paths"])


def png_bytes(size):
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_get_a_4xx_with_a_message(trained_workspace, registry, validation_paths):
    params = serve_params(trained_workspace, registry, max_upload_bytes=20_000, max_pixels=100 * 100)
    good = validation_paths[0].read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    cases = {
        "notes.txt": (b"line 7 inspection notes\n", 415, "notes.txt: not an image"),
        "empty.png": (b"", 400, "empty upload"),
        "cut.png": (good[: len(good) // 2], 422, "truncated or corrupt image"),
        "bomb.png": (png_bytes((200, 200)), 422, "decompression bomb: 40,000 pixels, more than serve.max_pixels"),
        "fan.gif": (gif.getvalue(), 415, "format GIF is not one of PNG, JPEG, BMP"),
        "big.png": (good + b"\0" * 20_000, 413, "larger than serve.max_upload_bytes = 20,000"),
        "huge.png": (b"\0" * 200_000, 413, "request of"),
    }
    with TestClient(create_app(params)) as client:
        for name, (content, status, message) in cases.items():
            answer = upload(client, content, name)
            assert answer.status_code == status, (name, answer.text)
            assert message in answer.json()["detail"], name
        assert client.post("/predict").status_code == 422  # no file field at all
        assert upload(client, good).status_code == 200  # the service is still answering


def test_hostile_images_get_a_4xx_with_the_reason_of_the_shared_check(
    trained_workspace, registry, tmp_path
):
    params = serve_params(trained_workspace, registry)
    limits = params.validate
    with TestClient(create_app(params)) as client:
        for name, write in HOSTILE_IMAGES.items():
            data = write(tmp_path / name).read_bytes()
            expected = inspect_image(data, limits).rejection(blocking_rules(limits))
            answer = upload(client, data, name)
            assert answer.status_code in (415, 422), (name, answer.text)
            assert answer.json()["detail"] == f"{name}: {expected.reason}"
        assert upload(client, png_bytes((32, 32))).status_code == 200


def test_no_champion_means_no_service(trained_workspace, tmp_path):
    with pytest.raises(RegistryError, match="no champion yet"):
        create_app(serve_params(trained_workspace, tmp_path / "registry"))


def test_a_new_champion_is_picked_up_without_dropping_requests(
    trained_workspace, tmp_path_factory, tmp_path, validation_paths
):
    source = two_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    registry = copy_registry(source, tmp_path / "registry")
    params = serve_params(trained_workspace, registry)
    image = validation_paths[0].read_bytes()
    with TestClient(create_app(params)) as client:
        assert upload(client, image).json()["model_version"] == "v0002"

        def ask(_):
            answer = upload(client, image)
            return answer.status_code, answer.json().get("model_version")

        with ThreadPoolExecutor(4) as pool:
            answers = pool.map(ask, range(40))
            rollback(params.registry, "v0001", reason="test")
            answers = list(answers)
        assert {status for status, _ in answers} == {200}
        assert {version for _, version in answers} <= {"v0001", "v0002"}

        assert upload(client, image).json()["model_version"] == "v0001"
        assert client.get("/model").json()["version"] == "v0001"
        rollback(params.registry, "v0002", reason="test")
        assert client.get("/health").json()["model_version"] == "v0002"


def test_a_champion_that_cannot_be_loaded_leaves_the_old_one_answering(
    trained_workspace, registry, validation_paths
):
    params = serve_params(trained_workspace, registry)
    with TestClient(create_app(params)) as client:
        broken = registry / "broken.h5"
        broken.write_bytes(b"not a model")
        os.replace(broken, registry / "champion.h5")
        health = client.get("/health").json()
        assert health["status"] == "stale" and health["model_version"] == "v0001"
        assert "champion.h5" in health["reload_error"] and "rollback" in health["reload_error"]
        answer = upload(client, validation_paths[0].read_bytes())
        assert answer.status_code == 200 and answer.json()["model_version"] == "v0001"

        rollback(params.registry, "v0001", reason="restore")
        restored = client.get("/health").json()
        assert (restored["status"], restored["reload_error"], restored["model_version"]) == ("ok", None, "v0001")


def test_damaged_weights_or_a_bad_card_file_leave_the_service_answering(
    trained_workspace, registry, validation_paths
):
    params = serve_params(trained_workspace, registry)
    image = validation_paths[0].read_bytes()
    with TestClient(create_app(params)) as client:
        expected = upload(client, image).json()
        damaged = registry / "damaged.h5"
        damaged.write_bytes((registry / "champion.h5").read_bytes())
        flip_weight_bytes(damaged)
        os.replace(damaged, registry / "champion.h5")  # what a bad disk or copy leaves behind

        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "stale"
        assert "is not that of v0001 as published" in health.json()["reload_error"]
        assert "fanaoi rollback v0001" in health.json()["reload_error"]
        answer = upload(client, image)
        assert answer.status_code == 200 and answer.json() == expected  # the last good model

        (registry / "champion.json").write_text("[1, 2]")  # valid JSON, not a card
        for route in ("/health", "/model"):
            assert client.get(route).status_code == 200, route
        assert upload(client, image).status_code == 200


@contextlib.contextmanager
def running_server(app):
    """``app`` under a real uvicorn server on a free localhost port; yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def test_a_real_http_request_on_localhost(trained_workspace, registry, validation_paths):
    expected = predict_files(load_champion(registry), validation_paths[:1], batch_size=8, limits=BASE.validate)[0]
    with running_server(create_app(serve_params(trained_workspace, registry))) as port:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/predict", timeout=30,
            files={"file": ("fan.png", validation_paths[0].read_bytes(), "image/png")},
        )
        assert answer.status_code == 200
        assert answer.json()["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert httpx.post(f"http://127.0.0.1:{port}/predict", timeout=30,
                          files={"file": ("x.txt", b"not an image", "text/plain")}).status_code == 415


def test_a_chunked_upload_gets_413_at_the_limit_not_after_reading_it_all(
    trained_workspace, registry
):
    limit = 100_000
    params = serve_params(trained_workspace, registry, max_upload_bytes=limit)
    chunk = b"\0" * (1 << 20)
    planned = 50  # 50 MB without a Content-Length, as in the probe of issue 15
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n"
    )
    part = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    with running_server(create_app(params)) as port, socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        sent, reply = 0, b""
        for _ in range(planned):
            try:
                client.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            if io_select.select([client], [], [], 0.2)[0]:
                break
        client.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while b"}" not in reply and (data := client.recv(65536)):  # to the JSON's end
                reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"stopped reading" in reply
    assert sent < 10, f"{sent} MB sent before the answer"


def test_requests_beyond_max_concurrency_get_503_and_health_stays_open(
    trained_workspace, registry, validation_paths, monkeypatch
):
    import flows.serve_model

    params = serve_params(trained_workspace, registry, max_concurrency=2)
    image = validation_paths[0].read_bytes()
    inside, release = threading.Semaphore(0), threading.Event()
    real_classify = flows.serve_model.classify

    def slow_classify(loaded, data):
        inside.release()
        release.wait(30)
        return real_classify(loaded, data)

    monkeypatch.setattr(flows.serve_model, "classify", slow_classify)
    with TestClient(create_app(params)) as client, ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(upload, client, image) for _ in range(2)]
        assert inside.acquire(timeout=30) and inside.acquire(timeout=30)  # both are in
        refused = upload(client, image)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "serve.max_concurrency" in refused.json()["detail"]
        assert client.get("/health").status_code == 200
        release.set()
        assert [future.result().status_code for future in busy] == [200, 200]
        assert upload(client, image).status_code == 200  # the slots are free again


def test_a_token_guards_home_predict_model_and_reports_but_not_health(
    trained_workspace, registry, validation_paths, monkeypatch, tmp_path
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "reports" / "ingest").mkdir(parents=True)
    (tmp_path / "reports" / "ingest" / "batch.json").write_text('{"batch": "/home/supplier/lot-17"}')
    params = serve_params(trained_workspace, registry, token="s3cret-line-7-token",
                          reports_dir=str(tmp_path / "reports"))
    image = validation_paths[0].read_bytes()
    with TestClient(create_app(params)) as client:
        assert upload(client, image).status_code == 401
        wrong = client.post("/predict", headers={"Authorization": "Bearer nope"},
                            files={"file": ("fan.png", image, "image/png")})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert TOKEN_ENV in wrong.json()["detail"]
        good = {"Authorization": "Bearer s3cret-line-7-token"}
        assert client.post("/predict", headers=good,
                           files={"file": ("fan.png", image, "image/png")}).status_code == 200
        assert client.get("/model").status_code == 401
        assert client.get("/model", headers=good).json()["version"] == "v0001"
        assert client.get("/").status_code == 401  # the home page shows the decisions and their reasons
        assert "Champion v0001" in client.get("/", headers=good).text
        assert client.get("/health").status_code == 200
        for page in ("/reports/", "/reports/ingest/batch.json"):  # batch paths, part images
            assert client.get(page).status_code == 401, page
            assert client.get(page, headers=good).status_code == 200, page
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-1234")
    with TestClient(create_app(params)) as client:
        assert client.get("/model", headers=good).status_code == 401  # the variable wins
        assert client.get("/model", headers={"Authorization": "Bearer from-the-environment-1234"}
                          ).status_code == 200


@pytest.mark.parametrize(
    ("host", "token", "expected"),
    [
        ("127.0.0.1", None, None),
        ("localhost", None, None),
        ("::1", None, None),
        ("0.0.0.0", None, "WITHOUT a token"),
        ("line-server.local", None, "WITHOUT a token"),
        ("0.0.0.0", "s3cret-line-7-token", "need the bearer token"),
    ],
)
def test_binding_outside_loopback_is_warned_about(host, token, expected):
    warning = exposure_warning(host, token)
    assert warning is None if expected is None else expected in warning


def test_the_service_answers_review_inside_the_cards_review_band(
    trained_workspace, tmp_path_factory, tmp_path, validation_paths
):
    base = tmp_path_factory.getbasetemp()
    registry = review_band_registry(trained_workspace["data_dir"], base, tmp_path / "registry", (0.0, 1.0))
    with TestClient(create_app(serve_params(trained_workspace, registry))) as client:
        for path in validation_paths:
            body = upload(client, path.read_bytes()).json()
            assert body["review_band"] == [0.0, 1.0]
            assert body["label"] == ("REVIEW" if body["probability"] < 1.0 else "NG")


def raw_get(port, path):
    """GET ``path`` exactly as written: an HTTP client library would normalise ``../`` away."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_reports_are_served_read_only_and_nothing_outside_them(
    trained_workspace, registry, tmp_path
):
    reports = tmp_path / "reports"
    (reports / "explain" / "v0001").mkdir(parents=True)
    (reports / "explain" / "v0001" / "index.html").write_text("<h1>v0001 explained</h1>")
    (reports / "gate.json").write_text('{"decision": "promote"}')
    (tmp_path / "secret.txt").write_text("not a report")
    (reports / "escape").symlink_to(tmp_path / "secret.txt")
    params = serve_params(trained_workspace, registry, reports_dir=str(reports))
    with running_server(create_app(params)) as port:
        assert raw_get(port, "/reports/explain/v0001/index.html") == (200, b"<h1>v0001 explained</h1>")
        assert raw_get(port, "/reports/explain/v0001/")[0] == 200  # html=True: the folder's index
        assert raw_get(port, "/reports/gate.json") == (200, b'{"decision": "promote"}')
        for path in ("/reports/../secret.txt", "/reports/%2e%2e/secret.txt", "/reports/..%2fsecret.txt",
                     "/reports/explain/../../secret.txt", "/reports//../secret.txt", "/reports/escape",
                     f"/reports/{tmp_path}/secret.txt", "/reports/missing.html"):
            status, body = raw_get(port, path)
            assert status == 404 and b"not a report" not in body, path
        put = httpx.put(f"http://127.0.0.1:{port}/reports/gate.json", content=b"{}", timeout=30)
        assert put.status_code == 405
        assert (reports / "gate.json").read_text() == '{"decision": "promote"}'


def test_no_reports_folder_yet_is_a_404_and_the_service_runs(trained_workspace, registry, tmp_path):
    params = serve_params(trained_workspace, registry, reports_dir=str(tmp_path / "not-yet"))
    with TestClient(create_app(params)) as client:
        assert client.get("/reports/gate.json").status_code == 404
        assert client.get("/health").json()["status"] == "ok"


def test_clients_that_send_headers_and_go_idle_hold_no_slot_and_are_dropped(
    trained_workspace, registry, validation_paths
):
    """The slowloris of issue 28: as many stalled uploads as serve.max_concurrency lock nobody out."""
    body_timeout = 3
    params = serve_params(trained_workspace, registry, max_concurrency=4, body_timeout=body_timeout)
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n")
    with running_server(create_app(params)) as port, contextlib.ExitStack() as stack:
        stalled = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(4)]
        for client in stalled:
            client.sendall(head)
        trickling, stop = stalled[0], threading.Event()

        def trickle():  # one byte every 0.2 s: never idle, never done
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):
                    trickling.sendall(b"x")

        stack.callback(stop.set)
        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)  # the server has all four requests in hand

        started = time.monotonic()
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=body_timeout,
                            files={"file": ("fan.png", validation_paths[0].read_bytes(), "image/png")})
        assert answer.status_code == 200 and time.monotonic() - started < body_timeout

        for client in stalled:
            client.settimeout(body_timeout + 10)
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while data := client.recv(65536):  # to the end: the server closes the connection
                    reply += data
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"serve.body_timeout = 3 s" in reply
        assert time.monotonic() - started < body_timeout + 5
