"""The validation report as one self-contained HTML page, written from validation.json.

GX Data Docs load bootstrap, jQuery and their fonts from CDNs and render blank on an
air-gapped line; this page carries its own style and no script, so it opens anywhere,
from the disk or from `fanaoi serve-model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment

from tasks.data.dataset import SPLITS

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>FanAOI validation: {{ verdict }}</title>
<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; }
.pass { color: #176117; font-weight: bold; }
.fail { color: #a11; font-weight: bold; }
.warn { color: #8a5a00; font-weight: bold; }
</style></head><body>
<h1>Validation: <span class="{{ 'pass' if r.valid else 'fail' }}">{{ verdict }}</span></h1>
<p id="summary">{{ r.summary }}</p>

<h2>Images</h2>
<table id="counts">
<tr><th>class</th><th>usable images</th><th>fraction</th></tr>
{% for name, c in r.classes.items() %}
<tr><td>{{ name }}</td><td class="n">{{ c.images }}</td><td class="n">{{ '%.3f' % c.fraction }}</td></tr>
{% endfor %}
</table>
<table id="splits">
<tr><th>split</th><th>usable images</th></tr>
{% for split in splits %}
<tr><td>{{ split }}</td><td class="n">{{ r.splits[split] }}</td></tr>
{% endfor %}
</table>
{% if r.defect_types %}
<h2>Defect types</h2>
<table id="defect-types">
<tr><th>defect type</th><th>images</th>{% for split in splits %}<th>{{ split }}</th>{% endfor %}</tr>
{% for kind, c in r.defect_types.items() %}
<tr><td>{{ kind }}</td><td class="n">{{ c.images }}</td>
{% for split in splits %}<td class="n">{{ c[split] }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endif %}

<h2>Expectations</h2>
<p>{{ r.entries }} entries, {{ r.images }} image files, {{ r.usable_images }} usable;
{{ r.blocking_failures }} blocking failure(s), {{ r.warnings }} warning(s).</p>
<table id="expectations">
<tr><th>expectation</th><th>severity</th><th>result</th><th>failing entries</th></tr>
{% for rule, e in r.expectations.items() %}
<tr><td>{{ rule }}</td><td>{{ 'blocking' if e.blocking else 'warning' }}</td>
<td class="{{ 'pass' if e.success else ('fail' if e.blocking else 'warn') }}">{{ 'pass' if e.success else 'FAIL' }}</td>
<td class="n">{{ e.unexpected }}</td></tr>
{% endfor %}
</table>

<h2>Failing files</h2>
{% if r.failing_files %}
<table id="failing-files">
<tr><th>severity</th><th>path</th><th>expectation</th><th>reason</th></tr>
{% for p in r.failing_files %}
<tr><td class="{{ 'fail' if p.severity == 'blocking' else 'warn' }}">{{ p.severity }}</td>
<td>{{ p.path }}</td><td>{{ p.rule }}</td><td>{{ p.reason }}</td></tr>
{% endfor %}
</table>
{% else %}
<p>None.</p>
{% endif %}
</body></html>
"""


def render_validation_page(result: dict[str, Any]) -> str:
    """The page for one validation result (the content of validation.json)."""
    template = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(_TEMPLATE)
    return template.render(r=result, verdict="valid" if result["valid"] else "INVALID", splits=SPLITS)


def write_validation_page(result: dict[str, Any], path: Path) -> Path:
    """Write the page for ``result`` to ``path``; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_validation_page(result), encoding="utf-8")
    return path
