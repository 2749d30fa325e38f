"""reports/validation.html: the validation report as one page that opens with no network."""

from __future__ import annotations

import pytest

from tasks.params import replace
from tasks.validate import ValidationFailed, run_validate
from tasks.validation_page import render_validation_page
from tests.browser_support import external_references, offline_dom, requires_chromium, tables
from tests.conftest import BASE, make_image_folder


@requires_chromium
@pytest.mark.integration
def test_page_of_a_failed_run_shows_every_table_offline(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=12, seed=8)
    (data / "NG" / "crack").mkdir()
    for image in sorted((data / "NG").glob("*.png"))[:4]:
        image.rename(data / "NG" / "crack" / image.name)
    (data / "GO" / "empty.png").write_bytes(b"")
    params = replace(
        BASE,
        data=replace(BASE.data, dir=str(data)),
        validate=replace(BASE.validate, min_per_class=10, cache_dir=str(tmp_path / "cache")),
    )
    with pytest.raises(ValidationFailed, match="zero-byte"):
        run_validate(params, tmp_path / "reports", report=lambda _: None)
    page = tmp_path / "reports" / "validation.html"
    assert external_references(page.read_text(encoding="utf-8")) == []

    shown = tables(offline_dom(page, tmp_path / "profile"))
    assert shown["counts"][1:] == [["GO", "12", "0.500"], ["NG", "12", "0.500"]]
    assert [row[0] for row in shown["splits"][1:]] == ["train", "validation", "test"]
    assert sum(int(row[1]) for row in shown["splits"][1:]) == 24
    assert shown["defect-types"][0][:2] == ["defect type", "images"]
    assert [row[:2] for row in shown["defect-types"][1:]] == [["crack", "4"], ["untyped", "8"]]
    expectations = {row[0]: row[1:] for row in shown["expectations"][1:]}
    assert set(expectations) == set(params.validate.severity)
    assert expectations["not_empty"] == ["blocking", "FAIL", "1"]
    assert expectations["readable"] == ["blocking", "pass", "0"]
    assert shown["failing-files"][1][:3] == ["blocking", str(data / "GO" / "empty.png"), "not_empty"]


def test_text_from_file_names_is_escaped():
    result = {
        "valid": False, "summary": "s", "entries": 1, "images": 1, "usable_images": 0,
        "blocking_failures": 1, "warnings": 0, "classes": {}, "defect_types": {},
        "splits": {"train": 0, "validation": 0, "test": 0}, "expectations": {},
        "failing_files": [{"severity": "blocking", "path": "data/GO/<script>x</script>.png",
                           "rule": "readable", "reason": "broken"}],
    }
    page = render_validation_page(result)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;.png" in page
