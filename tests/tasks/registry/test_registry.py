import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.data.dataset import sha256_of
from tasks.inference.model_file import load_model
from tasks.registry.champion import champion_card, read_champion
from tasks.registry.decisions import (
    champion_at,
    decision_entry,
    parse_time,
    read_log,
    record_decision,
    reject_streak,
    rollback,
)
from tasks.registry.publish import PublishError, publish
from tasks.registry.store import (
    CHAMPION_CARD,
    CHAMPION_MODEL,
    RegistryError,
    RegistryLockedError,
    list_versions,
    registry_lock,
    version_name,
)
from tests.tasks.champion_support import (
    copy_registry,
    flip_weight_bytes,
    gate_candidate,
    gate_params,
    good_model,
    one_version_registry,
    save_random_model,
    two_version_registry,
)


def test_version_names_are_normalised():
    assert version_name("3") == version_name("v3") == version_name("v0003") == "v0003"
    with pytest.raises(RegistryError, match="versions look like v0003"):
        version_name("latest")


def test_lock_held_elsewhere_gives_a_clear_error(tmp_path):
    with registry_lock(tmp_path), pytest.raises(RegistryLockedError) as caught:
        with registry_lock(tmp_path, timeout=0.2):
            pass
    message = str(caught.value)
    assert f"another FanAOI run (pid {os.getpid()} on " in message
    assert str(tmp_path) in message and "registry.lock_timeout" in message
    with registry_lock(tmp_path, timeout=0.2):  # released: the next one gets it at once
        pass


@pytest.mark.integration
def test_lock_is_exclusive_across_processes_and_freed_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from tasks.registry.store import registry_lock
            with registry_lock({str(tmp_path)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegistryLockedError, match=f"pid {holder.pid} on "):
            with registry_lock(tmp_path, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with registry_lock(tmp_path, timeout=2):
        pass


def test_champion_at_answers_from_the_log(tmp_path):
    lines = [
        {"time": "2026-11-01T02:00:00+00:00", "action": "promote", "version": "v0001"},
        {"time": "2026-11-02T02:00:00+00:00", "action": "reject", "version": None},
        {"time": "2026-11-03T02:00:00+00:00", "action": "force", "version": "v0002"},
        {"time": "2026-11-03T09:30:00+00:00", "action": "rollback", "version": "v0001"},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"time": "2026-11-0')
    assert champion_at(tmp_path, parse_time("2026-10-31T23:00Z")) is None
    assert champion_at(tmp_path, parse_time("2026-11-02T12:00Z"))["version"] == "v0001"
    assert champion_at(tmp_path, parse_time("2026-11-03T09:00Z"))["version"] == "v0002"
    assert champion_at(tmp_path, datetime(2026, 11, 4, tzinfo=UTC))["action"] == "rollback"
    with pytest.raises(RegistryError, match="not a time"):
        parse_time("yesterday")


def test_empty_registry_has_no_champion(tmp_path):
    assert read_champion(tmp_path) is None
    with pytest.raises(RegistryError, match="no champion yet"):
        champion_card(tmp_path)


@pytest.mark.slow
def test_first_publish_writes_champion_card_version_and_log(data_dir, base):
    registry = one_version_registry(data_dir, base)
    card = json.loads((registry / CHAMPION_CARD).read_text())
    assert card == json.loads((registry / "versions" / "v0001" / "card.json").read_text())
    assert card["version"] == "v0001" and card["action"] == "promote"
    assert card["class_mapping"] == {"GO": 0, "NG": 1} and card["positive_class"] == "NG"
    assert card["input_size"] == [32, 32] and card["preprocessing"]["color_mode"] == "rgb"
    assert card["threshold"] == 0.5 and card["metrics"]["validation"]["accuracy"] >= 0.8
    assert card["params"]["gate"]["min_accuracy"] == 0.8
    assert card["git_revision"] is None or len(card["git_revision"]) == 40
    assert read_champion(registry).card == card  # the card embedded in champion.h5, verified
    assert card["model_sha256"] == sha256_of(registry / "versions/v0001/model.h5")
    assert (registry / CHAMPION_MODEL).read_bytes() == (registry / "versions/v0001/model.h5").read_bytes()
    [entry] = read_log(registry)
    assert entry["action"] == "promote" and entry["version"] == "v0001" and entry["previous"] is None


@pytest.mark.slow
def test_rollback_restores_the_earlier_bytes(data_dir, base, tmp_path):
    first_bytes = (one_version_registry(data_dir, base) / CHAMPION_MODEL).read_bytes()
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    assert read_champion(registry).version == "v0002"
    assert (registry / CHAMPION_MODEL).read_bytes() != first_bytes
    card = rollback(gate_params(data_dir, registry).registry, "1", reason="v2 overkills on line 3")
    assert card["version"] == "v0001"
    assert (registry / CHAMPION_MODEL).read_bytes() == first_bytes
    assert json.loads((registry / CHAMPION_CARD).read_text())["version"] == "v0001"
    last = read_log(registry)[-1]
    assert (last["action"], last["version"], last["previous"]) == ("rollback", "v0001", "v0002")
    assert last["reasons"] == ["v2 overkills on line 3"]
    with pytest.raises(RegistryError, match="v0009: no such published version; versions: v0001, v0002"):
        rollback(gate_params(data_dir, registry).registry, "v9")


@pytest.mark.slow
def test_crash_between_write_and_rename_leaves_the_old_champion(data_dir, base, tmp_path, monkeypatch):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    before = (registry / CHAMPION_MODEL).read_bytes(), (registry / CHAMPION_CARD).read_bytes()
    # The champion's own model again: a tie, which min_delta 0 promotes.
    params = gate_params(data_dir, registry, min_accuracy=0.0, min_delta=0.0, max_escape_rate=1.0,
                         max_escape_increase=1.0, max_overkill_increase=1.0)
    candidate = Path(shutil.copy(good_model(data_dir, base), tmp_path / "candidate.h5"))
    result = gate_candidate(params, candidate, tmp_path / "reports")
    assert result["decision"] == "promote"

    def crash(source, target):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        publish(candidate, result, params)
    monkeypatch.undo()
    assert ((registry / CHAMPION_MODEL).read_bytes(), (registry / CHAMPION_CARD).read_bytes()) == before
    assert read_champion(registry).version == "v0001"
    assert load_model(registry / CHAMPION_MODEL).count_params() > 0
    assert not list(registry.glob(".*.tmp"))  # the temp file was removed
    assert [e["action"] for e in read_log(registry)] == ["promote"]


@pytest.mark.slow
def test_crash_between_model_and_card_keeps_them_in_agreement(data_dir, base, tmp_path, monkeypatch):
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    real_replace, calls = os.replace, []

    def crash_on_card(source, target):
        calls.append(target)
        if Path(target).name == CHAMPION_CARD:
            raise OSError(5, "Input/output error", str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_card)
    with pytest.raises(OSError):
        rollback(gate_params(data_dir, registry).registry, "v0001")
    monkeypatch.undo()
    # champion.h5 is v0001 now, champion.json still says v0002: the model file decides.
    assert json.loads((registry / CHAMPION_CARD).read_text())["version"] == "v0002"
    champion = read_champion(registry)
    assert champion.version == "v0001" and champion.problem is None
    assert champion_card(registry) == json.loads((registry / "versions/v0001/card.json").read_text())


@pytest.mark.slow
def test_candidate_that_does_not_reproduce_in_a_fresh_process_is_not_published(data_dir, base, tmp_path):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    before = (registry / CHAMPION_MODEL).read_bytes()
    params = gate_params(data_dir, registry)
    good = good_model(data_dir, base)
    result = gate_candidate(params, good, tmp_path / "reports", record=False)
    result["decision"] = "promote"
    swapped = save_random_model(params, tmp_path / "swapped.h5")  # not the file the gate scored
    with pytest.raises(PublishError, match="where the gate measured .* not published"):
        publish(swapped, result, params)
    assert (registry / CHAMPION_MODEL).read_bytes() == before
    assert list_versions(registry) == ["v0001"]
    assert not list((registry / "versions").glob(".incoming-*"))
    last = read_log(registry)[-1]
    assert last["action"] == "reject" and "fresh process" in last["reasons"][0]


def test_publishing_a_rejected_candidate_needs_force(data_dir, tmp_path):
    params = gate_params(data_dir, tmp_path / "registry")
    rejected = {"decision": "reject", "failed": ["accuracy 0.5 >= floor 0.8: FAIL"]}
    with pytest.raises(PublishError, match=r"gate rejected it \(accuracy 0.5 >= floor 0.8: FAIL\).*--force"):
        publish(tmp_path / "candidate.h5", rejected, params)
    assert not (tmp_path / "registry").exists()


@pytest.mark.slow
def test_flipped_weight_bits_are_caught_on_load_and_rollback_repairs_them(data_dir, base, tmp_path):
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    flip_weight_bytes(registry / CHAMPION_MODEL)

    champion = read_champion(registry)
    assert champion.version == "v0002"
    assert champion.problem.startswith(f"{registry / CHAMPION_MODEL}: its sha256 ")
    assert "is not that of v0002 as published" in champion.problem
    assert champion.problem.endswith("restore it with `fanaoi rollback v0002`")
    with pytest.raises(RegistryError, match="fanaoi rollback v0002"):
        champion_card(registry)

    rollback(gate_params(data_dir, registry).registry, "v0002", reason="weights damaged")
    assert read_champion(registry).problem is None


@pytest.mark.slow
def test_a_damaged_version_is_not_rolled_back_to(data_dir, base, tmp_path):
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    before = (registry / CHAMPION_MODEL).read_bytes()
    flip_weight_bytes(registry / "versions" / "v0001" / "model.h5")
    with pytest.raises(RegistryError, match=r"v0001/model.h5: its sha256 .* roll back to another "
                                            r"version \(v0002\)"):
        rollback(gate_params(data_dir, registry).registry, "v0001")
    assert (registry / CHAMPION_MODEL).read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("content", ["[1, 2]", '"v0001"', "null", "{not json"])
def test_a_champion_json_that_is_not_a_card_falls_back_to_the_embedded_one(
    data_dir, base, tmp_path, caplog, content
):
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    (registry / CHAMPION_CARD).write_text(content)

    champion = read_champion(registry)

    assert champion.version == "v0002" and champion.problem is None
    assert "using the card inside the model" in caplog.text
    assert champion_card(registry)["version"] == "v0002"
    rollback(gate_params(data_dir, registry).registry, "v0001")  # and rollback repairs the file
    assert json.loads((registry / CHAMPION_CARD).read_text())["version"] == "v0001"


@pytest.mark.slow
def test_leftovers_of_a_killed_publish_are_removed_by_the_next_command(data_dir, base, tmp_path):
    registry = copy_registry(two_version_registry(data_dir, base), tmp_path / "registry")
    staged = registry / "versions" / ".incoming-v0003"
    staged.mkdir()
    (staged / "model.h5").write_bytes(b"half a model")
    (registry / ".champion.h5.k1ll3d.tmp").write_bytes(b"half a champion")
    (registry / ".card-k1ll3d").mkdir()

    rollback(gate_params(data_dir, registry).registry, "v0001")

    assert not staged.exists() and not list(registry.glob(".*.tmp"))
    assert not list(registry.glob(".card-*"))
    assert list_versions(registry) == ["v0001", "v0002"]


class Killed(BaseException):
    """What a kill does to a publish: it stops where it is, no `except Exception` runs."""


@pytest.mark.slow
def test_a_publish_killed_during_the_champion_copy_is_finished_by_the_next_command(
    data_dir, base, tmp_path, monkeypatch
):
    import tasks.registry.store

    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params = gate_params(data_dir, registry)
    good = good_model(data_dir, base)
    result = gate_candidate(params, good, tmp_path / "reports", record=False)
    result["decision"] = "promote"
    copy = tasks.registry.store.copy_atomic

    def killed_at_the_champion(source, target):
        if target.name == CHAMPION_MODEL:
            raise Killed
        copy(source, target)

    monkeypatch.setattr(tasks.registry.store, "copy_atomic", killed_at_the_champion)
    with pytest.raises(Killed):
        publish(good, result, params)
    monkeypatch.undo()
    assert list_versions(registry) == ["v0001", "v0002"] and read_champion(registry).version == "v0001"

    reject = {**result, "decision": "reject"}
    record_decision(params.registry, decision_entry("reject", reject, None, "v0002", ["worse"]))

    assert [(e["action"], e["version"]) for e in read_log(registry)] == [
        ("promote", "v0001"), ("promote", "v0002"), ("reject", None)]
    assert read_champion(registry).version == "v0002" and read_champion(registry).problem is None
    assert sorted(p.name for p in (registry / "versions" / "v0002").iterdir()) == ["card.json", "model.h5"]


@pytest.mark.integration
def test_the_smoke_test_process_dies_with_a_killed_publisher(data_dir, base):
    import psutil

    model = one_version_registry(data_dir, base) / "versions" / "v0001" / "model.h5"
    image = next((data_dir / "GO").iterdir())
    code = (f"from pathlib import Path; from tasks.registry.publish import smoke_test; "
            f"smoke_test(Path({str(model)!r}), [{{'path': {str(image)!r}, 'probability': 0.5}}])")
    publisher = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3])
    try:
        children: list = []
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline:
            children = psutil.Process(publisher.pid).children()
            time.sleep(0.02)
        assert children, "the smoke test never started"
        publisher.kill()  # SIGKILL while the child is still importing TensorFlow
        publisher.wait()

        def ended(process) -> bool:
            try:
                return process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 3  # far less than the child needs to finish on its own
        while not all(map(ended, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(map(ended, children)), "the smoke test process outlived its publisher"
    finally:
        publisher.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def test_reject_streak_counts_rejections_since_the_last_other_decision():
    actions = ["promote", "reject", "rollback", "reject", "reject"]
    assert reject_streak([{"action": action} for action in actions]) == 2
    assert reject_streak([{"action": "reject"}] * 3) == 3
    assert reject_streak([{"action": "reject"}, {"action": "promote"}]) == 0
    assert reject_streak([]) == 0


def test_a_tie_at_the_ceiling_ends_the_reject_streak_like_a_promotion():
    worse, tie = {"action": "reject"}, {"action": "reject", "tie": True}
    assert reject_streak([worse, worse, tie]) == 0  # the nights: no alert
    assert reject_streak([worse, tie, worse, worse]) == 2
    assert reject_streak([tie, worse, {"action": "reject", "tie": False}]) == 2


@pytest.mark.slow
def test_an_operators_reason_goes_to_the_card_and_the_log_on_one_line(data_dir, base, tmp_path):
    registry = copy_registry(one_version_registry(data_dir, base), tmp_path / "registry")
    params = gate_params(data_dir, registry)
    forged = "v2 bad\n2026-01-01T00:00:00+00:00    promote  v0009\x1b[2J"
    escaped = r"v2 bad\n2026-01-01T00:00:00+00:00    promote  v0009\x1b[2J"
    candidate = good_model(data_dir, base)
    result = gate_candidate(params, candidate, tmp_path / "reports")

    card = publish(candidate, result, params, force_reason=forged)
    rollback(params.registry, "1", reason=forged)

    assert card["reason"] == escaped and read_champion(registry).version == "v0001"
    forced, rolled_back = read_log(registry)[-2:]
    assert forced["reasons"][-1] == f"forced by operator: {escaped}" and rolled_back["reasons"] == [escaped]
