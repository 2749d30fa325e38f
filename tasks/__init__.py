"""FanAOI pipeline logic as plain functions (no orchestration imports)."""
