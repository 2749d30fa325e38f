"""Validate stage: a Great Expectations suite over the manifest, a verdict for every file.

Every rule is a GX expectation on a column of the manifest (or of a per-class table);
checks GX cannot express directly (label conflicts, near-duplicates, brightness) are
computed here as a column first. ``validate.severity`` in params marks each rule
blocking or warning. Nothing under the data folder is ever written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.data.dataset import SPLITS, UNTYPED, DatasetError
from tasks.data.image_check import format_reason, mode_reason, side_reason
from tasks.data.image_manifest import manifest_path, write_image_manifest
from tasks.data.manifest import (
    IMAGE,
    LOOSE_FILE,
    OTHER_FILE,
    OUTSIDE_LINK,
    UNEXPECTED_FOLDER,
    build_manifest,
)
from tasks.data.near_duplicates import nearest_train_images
from tasks.data.validation_page import write_validation_page
from tasks.durable import cache_file, details_path, write_stage_report
from tasks.errors import FanaoiError
from tasks.params import Params, ValidateParams

log = logging.getLogger(__name__)

SUITE_FILES = "fanaoi_files"
SUITE_CLASSES = "fanaoi_classes"
# Not GX Data Docs: they load bootstrap and jQuery from CDNs, blank on an offline line.
VALIDATION_PAGE = "validation.html"
_MAD_TO_SIGMA = 1.4826  # median absolute deviation of a normal distribution -> its sigma
_MIN_BRIGHTNESS_SPREAD = 1.0  # grey levels: a class of identical images has MAD 0
_MESSAGE_PROBLEMS = 5  # problems named in the one-line error; the report has them all


class ValidationFailed(FanaoiError):
    """A blocking expectation failed; the message names the files and why."""


def run_validate(
    params: Params,
    reports_dir: Path | str | None = None,
    report: Callable[[str], None] = log.info,
) -> dict:
    """Check the data folder; write validation.json and its page; raise on a blocking failure."""
    data_dir = Path(params.data.dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"{data_dir}: data folder not found; create it with one subfolder per class "
            f"({', '.join(params.data.classes)}) or run `fanaoi demo-data {data_dir}`"
        )
    rules = params.validate
    manifest = build_manifest(data_dir, params.data, rules, rules.cache_dir)
    leak_cache = (
        cache_file(rules.cache_dir, data_dir, "near-duplicates") if rules.cache_dir is not None else None
    )
    files = add_rule_columns(manifest, rules, leak_cache)
    classes = class_table(files, params.data.classes)
    reports_dir = Path(reports_dir or params.paths.reports)
    outcomes = run_expectations(files, classes, rules)
    result = summarize(files, classes, outcomes, rules, data_dir)
    result["page"] = str(reports_dir / VALIDATION_PAGE)
    write_stage_report(reports_dir / "validation.json", result, validation_metrics(result))
    # The manifest is what later stages train and score on: only a data set that passed has one.
    if result["valid"]:
        write_image_manifest(usable_images(files), params.data, manifest_path(reports_dir))
    else:
        manifest_path(reports_dir).unlink(missing_ok=True)
    write_validation_page(result, reports_dir / VALIDATION_PAGE)
    for problem in result["failing_files"]:
        report(f"{problem['severity']}: {problem['path']}: {problem['reason']} [{problem['rule']}]")
    report(result["summary"])
    if not result["valid"]:
        raise ValidationFailed(_failure_message(result, details_path(reports_dir / "validation.json")))
    return result


def validation_metrics(result: dict) -> dict:
    """The numbers of validation.json, the stage's DVC metric; the rest is in validation-details.json."""
    failed = sum(not outcome["success"] for outcome in result["expectations"].values())
    counts = ("valid", "images", "usable_images", "blocking_failures", "warnings", "splits")
    return {**{key: result[key] for key in counts}, "failed_expectations": failed}


def add_rule_columns(
    manifest: pd.DataFrame, rules: ValidateParams, leak_cache: Path | None = None,
) -> pd.DataFrame:
    """The manifest plus one column per derived check; null where a rule does not apply.

    ``leak_cache`` keeps the near-duplicate answers between runs (tasks.data.near_duplicates).
    """
    files = manifest.copy()
    image = files["kind"] == IMAGE
    usable = image & files["decodable"].fillna(False).astype(bool)
    # A zero-byte file fails not_empty; leave it out of readable so it is named once.
    files["readable"] = files["decodable"].where(image & (files["bytes"] > 0))
    files["class_sha256"] = (files["class_name"] + "/" + files["sha256"]).where(usable)
    classes_per_hash = files[usable].groupby("sha256")["class_name"].nunique()
    files["classes_with_same_bytes"] = files["sha256"].map(classes_per_hash).where(usable)
    files["brightness_z"] = _robust_z(files["brightness"].where(usable), files["class_name"])
    distance, nearest = _nearest_train_image(
        files, usable, rules.near_duplicate_distance, leak_cache,
    )
    files["train_dhash_distance"] = distance
    files["nearest_train_image"] = nearest
    return files


def _robust_z(values: pd.Series, groups: pd.Series) -> pd.Series:
    """Distance from the group median in robust standard deviations (median absolute dev.)."""
    median = values.groupby(groups).transform("median")
    spread = (values - median).abs().groupby(groups).transform("median") * _MAD_TO_SIGMA
    return ((values - median) / spread.clip(lower=_MIN_BRIGHTNESS_SPREAD)).round(2)


def _nearest_train_image(
    files: pd.DataFrame, usable: pd.Series, radius: int, cache_path: Path | None,
) -> tuple[pd.Series, pd.Series]:
    """For each validation/test image within ``radius`` dHash bits of a train image: the
    bits to the closest one, and its path (null for the others)."""
    distance = pd.Series(np.nan, index=files.index)
    nearest = pd.Series(None, index=files.index, dtype=object)
    train = files[usable & (files["split"] == "train")]
    held_out = files[usable & files["split"].isin(["validation", "test"])]
    if train.empty or held_out.empty:
        return distance, nearest
    found = nearest_train_images(
        dict(zip(train["path"], train["dhash"], strict=True)),
        dict(zip(held_out["path"], held_out["dhash"], strict=True)),
        radius, cache_path,
    )
    distance[held_out.index] = [np.nan if d is None else d for d in found.distance]
    nearest[held_out.index] = found.nearest
    return distance, nearest


def class_table(files: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """One row per class of params: its folder, usable images and share of all of them."""
    usable = files[(files["kind"] == IMAGE) & files["readable"].fillna(False).astype(bool)]
    counts = usable["class_name"].value_counts()
    images = [int(counts.get(name, 0)) for name in class_names]
    total = sum(images)
    return pd.DataFrame({
        "folder": [f"{name}/" for name in class_names],
        "class_name": list(class_names),
        "images": images,
        "fraction": [round(n / total, 4) if total else 0.0 for n in images],
    })


def _expectations(gxe: Any, rules: ValidateParams) -> list[tuple[str, str, Any]]:
    """(rule, table, expectation) for every rule of ``validate.severity``."""
    def files(rule: str, expectation: type, **kwargs: Any) -> tuple[str, str, Any]:
        return rule, SUITE_FILES, expectation(**kwargs, meta={"rule": rule})

    def not_kind(rule: str, kind: str) -> tuple[str, str, Any]:
        return files(rule, gxe.ExpectColumnValuesToNotBeInSet, column="kind", value_set=[kind])

    per_class = {"meta": {"rule": "min_per_class"}}
    return [
        files("readable", gxe.ExpectColumnValuesToBeInSet, column="readable", value_set=[True]),
        files("not_empty", gxe.ExpectColumnValuesToBeBetween, column="bytes", min_value=1),
        files("format_allowed", gxe.ExpectColumnValuesToBeInSet, column="format",
              value_set=list(rules.formats)),
        files("mode_allowed", gxe.ExpectColumnValuesToBeInSet, column="mode",
              value_set=list(rules.modes)),
        files("width_in_bounds", gxe.ExpectColumnValuesToBeBetween, column="width",
              min_value=rules.min_side, max_value=rules.max_side),
        files("height_in_bounds", gxe.ExpectColumnValuesToBeBetween, column="height",
              min_value=rules.min_side, max_value=rules.max_side),
        not_kind("image_files_only", OTHER_FILE),
        not_kind("no_loose_files", LOOSE_FILE),
        not_kind("no_unexpected_folders", UNEXPECTED_FOLDER),
        not_kind("no_symlink_outside", OUTSIDE_LINK),
        files("unique_in_class", gxe.ExpectColumnValuesToBeUnique, column="class_sha256"),
        files("no_label_conflict", gxe.ExpectColumnValuesToBeBetween,
              column="classes_with_same_bytes", max_value=1),
        files("no_near_duplicate_leak", gxe.ExpectColumnValuesToBeBetween,
              column="train_dhash_distance", min_value=rules.near_duplicate_distance + 1),
        files("brightness_in_range", gxe.ExpectColumnValuesToBeBetween, column="brightness_z",
              min_value=-rules.brightness_max_z, max_value=rules.brightness_max_z),
        ("min_per_class", SUITE_CLASSES, gxe.ExpectColumnValuesToBeBetween(
            column="images", min_value=rules.min_per_class, **per_class)),
        ("class_fraction", SUITE_CLASSES, gxe.ExpectColumnValuesToBeBetween(
            column="fraction", min_value=rules.min_class_fraction,
            meta={"rule": "class_fraction"})),
    ]


def run_expectations(files: pd.DataFrame, classes: pd.DataFrame, rules: ValidateParams) -> dict[str, dict]:
    """Run both suites in an ephemeral GX context; rule -> outcome.

    An outcome is {"success": bool, "unexpected": [key, ...]}, the key being the path
    (files) or folder (classes) of each row that broke the rule.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX logs its own set-up (hundreds of lines) at INFO; our report says what matters.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # Imported here: GX takes seconds to import and only this stage needs it.
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = gx.get_context(mode="ephemeral", project_config=_context_config())
    source = context.data_sources.add_pandas("manifest")
    suites = {name: context.suites.add(gx.ExpectationSuite(name=name))
              for name in (SUITE_FILES, SUITE_CLASSES)}
    for _, table, expectation in _expectations(gxe, rules):
        suites[table].add_expectation(expectation)
    outcomes: dict[str, dict] = {}
    for table, frame, key in ((SUITE_FILES, files, "path"), (SUITE_CLASSES, classes, "folder")):
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suites[table])
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
        )
        for item in result.results:
            rows = item.result.get("unexpected_index_list") or []
            outcomes[item.expectation_config.meta["rule"]] = {
                "success": bool(item.success),
                "unexpected": [row[key] for row in rows],
            }
    return outcomes


def _context_config() -> Any:
    """In-memory stores, no progress bars and no Data Docs site (the page is ours)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={},
        progress_bars=ProgressBarsConfig(globally=False),
    )


def summarize(
    files: pd.DataFrame,
    classes: pd.DataFrame,
    outcomes: dict[str, dict],
    rules: ValidateParams,
    data_dir: Path,
) -> dict:
    """The validation.json content: counts, per-expectation results, failing files + why."""
    by_path = files.set_index("path", drop=False)
    by_folder = classes.set_index("folder", drop=False)
    problems = []
    for rule, outcome in outcomes.items():
        table = by_folder if rule in ("min_per_class", "class_fraction") else by_path
        for key in outcome["unexpected"]:
            problems.append({
                "path": str(data_dir / key),
                "rule": rule,
                "severity": rules.severity[rule],
                "reason": REASONS[rule](table.loc[key], _Context(files, rules, data_dir)),
            })
    problems.sort(key=lambda p: (p["severity"] != "blocking", p["path"], p["rule"]))
    blocking = sum(p["severity"] == "blocking" for p in problems)
    usable = usable_images(files)
    result = {
        "valid": blocking == 0,
        "entries": len(files),
        "images": int((files["kind"] == IMAGE).sum()),
        "usable_images": len(usable),
        "blocking_failures": blocking,
        "warnings": len(problems) - blocking,
        "classes": {row.class_name: {"images": int(row.images), "fraction": float(row.fraction)}
                    for row in classes.itertuples()},
        "splits": {split: int((usable["split"] == split).sum()) for split in SPLITS},
        "defect_types": defect_type_counts(usable),
        "expectations": {
            rule: {
                "success": outcome["success"],
                "blocking": rules.severity[rule] == "blocking",
                "unexpected": len(outcome["unexpected"]),
            }
            for rule, outcome in outcomes.items()
        },
        "failing_files": problems,
    }
    result["summary"] = _summary_line(result, data_dir)
    return result


def usable_images(files: pd.DataFrame) -> pd.DataFrame:
    """The images later stages use: in a class folder and readable (the manifest file's rows)."""
    return files[(files["kind"] == IMAGE) & files["readable"].fillna(False).astype(bool)]


def defect_type_counts(usable: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Usable positive-class images per defect type, in all and per split, sorted by type."""
    typed = usable[usable["defect_type"].notna()]
    return {
        kind: {"images": len(group), **{split: int((group["split"] == split).sum()) for split in SPLITS}}
        for kind, group in typed.groupby("defect_type")
    }


def _summary_line(result: dict, data_dir: Path) -> str:
    per_class = ", ".join(f"{name} {c['images']}" for name, c in result["classes"].items())
    if set(result["defect_types"]) - {UNTYPED}:  # a data set with NG subfolders
        per_class += "; defect types: " + ", ".join(
            f"{kind} {c['images']} ({c['validation']} in validation)" for kind, c in result["defect_types"].items()
        )
    verdict = "valid" if result["valid"] else "INVALID"
    return (
        f"validation of {data_dir}: {verdict}; {result['usable_images']} usable images "
        f"({per_class}) of {result['entries']} entries; {result['blocking_failures']} "
        f"blocking failure(s), {result['warnings']} warning(s)"
    )


def _failure_message(result: dict, report_path: Path) -> str:
    blocking = [p for p in result["failing_files"] if p["severity"] == "blocking"]
    named = "; ".join(f"{p['path']}: {p['reason']}" for p in blocking[:_MESSAGE_PROBLEMS])
    unnamed = len(blocking) - _MESSAGE_PROBLEMS
    more = f"; and {unnamed} more" if unnamed > 0 else ""
    return (
        f"{len(blocking)} blocking problem(s): {named}{more}. Fix or move these files "
        f"(validation changed nothing); full list in {report_path}"
    )


@dataclass(frozen=True)
class _Context:
    """What a reason may quote besides its own row."""

    files: pd.DataFrame
    rules: ValidateParams
    data_dir: Path

    def partners(self, row: pd.Series, same_class: bool) -> str:
        """The other images with the same bytes, in the same class or in another one."""
        files = self.files
        same_bytes = files["sha256"] == row["sha256"]
        in_class = files["class_name"] == row["class_name"]
        others = files[same_bytes & (in_class if same_class else ~in_class)
                       & (files["path"] != row["path"]) & (files["kind"] == IMAGE)]
        return ", ".join(str(self.data_dir / path) for path in others["path"])


def _int(value: Any) -> str:
    return "?" if pd.isna(value) else str(int(value))


Reason = Callable[[pd.Series, _Context], str]
REASONS: dict[str, Reason] = {
    "readable": lambda row, _: f"{row['error']}; replace or remove the file",
    "not_empty": lambda row, _: "zero-byte file; copy it again or remove it",
    "format_allowed": lambda row, c: format_reason(row["format"], c.rules),
    "mode_allowed": lambda row, c: mode_reason(row["mode"], c.rules),
    "width_in_bounds": lambda row, c: side_reason("width", _int(row["width"]), c.rules),
    "height_in_bounds": lambda row, c: side_reason("height", _int(row["height"]), c.rules),
    "image_files_only": lambda row, _: (
        f"not an image file (extension {Path(row['path']).suffix or 'none'!r}, not in "
        "data.extensions, or not a regular file); training skips it: "
        "move it out of the class folder"
    ),
    "no_loose_files": lambda row, _: (
        "file outside the class folders; training ignores it: move it into a class folder or out"
    ),
    "no_unexpected_folders": lambda row, _: (
        f"unexpected folder ({row['detail']}), not a class of data.classes; training refuses "
        "the data set: rename it to a class or move it out of the data folder"
    ),
    "no_symlink_outside": lambda row, _: (
        f"symlink to {row['detail']}, outside the data folder; copy the file in instead"
    ),
    "unique_in_class": lambda row, c: (
        f"same bytes as {c.partners(row, same_class=True)}; keep one copy"
    ),
    "no_label_conflict": lambda row, c: (
        f"label conflict: the same image is in {c.partners(row, same_class=False)}; "
        "keep it in the one right class"
    ),
    "no_near_duplicate_leak": lambda row, c: (
        f"{row['split']} image is a near-duplicate (dHash distance "
        f"{_int(row['train_dhash_distance'])}) of train image "
        f"{c.data_dir / row['nearest_train_image']}; its score over-states accuracy: "
        "remove one of them"
    ),
    "brightness_in_range": lambda row, c: (
        f"mean brightness {row['brightness']:.0f} is {abs(row['brightness_z']):.1f} robust "
        f"sigma from the {row['class_name']} median (validate.brightness_max_z = "
        f"{c.rules.brightness_max_z}); check lighting or exposure"
    ),
    "min_per_class": lambda row, c: (
        f"class {row['class_name']} has {row['images']} usable image(s), fewer than "
        f"validate.min_per_class = {c.rules.min_per_class}; add images to the folder"
    ),
    "class_fraction": lambda row, c: (
        f"class {row['class_name']} is {row['fraction']:.1%} of the images, below "
        f"validate.min_class_fraction = {c.rules.min_class_fraction:.0%}; "
        f"add {row['class_name']} images"
    ),
}

