"""Stages hand their results on: after validate, no stage walks data/ or hashes an image.

Train, evaluate and the gate read validate's manifest and evaluate's scores; here the
folder walkers, the manifest builder and the hasher (on files under data/) raise, and
the three stages still run through, the gate twice against a champion: once scoring it,
once from its cached scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import make_image_folder, tiny_params, write_manifest


def _forbid(monkeypatch: pytest.MonkeyPatch, original: object, replacement: object) -> None:
    """Replace ``original`` in every loaded project module that imported it by name."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "tasks" or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                monkeypatch.setattr(module, attribute, replacement)


@pytest.mark.slow
def test_train_evaluate_and_gate_never_walk_or_hash_the_data(tmp_path, monkeypatch):
    import tasks.inference.scores  # noqa: F401 - loaded, so its imported names are patched too
    import tasks.model.evaluate  # noqa: F401
    import tasks.model.train  # noqa: F401
    import tasks.registry.gate  # noqa: F401
    import tasks.registry.publish  # noqa: F401
    from tasks import durable
    from tasks.data import dataset, manifest
    from tasks.model.evaluate import run_evaluate
    from tasks.model.train import run_train
    from tasks.params import replace
    from tasks.registry.gate import run_gate
    from tasks.registry.publish import publish

    data = make_image_folder(tmp_path / "data", per_class=24)
    params = tiny_params(data, epochs=1)
    params = replace(params, registry=replace(params.registry, dir=str(tmp_path / "registry")),
                     validate=replace(params.validate, cache_dir=str(tmp_path / "cache")),
                     gate=replace(params.gate, min_accuracy=0.0, max_escape_rate=1.0))
    reports = write_manifest(params, tmp_path / "reports")
    model = tmp_path / "candidate.h5"

    def walked(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a stage after validate walked the data folder: {args}")

    hash_file = durable.sha256_of

    def hash_outside_data(path: Path) -> str:
        assert not Path(path).resolve().is_relative_to(data.resolve()), f"a stage hashed {path}"
        return hash_file(path)

    for original in (dataset.walk_files, dataset.list_images, dataset.class_folders,
                     manifest.build_manifest, manifest.inspect_file):
        _forbid(monkeypatch, original, walked)
    _forbid(monkeypatch, hash_file, hash_outside_data)

    run_train(params, model, reports)
    run_evaluate(params, model, reports)
    first = run_gate(params, model, reports)
    assert first["champion"]["status"] == "none"
    publish(model, first, params, repo_dir=tmp_path)
    scored = run_gate(params, model, reports, record=False)
    cached = run_gate(params, model, reports, record=False)
    assert (scored["champion"]["scores_cached"], cached["champion"]["scores_cached"]) == (False, True)
    assert cached["champion"]["metrics"] == scored["champion"]["metrics"]
    assert cached["candidate"]["metrics"] == scored["candidate"]["metrics"] == first["candidate"]["metrics"]
