"""The champion a training run starts from, when ``train.init_from`` asks for it.

The registry reads its champion; the model package checks and loads it
(tasks.model.warm_start): training never reads the registry itself.
"""

from __future__ import annotations

from pathlib import Path

from tasks.model.warm_start import WarmStart, find_warm_start
from tasks.params import Params
from tasks.registry.champion import read_champion
from tasks.registry.store import CHAMPION_MODEL


def champion_warm_start(params: Params) -> WarmStart | None:
    """What ``train.init_from`` asks training to start from: the champion, checked, or None."""
    registry_dir = Path(params.registry.dir)
    champion = read_champion(registry_dir) if params.train.init_from else None
    return find_warm_start(params.train.init_from, champion, registry_dir / CHAMPION_MODEL, params.data.class_mapping)
