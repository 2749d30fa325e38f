"""Names the nightly flow writes and the read-only commands look up (no Prefect import).

``fanaoi status`` reads the Prefect API with plain HTTP to answer in well under two
seconds; importing Prefect alone takes longer than that on a busy 2-core machine.
"""

from __future__ import annotations

NIGHTLY_FLOW = "nightly-retrain"
DEPLOYMENT_NAME = "nightly"
REPORT_KEY = "nightly-retrain-report"
METRICS_KEY = "nightly-retrain-metrics"
DEFECT_TYPES_KEY = "nightly-retrain-defect-types"

# The final state name of a nightly run that finished: Prefect's runs list shows a
# Completed-type state's own name (as it shows "Cached"), so the decision is seen there
# without opening the report. Failures keep Prefect's Failed, Crashed and TimedOut.
DECISION_STATES = {"promote": "Promoted", "reject": "Rejected", "unchanged": "Unchanged"}

# The report artifact's description is "nightly retrain: <decision>": the dashboard shows
# it in the artifact list, and `fanaoi status` reads the decision back from it.
REPORT_DESCRIPTION = "nightly retrain: "


def report_description(decision: str) -> str:
    return f"{REPORT_DESCRIPTION}{decision}"


def decision_of(description: str | None) -> str | None:
    """The decision recorded by :func:`report_description`, or None for another text."""
    if description and description.startswith(REPORT_DESCRIPTION):
        return description.removeprefix(REPORT_DESCRIPTION)
    return None
