"""Typed view of params.yaml: types and bounds only, every value comes from the file.

Entry points (CLI, flows, dvc stage commands) read params.yaml once and pass these
objects down; nothing in ``tasks`` opens the file itself.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import FanaoiError
from tasks.params_problems import problem


class ParamsError(FanaoiError):
    """params.yaml is missing, unreadable or holds a value that cannot be used."""


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# YAML has lists only; the models keep tuples so params stay hashable and immutable.
Pair = Annotated[tuple[int, int], BeforeValidator(_list_to_tuple)]
Names = Annotated[tuple[str, ...], BeforeValidator(_list_to_tuple)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[int, Field(ge=1)]

# Upper bounds on the sizes that allocate memory: far above any real use, so a typo is one
# params line instead of minutes of swapping and an out-of-memory traceback.
# An image side the model sees, pixels: fan images are resized to ~128 px (bench/real_quality.py),
# and one 2048 x 2048 RGB float32 input is already 48 MB before the first convolution.
MAX_SIDE = 2048
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
# Pixels of an image read from disk or an upload: Pillow refuses more itself (2 x
# Image.MAX_IMAGE_PIXELS); this many RGBA pixels decode to 716 MB.
Pixels = Annotated[int, Field(ge=1, le=178_956_970)]
# Images in one batch through a model: CPU throughput stops growing long before (evaluate.batch_size
# is 64), while activations grow with every image.
BatchSize = Annotated[int, Field(ge=1, le=1024)]
# Images decoded together into one float32 array (a timing or comparison sample): a few hundred
# measure well; 4096 at 128 px RGB are already 800 MB.
SampleSize = Annotated[int, Field(ge=1, le=4096)]


class Section(BaseModel):
    """One section of params.yaml; ``KEY`` is its dotted name in the file."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    KEY: ClassVar[str] = ""

    @classmethod
    def checked(cls, raw: Any, source: str = "params") -> Self:
        """Build from plain values; every problem names the key and the fix."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(problem(error, cls, source) for error in exc.errors())
            raise ParamsError(f"{source}: {problems}") from None


SectionT = TypeVar("SectionT", bound=Section)


def replace(section: SectionT, **changes: Any) -> SectionT:
    """A copy of ``section`` with ``changes``, checked like values read from params.yaml."""
    return section.checked({**dict(section), **changes})


class DataParams(Section):
    KEY: ClassVar[str] = "data"
    dir: str
    classes: Names
    positive_class: str
    extensions: Names
    split_salt: str
    split: dict[Literal["train", "validation", "test"], Fraction]

    @model_validator(mode="after")
    def _labels_and_split(self) -> Self:
        if len(self.classes) != 2 or len(set(self.classes)) != 2:
            raise ValueError(f"data.classes must name two different classes, got {self.classes}")
        if self.positive_class != self.classes[1]:
            raise ValueError(
                f"data.positive_class {self.positive_class!r} must be the second entry of "
                f"data.classes {list(self.classes)} (label 1)"
            )
        if len(self.split) != 3 or abs(sum(self.split.values()) - 1.0) > 1e-6:
            raise ValueError(f"data.split needs train, validation and test fractions summing to 1, got {self.split}")
        return self

    @property
    def class_mapping(self) -> dict[str, int]:
        """Class name -> label, in the order params gives (positive class = 1)."""
        return {name: index for index, name in enumerate(self.classes)}


class DemoParams(Section):
    KEY: ClassVar[str] = "demo"
    count: int = Field(ge=2)
    seed: int = Field(ge=0)
    size: int = Field(ge=32, le=MAX_SIDE)  # tasks.data.demo_set.MIN_SIZE: smaller fans lose their blades
    ng_fraction: float = Field(gt=0, lt=1)


class ImageInput(Section):
    """What a model expects its input in: all a predictor needs of the model params."""

    KEY: ClassVar[str] = "model"
    input_size: Annotated[tuple[Side, Side], BeforeValidator(_list_to_tuple)]
    color_mode: Literal["rgb", "grayscale", "auto"]

    @property
    def channels(self) -> int:
        if self.color_mode == "auto":
            raise ParamsError("model.color_mode auto must be resolved from the images before building a model")
        return 3 if self.color_mode == "rgb" else 1


class ModelParams(ImageInput):
    architecture: Literal["seed_cnn", "small_cnn", "aoi_cnn"]
    # Twice VGG's widest layers (512 filters, 4096 dense units, 4 convolutions per block): a
    # two-class fan model needs a fraction of that.
    conv_filters: Annotated[
        tuple[Annotated[int, Field(ge=1, le=1024)], ...], BeforeValidator(_list_to_tuple), Field(min_length=1)
    ]
    convs_per_block: int = Field(ge=1, le=8)
    stem_stride: Literal[1, 2]
    pooling: Literal["avg", "max"]
    dense_units: int = Field(ge=1, le=8192)
    dropout: float = Field(ge=0, lt=1)
    first_layer_init: Literal["glorot_uniform", "he_normal", "edges"]
    standardize: bool


class AugmentParams(Section):
    """Random changes to training images only; validation, test and inference never see them."""

    KEY: ClassVar[str] = "train.augment"
    flip: bool
    rot90: bool
    shift: float = Field(ge=0, lt=1)
    brightness: float = Field(ge=0, lt=1)
    contrast: float = Field(ge=0, lt=1)

    @property
    def active(self) -> bool:
        return self.flip or self.rot90 or self.shift > 0 or self.brightness > 0 or self.contrast > 0


class TrainParams(Section):
    KEY: ClassVar[str] = "train"
    seed: int = Field(ge=0)
    epochs: Positive
    batch_size: BatchSize
    learning_rate: float = Field(gt=0)
    lr_schedule: Literal["constant", "cosine"]
    early_stopping_patience: int | None = Field(ge=1, description="off")
    keep_tolerance: float = Field(ge=0)
    average_momentum: float | None = Field(gt=0, lt=1, description="off")
    class_weight: Literal["none", "balanced"]
    augment: AugmentParams
    # Each slot holds a decoded image: the whole of a 100k-image data set shuffled at once.
    shuffle_buffer: int = Field(ge=1, le=100_000)
    # A training machine's memory: a larger split is read from its file under validate.cache_dir.
    cache_max_mb: float = Field(ge=0, le=65_536)
    checkpoint_dir: str
    jit_compile: bool
    steps_per_execution: Positive
    init_from: Literal["champion"] | None = Field(description="random initialisation")


class EvaluateParams(Section):
    KEY: ClassVar[str] = "evaluate"
    batch_size: BatchSize
    threshold: Fraction
    review_band: Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)] | None
    max_gap: float = Field(ge=0)
    max_overfit: float = Field(ge=0)

    @model_validator(mode="after")
    def _band_inside_unit_interval(self) -> Self:
        band = self.review_band
        if band is not None and not 0 <= band[0] < band[1] <= 1:
            raise ValueError(
                f"evaluate.review_band must be null or [low, high] with 0 <= low < high <= 1, got {list(band)}"
            )
        return self


class GateParams(Section):
    KEY: ClassVar[str] = "gate"
    metric: Literal["accuracy", "balanced_accuracy", "f1", "auc"]
    min_delta: float = Field(ge=0)
    # Relative, so above 0 (an equal loss is no gain) and below 1 (no loss at all is out of reach).
    min_loss_improvement: float = Field(gt=0, lt=1)
    max_escape_increase: float = Field(ge=0)
    max_overkill_increase: float = Field(ge=0)
    min_accuracy: Fraction
    max_escape_rate: Fraction
    max_escape_rate_per_type: float | None = Field(ge=0, le=1)
    significance: float | None = Field(gt=0, lt=1)
    target_escape_rate: float | None = Field(ge=0, lt=1)
    smoke_images: Positive


class PruneParams(Section):
    KEY: ClassVar[str] = "prune"
    fraction: float = Field(ge=0, lt=1)
    fine_tune_epochs: int = Field(ge=0)
    learning_rate: float = Field(gt=0)
    speed_images: SampleSize


class RegistryParams(Section):
    KEY: ClassVar[str] = "registry"
    dir: str
    lock_timeout: float = Field(ge=0)


class PathsParams(Section):
    """Where runs write, relative to the project folder (the registry is ``registry.dir``)."""

    KEY: ClassVar[str] = "paths"
    candidate: str
    reports: str

    def chosen(self, candidate: Path | str | None, reports: Path | str | None) -> tuple[Path, Path]:
        """The candidate model and reports folder a command uses: the ones given, else these."""
        return Path(candidate or self.candidate), Path(reports or self.reports)


# The expectations of the validate stage, each "blocking" or "warning" in params.
EXPECTATIONS = (
    "readable", "not_empty", "format_allowed", "mode_allowed", "width_in_bounds", "height_in_bounds",
    "image_files_only", "no_loose_files", "no_unexpected_folders", "no_symlink_outside", "unique_in_class",
    "no_label_conflict", "min_per_class", "class_fraction", "no_near_duplicate_leak", "brightness_in_range",
)


class ValidateParams(Section):
    KEY: ClassVar[str] = "validate"
    max_pixels: Pixels
    formats: Names
    modes: Names
    min_side: Positive
    max_side: Positive
    min_per_class: Positive
    min_class_fraction: float = Field(ge=0, lt=1)
    near_duplicate_distance: int = Field(ge=0, le=255)
    brightness_max_z: float = Field(gt=0)
    cache_dir: str
    severity: dict[str, Literal["blocking", "warning"]]

    @model_validator(mode="after")
    def _every_expectation_rated(self) -> Self:
        unknown = sorted(set(self.severity) - set(EXPECTATIONS))
        missing = [name for name in EXPECTATIONS if name not in self.severity]
        if unknown or missing:
            raise ValueError(
                f"validate.severity must rate each of {', '.join(EXPECTATIONS)}; "
                f"unknown: {', '.join(unknown) or 'none'}, missing: {', '.join(missing) or 'none'}"
            )
        return self


class NightlyParams(Section):
    KEY: ClassVar[str] = "nightly"
    cron: str
    timezone: str | None
    collision_strategy: Literal["CANCEL_NEW", "ENQUEUE"]
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)
    timeout_seconds: float | None = Field(gt=0)
    project: str
    # Prefect's shortest window for a trigger on quiet is 10 s.
    ingest_quiet_seconds: float | None = Field(ge=10, description="no run on ingest")

    @model_validator(mode="after")
    def _project_is_a_name(self) -> Self:
        if not self.project or not all(c.isalnum() or c in "-_." for c in self.project):
            raise ValueError(f"nightly.project must be letters, digits, '-', '_' or '.', got {self.project!r}")
        return self


class ExportParams(Section):
    KEY: ClassVar[str] = "export"
    check_images: SampleSize
    max_abs_diff: float = Field(ge=0)


class ServeParams(Section):
    KEY: ClassVar[str] = "serve"
    host: str
    port: int = Field(ge=0, le=65535)
    # Held in memory while checked; an uncompressed RGBA BMP at the Pixels cap is 716 MB.
    max_upload_bytes: int = Field(ge=1, le=1_000_000_000)
    max_pixels: Pixels
    # Each slot may hold an upload and its decoded image; a 2-8 core line PC gains nothing past 64.
    max_concurrency: int = Field(ge=1, le=64)
    body_timeout: float = Field(gt=0)  # seconds a request may take to send its body, then 408
    token: str | None
    reports_dir: str  # served read-only under /reports/
    public_url: str | None  # how other machines reach the service; None: http://host:port

    @model_validator(mode="after")
    def _url_and_token(self) -> Self:
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"serve.public_url must be null or an http(s) URL, got {self.public_url!r}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("serve.token must be null or at least 16 characters (a random secret)")
        return self

    def base_url(self) -> str:
        """The URL dashboard links start with: ``public_url``, or built from host and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


class LockParams(Section):
    KEY: ClassVar[str] = "lock"
    timeout: float = Field(ge=0)  # seconds a command waits for the project lock held by another


class ExplainParams(Section):
    KEY: ClassVar[str] = "explain"
    max_heatmaps: int = Field(ge=0)


class AlertParams(Section):
    KEY: ClassVar[str] = "alerts"
    webhook_url: str | None  # the environment's FANAOI_ALERT_WEBHOOK_URL wins
    block: str | None  # a saved Prefect notification block, "<block-type>/<name>"
    reject_streak: int = Field(ge=0)  # rejections in a row that alert; 0 = never

    @model_validator(mode="after")
    def _block_is_named(self) -> Self:
        if self.block is not None and "/" not in self.block:
            raise ValueError(
                f"alerts.block must name a saved block as <block-type>/<name>, e.g. slack-webhook/aoi-line; "
                f"got {self.block!r}"
            )
        return self


class ServerParams(Section):
    KEY: ClassVar[str] = "server"
    host: str  # 0.0.0.0 lets workers and browsers on other machines in
    port: int = Field(ge=1, le=65535)


class StatusParams(Section):
    KEY: ClassVar[str] = "status"
    api_timeout: float = Field(gt=0)  # seconds for all Prefect API requests together: a slow server must not stall it


# The section is named like its stage; pydantic warns that it hides BaseModel's deprecated validate().
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


class Params(Section):
    data: DataParams
    demo: DemoParams
    paths: PathsParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    gate: GateParams
    prune: PruneParams
    registry: RegistryParams
    validate: ValidateParams
    nightly: NightlyParams
    export: ExportParams
    serve: ServeParams
    explain: ExplainParams
    lock: LockParams
    status: StatusParams
    alerts: AlertParams
    server: ServerParams

    @classmethod
    def from_dict(cls, raw: Any, source: str = "params.yaml") -> Params:
        """Build from the parsed YAML; unknown keys, missing keys and bad values name the key."""
        return cls.checked(raw, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), as YAML and JSON write them."""
        return self.model_dump(mode="json")


