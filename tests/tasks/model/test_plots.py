"""`dvc plots show` with the project's template draws its charts with the network cut."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.model.plots import PlotsTemplateError, configured_plots_template, render_plots_template
from tests.browser_support import external_references, offline_dom, requires_chromium
from tests.dvc_support import BIN, PROJECT, make_dvc_repo, run

PLOT_TITLES = ("Accuracy per epoch", "Loss per epoch", "Confusion matrix (validation)", "ROC (validation)")

# What the train and evaluate stages write, a few rows each, in their columns.
REPORTS = {
    "history.csv": "epoch,accuracy,val_accuracy,loss,val_loss\n0,0.61,0.55,0.69,0.71\n1,0.83,0.78,0.41,0.48\n"
                   "2,0.94,0.90,0.22,0.31\n",
    "plots/confusion.csv": "actual,predicted\nGO,GO\nGO,GO\nGO,NG\nNG,NG\nNG,NG\nNG,GO\n",
    "plots/roc.csv": "fpr,tpr,threshold\n0.0,0.0,1.0\n0.1,0.7,0.6\n0.3,0.9,0.4\n1.0,1.0,0.0\n",
}


@pytest.fixture
def plots_repo(tmp_path: Path) -> Path:
    """A DVC project with the real dvc.yaml plots and small reports; no template set."""
    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, repo / name)
    for name, text in REPORTS.items():
        (repo / "reports" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "reports" / name).write_text(text, encoding="utf-8")
    return repo


def rendered_titles(dom: str) -> list[str]:
    """Chart titles vega drew into the page (its SVG labels each one)."""
    return [title for title in PLOT_TITLES if f"Title text '{title}'" in dom]


def test_template_has_dvc_placeholders_and_no_external_script():
    template = render_plots_template()
    assert "{plot_divs}" in template and "{refresh_tag}" in template
    assert "{scripts}" not in template  # where DVC would put its CDN <script> tags
    assert external_references(template) == []
    assert "vegaEmbed" in template and "vegaLite" in template


def test_the_project_config_names_the_template_the_makefile_writes():
    assert configured_plots_template(PROJECT / ".dvc") == PROJECT / ".dvc" / "plots.html"
    assert ".dvc/plots.html" in (PROJECT / "Makefile").read_text(encoding="utf-8")


def test_a_project_without_a_template_is_told_how_to_set_one(tmp_path):
    repo = make_dvc_repo(tmp_path / "repo", remote=None)
    with pytest.raises(PlotsTemplateError, match=r"config: no plots.html_template; set it with `dvc config"):
        configured_plots_template(repo / ".dvc")


@requires_chromium
@pytest.mark.integration
def test_dvc_default_page_is_blank_offline(plots_repo, tmp_path):
    """The check below can fail: DVC's own page, vega from a CDN, draws nothing here."""
    run(plots_repo, str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "cdn"))
    page = tmp_path / "cdn" / "index.html"
    assert external_references(page.read_text(encoding="utf-8"))
    dom = offline_dom(page, tmp_path / "profile")
    assert rendered_titles(dom) == [] and 'class="marks"' not in dom


@requires_chromium
@pytest.mark.integration
def test_dvc_plots_show_with_the_template_draws_every_chart_offline(plots_repo, tmp_path):
    with (plots_repo / ".dvc" / "config").open("a", encoding="utf-8") as config:
        config.write("[plots]\n    html_template = plots.html\n")
    out = run(plots_repo, str(BIN / "fanaoi"), "plots-template").stdout
    assert f"wrote {plots_repo / '.dvc' / 'plots.html'}" in out
    run(plots_repo, str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "offline"))
    page = tmp_path / "offline" / "index.html"
    assert external_references(page.read_text(encoding="utf-8")) == []
    dom = offline_dom(page, tmp_path / "profile")
    assert rendered_titles(dom) == list(PLOT_TITLES)
    assert dom.count('class="marks"') == len(PLOT_TITLES)  # one vega SVG per chart
    assert "X-axis titled 'epoch'" in dom and "Y-axis titled 'tpr'" in dom
