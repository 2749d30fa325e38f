"""The project's HTML pages, rendered from the Jinja2 templates shipped in tasks/templates/.

Every page is one self-contained file (inline style and SVG, pictures beside it, no
script, no CDN), so it opens on an air-gapped line from the disk or from `fanaoi serve-model`.
"""

from __future__ import annotations

import functools
import html
from typing import Any

from jinja2 import Environment, PackageLoader
from markupsafe import Markup


def _escaped(value: Any) -> Any:
    # html.escape rather than markupsafe's escape: a quote stays &#x27;, the entity the pages always had.
    return Markup(html.escape(value)) if isinstance(value, str) and not isinstance(value, Markup) else value


@functools.cache
def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("tasks", "templates"), autoescape=True, finalize=_escaped,
        trim_blocks=True, lstrip_blocks=True,
    )


def render_page(template: str, **context: Any) -> str:
    """The page of ``template`` (a file name in tasks/templates/) filled with ``context``."""
    return _environment().get_template(template).render(**context)
