"""Entry points over ``tasks``: Prefect flows, the ``fanaoi`` CLI and dvc stage commands."""
