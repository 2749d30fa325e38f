"""One route per deployment: `fanaoi serve` takes over a deployment `prefect deploy` bound to a work pool.

A served deployment keeps the work pool, pull steps and storage of the one it updates, so
after `prefect deploy --all` every run `fanaoi serve` starts crashes looking for flow code
in storage at None. Serving replaces such a deployment instead: the old one is deleted
with the automations of its triggers (the server deletes a deployment but not those), and
`serve` creates it again, with its own trigger, for this process to run.
"""

from __future__ import annotations

from prefect import get_client
from prefect.exceptions import ObjectNotFound


def replace_pool_deployment(full_name: str) -> str | None:
    """Delete the deployment ``flow/name`` and its triggers' automations when a work pool runs it.

    Returns that work pool's name; None when there is no such deployment or no pool runs it
    (a deployment `fanaoi serve` made before: `serve` updates it in place).
    """
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(full_name)
        except ObjectNotFound:
            return None
        if not deployment.work_pool_name:
            return None
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
        client.delete_deployment(deployment.id)
        return deployment.work_pool_name
