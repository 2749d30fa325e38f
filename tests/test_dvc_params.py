"""dvc.yaml's ``params:`` lists are derived from what each stage reads.

Each stage command runs in-process on a tiny project while every read of a params key is
recorded (``Section.__getattribute__``); a stage must list every key it reads and nothing
it does not, so editing a key reruns exactly the stages that use it. A few keys say where
files go or how long to wait rather than what is computed: those are read unlisted, each
for the reason given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from flows.params import write_params
from tasks.params import Section, replace
from tests.conftest import make_image_folder, tiny_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

# Read by the stages but not deps: they place files or bound waiting, and change no result.
UNLISTED = {
    "paths": "where the stage files go; dvc.yaml names the same files as deps and outs",
    "lock": "how long a command waits for the project lock",
    "validate.cache_dir": "where the caches live (manifest rows, pixels, champion scores): no output changes",
    "train.checkpoint_dir": "where a killed run resumes from",
    "registry": "the registry is read and written beside the pipeline, never a dep (see dvc.yaml)",
}


def _covered(key: str, entries: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:depth]) in entries for depth in range(1, len(parts) + 1))


def _sections(section: Section) -> Iterator[Section]:
    yield section
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, Section):
            yield from _sections(value)


@contextmanager
def recording(reads: set[str]) -> Iterator[None]:
    """Record ``section.key`` for every read of a params field while inside.

    Only sections built from params.yaml or copied from them (both through ``Section.checked``)
    count: an input spec read back from a model file is not a params read. The reads of
    params' own checks while they are built do not count either.
    """
    original_checked = Section.__dict__["checked"]
    params_sections: set[int] = set()
    building = []

    def record(self: Section, name: str) -> object:
        value = object.__getattribute__(self, name)
        cls = type(self)
        if (not building and cls.KEY and name in cls.model_fields and id(self) in params_sections):
            reads.add(f"{cls.KEY}.{name}")
        return value

    def checked(cls: type[Section], raw: object, source: str = "params") -> Section:
        building.append(cls)
        try:
            built = original_checked.__func__(cls, raw, source)
            params_sections.update(id(section) for section in _sections(built))
            return built
        finally:
            building.pop()

    Section.__getattribute__ = record  # type: ignore[method-assign]
    Section.checked = classmethod(checked)  # type: ignore[assignment]
    try:
        yield
    finally:
        del Section.__getattribute__
        Section.checked = original_checked  # type: ignore[assignment]


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Each stage command of dvc.yaml run in order on a tiny project, with the keys it read."""
    import os

    from flows.cli import main

    root = tmp_path_factory.mktemp("project")
    make_image_folder(root / "data", per_class=24)
    params = tiny_params(root / "data", epochs=1)
    params = replace(
        params, data=replace(params.data, dir="data"), paths=replace(params.paths, reports="reports"),
        train=replace(params.train, checkpoint_dir="ckpt"), validate=replace(params.validate, min_per_class=5),
    )
    params_file = write_params(params, root / "params.yaml")
    reads: dict[str, set[str]] = {}
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for stage, spec in STAGES.items():
            reads[stage] = set()
            with recording(reads[stage]):
                code = main(["--params", str(params_file), *spec["cmd"].split()[1:]])
            assert code == 0, f"{spec['cmd']} exited {code}"
    finally:
        os.chdir(cwd)
    return reads


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_lists_exactly_the_params_it_reads(stage: str, stage_reads: dict[str, set[str]]) -> None:
    listed = set(STAGES[stage].get("params", []))
    read = {key for key in stage_reads[stage] if not _covered(key, set(UNLISTED))}
    missing = sorted(key for key in read if not _covered(key, listed))
    assert not missing, f"dvc.yaml: stage {stage} reads {missing} but does not list them under params"
    unread = sorted(entry for entry in listed if not any(_covered(key, {entry}) for key in read))
    assert not unread, f"dvc.yaml: stage {stage} lists {unread} under params but never reads them"


def test_a_listed_section_covers_its_keys_and_a_listed_key_only_itself() -> None:
    assert _covered("train.augment.flip", {"train"})
    assert _covered("evaluate.batch_size", {"evaluate.batch_size"})
    assert not _covered("evaluate.threshold", {"evaluate.batch_size"})
    assert not _covered("train", {"train.epochs"})
