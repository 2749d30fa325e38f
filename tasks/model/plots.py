"""An HTML template for `dvc plots show` that draws the charts with no network.

DVC's own page loads vega, vega-lite and vega-embed from a CDN and stays blank on an
air-gapped line. This template carries the three libraries inline, bundled by
vl-convert-python (a locked dependency), so the JavaScript is the version the lock
pins. `.dvc/config` names the template (``plots.html_template``), so a plain
`dvc plots show` or `dvc plots diff` uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.durable import atomic_write
from tasks.errors import FanaoiError

# SVG instead of vega-embed's default canvas: the charts' text (titles, axes, legends) is
# in the page, so it can be searched and checked. The "Open in Vega Editor" action is
# left out: that editor is a web site.
EMBED_OPTIONS = {"renderer": "svg", "actions": {"export": True, "source": True, "compiled": True, "editor": False}}

# DVC's plot divs call the global vegaEmbed(element, spec); these defaults apply to them.
_GLOBALS = (
    "window.vega = vega;\n"
    "window.vegaLite = vegaLite;\n"
    "window.vegaEmbed = (element, spec, options) => vegaEmbed(element, spec, {{...{options}, ...options}});\n"
)

# DVC fills {plot_divs} (and {refresh_tag} with --open's auto refresh); there is no
# {scripts}, where DVC would put its CDN <script> tags.
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>FanAOI plots</title>
    <script>
{bundle}
    </script>
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class PlotsTemplateError(FanaoiError):
    """The DVC project names no plots template; the message says how to set one."""


def render_plots_template() -> str:
    """The template: DVC's placeholders around an inline vega + vega-lite + vega-embed bundle."""
    import vl_convert  # imported here: it loads a JavaScript runtime

    bundle = vl_convert.javascript_bundle(_GLOBALS.format(options=json.dumps(EMBED_OPTIONS)))
    return _PAGE.format(bundle=bundle)


def write_plots_template(path: Path) -> Path:
    """Write the template to ``path`` (atomically: DVC may read it meanwhile); returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_plots_template().encode("utf-8")
    atomic_write(path, lambda handle: handle.write(page))
    return path


def configured_plots_template(dvc_dir: Path) -> Path:
    """Where `dvc plots show` looks for its template: ``plots.html_template`` of the DVC
    config in ``dvc_dir`` (``.dvc``), relative to that folder as DVC resolves it."""
    from dvc.config import Config

    template = Config(str(dvc_dir)).get("plots", {}).get("html_template")
    if not template:
        raise PlotsTemplateError(
            f"{dvc_dir / 'config'}: no plots.html_template; set it with "
            "`dvc config plots.html_template plots.html`"
        )
    return dvc_dir / template
