"""The line's home page (GET /) and the index of reports/ (GET /reports/) of `fanaoi serve-model`."""

from __future__ import annotations

import json

import pytest

from flows.line_home import UI_ENV, home_page, report_files
from flows.serve_model import create_app
from tasks.data.ingest_transaction import INDEX_NAME
from tasks.data.validation_page import render_validation_page
from tasks.registry.decisions import append_log
from tests.browser_support import external_references, offline_tab, requires_chromium, tables
from tests.flows.test_serve_model import running_server, serve_params
from tests.tasks.champion_support import copy_registry, one_version_registry

CARD = {
    "version": "v0003", "time": "2026-11-25T02:14:00+00:00", "action": "promote", "threshold": 0.4375,
    "review_band": [0.3, 0.6], "data_snapshot": "0123456789abcdef.dir",
    "metrics": {"validation": {"accuracy": 0.99, "escape_rate": 0.0, "overkill_rate": 0.02, "count": 80}},
}


def render(tmp_path, card=CARD, data_dir="data"):
    return home_page(card, None, registry_dir=tmp_path / "registry", reports_dir=tmp_path / "reports",
                     project=tmp_path, data_dir=data_dir)


def test_the_home_page_shows_the_champion_the_decisions_and_the_pending_batches(tmp_path, monkeypatch):
    monkeypatch.delenv(UI_ENV, raising=False)
    (tmp_path / "registry").mkdir()
    append_log(tmp_path / "registry", {"action": "promote", "version": "v0003", "reasons": ["accuracy +0.0100"]})
    append_log(tmp_path / "registry", {"action": "reject", "version": None,
                                       "reasons": ["escape rate 0.0500 > max 0.0200", "<b>typed</b>"]})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / INDEX_NAME).write_text("".join(
        json.dumps({"file": f"data/NG/{n}.png", "batch": "/incoming/2026-11-25",
                    "ingested_at": "2026-11-25T09:00:00+00:00"}) + "\n" for n in range(3)
    ))
    page = render(tmp_path)
    shown = tables(page)
    assert ["threshold", "0.4375"] in shown["champion"] and ["review band", "0.3000 .. 0.6000"] in shown["champion"]
    assert ["escape rate", "0.0000"] in shown["champion"]
    assert [row[1:] for row in shown["decisions"][1:]] == [  # newest first, every reason
        ["REJECT", "-", "escape rate 0.0500 > max 0.0200 <b>typed</b>"], ["PROMOTE", "v0003", "accuracy +0.0100"],
    ]
    assert "&lt;b&gt;typed" in page
    assert shown["pending"][1] == ["/incoming/2026-11-25", "3", "2026-11-25T09:00:00+00:00"]
    assert "fanaoi explain v0003" in page and 'id="explain"' not in page  # no page drawn yet
    assert "no page yet" in page and f"set {UI_ENV}" in page


def test_links_go_to_the_pages_that_exist_and_to_the_prefect_ui(tmp_path, monkeypatch):
    monkeypatch.setenv(UI_ENV, "http://line-server:4200/")
    (tmp_path / "reports" / "explain" / "v0003").mkdir(parents=True)
    (tmp_path / "reports" / "explain" / "v0003" / "index.html").write_text("<h1>v0003</h1>")
    (tmp_path / "reports" / "validation.html").write_text("<h1>valid</h1>")
    page = render(tmp_path)
    assert 'id="explain" href="/reports/explain/v0003/index.html"' in page
    assert 'id="validation" href="/reports/validation.html"' in page
    assert 'href="http://line-server:4200/runs"' in page
    assert "No decision recorded yet" in page and "No batch waiting" in page


def test_a_damaged_log_is_named_and_the_rest_of_the_page_is_shown(tmp_path):
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "log.jsonl").write_text('{"action": "promote"}\n')
    page = render(tmp_path)
    assert "DAMAGED" in page and "log.jsonl:1" in page and "repair or delete that line" in page
    assert "Champion v0003" in page and 'id="decisions"' not in page


def test_the_reports_index_lists_files_but_no_dotfiles_and_nothing_outside(tmp_path):
    reports = tmp_path / "reports"
    (reports / "explain" / "v0001").mkdir(parents=True)
    (reports / "explain" / "v0001" / "index.html").write_text("x")
    (reports / "gate.json").write_text("{}")
    (reports / ".cache").mkdir()
    (reports / ".cache" / "inside.json").write_text("{}")
    (reports / ".hidden").write_text("")
    (tmp_path / "secret.txt").write_text("no")
    (reports / "escape").symlink_to(tmp_path / "secret.txt")
    assert [row["path"] for row in report_files(reports)] == ["explain/v0001/index.html", "gate.json"]


VALID = {
    "valid": True, "summary": "80 usable images", "entries": 80, "images": 80, "usable_images": 80,
    "blocking_failures": 0, "warnings": 0, "classes": {}, "defect_types": {},
    "splits": {"train": 56, "validation": 16, "test": 8}, "expectations": {}, "failing_files": [],
}


@requires_chromium
@pytest.mark.slow
@pytest.mark.integration
def test_an_operator_walks_from_home_to_the_reports_and_back_offline(
    trained_workspace, tmp_path_factory, tmp_path, monkeypatch
):
    monkeypatch.delenv(UI_ENV, raising=False)
    source = one_version_registry(trained_workspace["data_dir"], tmp_path_factory.getbasetemp())
    registry = copy_registry(source, tmp_path / "registry")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "validation.html").write_text(render_validation_page(VALID))
    (reports / "gate.json").write_text("{}")
    (reports / ".partial").write_text("")
    params = serve_params(trained_workspace, registry, reports_dir=str(reports))
    with (
        running_server(create_app(params, tmp_path)) as port,
        offline_tab(tmp_path / "profile", f"127.0.0.1:{port}") as tab,
    ):
        home = f"http://127.0.0.1:{port}/"
        tab.open(home)
        shown = tables(tab.dom)
        assert ["version", "v0001"] in shown["champion"]
        assert shown["decisions"][1][1:3] == ["PROMOTE", "v0001"]

        tab.click("#reports")
        assert tab.url == f"{home}reports/"
        assert [row[0] for row in tables(tab.dom)["files"][1:]] == ["gate.json", "validation.html"]

        tab.click('a[href="/reports/validation.html"]')
        assert tab.url == f"{home}reports/validation.html"
        assert "<title>FanAOI validation: valid</title>" in tab.dom

        tab.click("#home")
        assert tab.url == home and "Champion v0001" in tab.dom
        assert tab.failed_requests == [] and external_references(tab.dom) == []


def test_reports_serves_files_but_no_dotfile_even_by_its_name(tmp_path):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from flows.line_home import ReportFiles

    reports = tmp_path / "reports"
    (reports / ".cache").mkdir(parents=True)
    (reports / ".cache" / "inside.json").write_text("{}")
    (reports / ".partial.html").write_text("half")
    (reports / "gate.json").write_text("{}")
    app = Starlette(routes=[Mount("/reports", ReportFiles(directory=reports, html=True))])
    with TestClient(app) as client:
        assert client.get("/reports/gate.json").status_code == 200
        for hidden in (".partial.html", ".cache/inside.json", "%2Ecache/inside.json"):
            assert client.get(f"/reports/{hidden}").status_code == 404, hidden
