"""Entry points over ``tasks``: Prefect flows, the ``fanaoi`` CLI, the HTTP model service and the DVC-stage glue."""
