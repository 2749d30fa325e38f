"""Typed view of params.yaml.

Entry points (CLI, flows, dvc stage commands) read params.yaml once and pass these
objects down; nothing in ``tasks`` opens the file itself.
"""

from __future__ import annotations

import dataclasses
import socket
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import FanaoiError


class ParamsError(FanaoiError):
    """params.yaml is missing, unreadable or holds a value that cannot be used."""


@dataclass(frozen=True)
class DataParams:
    dir: str = "data"
    classes: tuple[str, ...] = ("GO", "NG")
    positive_class: str = "NG"
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")
    split_salt: str = "fanaoi-split-v1"
    split: dict[str, float] = field(
        default_factory=lambda: {"train": 0.70, "validation": 0.15, "test": 0.15}
    )

    def __post_init__(self) -> None:
        if len(self.classes) != 2 or len(set(self.classes)) != 2:
            raise ParamsError(f"data.classes must name two different classes, got {self.classes}")
        if self.positive_class != self.classes[1]:
            raise ParamsError(
                f"data.positive_class {self.positive_class!r} must be the second entry of "
                f"data.classes {list(self.classes)} (label 1)"
            )
        if set(self.split) != {"train", "validation", "test"}:
            raise ParamsError("data.split needs exactly the keys train, validation, test")
        if abs(sum(self.split.values()) - 1.0) > 1e-6 or min(self.split.values()) < 0:
            raise ParamsError(f"data.split fractions must be >= 0 and sum to 1, got {self.split}")

    @property
    def class_mapping(self) -> dict[str, int]:
        """Class name -> label, in the order params gives (positive class = 1)."""
        return {name: index for index, name in enumerate(self.classes)}


@dataclass(frozen=True)
class DemoParams:
    count: int = 3200
    seed: int = 20261125
    size: int = 96
    ng_fraction: float = 0.5


FIRST_LAYER_INITS = ("glorot_uniform", "he_normal", "edges")
ARCHITECTURES = ("seed_cnn", "small_cnn", "aoi_cnn")
COLOR_MODES = ("rgb", "grayscale", "auto")


@dataclass(frozen=True)
class ModelParams:
    architecture: str = "seed_cnn"
    input_size: tuple[int, int] = (80, 80)
    color_mode: str = "rgb"
    conv_filters: tuple[int, ...] = (32, 64)
    convs_per_block: int = 1
    stem_stride: int = 1
    pooling: str = "avg"
    dense_units: int = 128
    dropout: float = 0.0
    first_layer_init: str = "glorot_uniform"

    def __post_init__(self) -> None:
        if self.first_layer_init not in FIRST_LAYER_INITS:
            raise ParamsError(
                f"model.first_layer_init must be one of {', '.join(FIRST_LAYER_INITS)}, "
                f"got {self.first_layer_init!r}"
            )
        if self.color_mode not in COLOR_MODES:
            raise ParamsError(
                f"model.color_mode must be one of {', '.join(COLOR_MODES)}, got {self.color_mode!r}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ParamsError(
                f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if not self.conv_filters or min(self.conv_filters) < 1:
            raise ParamsError(f"model.conv_filters needs at least one positive width, got {self.conv_filters}")
        if self.convs_per_block < 1 or self.stem_stride not in (1, 2):
            raise ParamsError("model.convs_per_block must be >= 1 and model.stem_stride 1 or 2")
        if self.pooling not in ("avg", "max"):
            raise ParamsError(f"model.pooling must be avg or max, got {self.pooling!r}")
        if not 0 <= self.dropout < 1:
            raise ParamsError(f"model.dropout must be >= 0 and < 1, got {self.dropout}")

    @property
    def channels(self) -> int:
        if self.color_mode == "auto":
            raise ParamsError("model.color_mode auto must be resolved from the images before building a model")
        return 3 if self.color_mode == "rgb" else 1


INIT_FROM = (None, "champion")
LR_SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class AugmentParams:
    """Random changes to training images only; validation, test and inference never see them."""

    flip: bool = False
    rot90: bool = False
    shift: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        for name in ("shift", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ParamsError(f"train.augment.{name} must be >= 0 and < 1, got {value}")

    @property
    def active(self) -> bool:
        return self.flip or self.rot90 or self.shift > 0 or self.brightness > 0 or self.contrast > 0


@dataclass(frozen=True)
class TrainParams:
    seed: int = 42
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.001
    lr_schedule: str = "constant"
    early_stopping_patience: int | None = None
    average_momentum: float | None = None
    class_weight: str = "none"
    augment: AugmentParams = field(default_factory=AugmentParams)
    shuffle_buffer: int = 4096
    cache_max_mb: float = 3000.0
    checkpoint_dir: str = "models/checkpoints"
    jit_compile: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from not in INIT_FROM:
            raise ParamsError(
                f"train.init_from must be null (random initialisation) or champion, "
                f"got {self.init_from!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ParamsError(
                f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.class_weight not in CLASS_WEIGHTS:
            raise ParamsError(
                f"train.class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weight!r}"
            )
        if self.cache_max_mb < 0:
            raise ParamsError(f"train.cache_max_mb must be >= 0 (0: never cache), got {self.cache_max_mb}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ParamsError("train.epochs and train.batch_size must be >= 1, train.learning_rate > 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ParamsError(
                f"train.early_stopping_patience must be null (off) or >= 1, got {self.early_stopping_patience}"
            )
        if self.average_momentum is not None and not 0 < self.average_momentum < 1:
            raise ParamsError(
                f"train.average_momentum must be null (off) or between 0 and 1, got {self.average_momentum}"
            )


@dataclass(frozen=True)
class EvaluateParams:
    threshold: float = 0.5
    review_band: tuple[float, float] | None = None
    max_gap: float = 0.02
    max_overfit: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ParamsError(f"evaluate.threshold must be between 0 and 1, got {self.threshold}")
        if self.review_band is not None:
            if len(self.review_band) != 2 or not 0 <= self.review_band[0] < self.review_band[1] <= 1:
                raise ParamsError(
                    f"evaluate.review_band must be null or [low, high] with 0 <= low < high <= 1, "
                    f"got {list(self.review_band)}"
                )


GATE_METRICS = ("accuracy", "balanced_accuracy", "f1", "auc")


@dataclass(frozen=True)
class GateParams:
    metric: str = "accuracy"
    min_delta: float = 0.005
    max_escape_increase: float = 0.0
    max_overkill_increase: float = 0.01
    min_accuracy: float = 0.95
    max_escape_rate: float = 0.05
    max_escape_rate_per_type: float | None = None
    significance: float | None = None
    target_escape_rate: float | None = None
    smoke_images: int = 8

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise ParamsError(
                f"gate.metric must be one of {', '.join(GATE_METRICS)}, got {self.metric!r}"
            )
        for name in ("significance", "target_escape_rate", "max_escape_rate_per_type"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ParamsError(f"gate.{name} must be null or between 0 and 1, got {value}")
        if self.smoke_images < 1:
            raise ParamsError(f"gate.smoke_images must be at least 1, got {self.smoke_images}")


@dataclass(frozen=True)
class PruneParams:
    fraction: float = 0.25
    fine_tune_epochs: int = 2
    learning_rate: float = 0.0005
    speed_images: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ParamsError(f"prune.fraction must be >= 0 and < 1, got {self.fraction}")
        if self.fine_tune_epochs < 0 or self.speed_images < 1:
            raise ParamsError("prune.fine_tune_epochs must be >= 0 and prune.speed_images >= 1")


@dataclass(frozen=True)
class RegistryParams:
    dir: str = "registry"
    lock_timeout: float = 60.0
    predict_batch_size: int = 64


# Expectation name -> "blocking" (fails the validate stage) or "warning" (reported only).
VALIDATE_SEVERITY = {
    "readable": "blocking",
    "not_empty": "blocking",
    "format_allowed": "blocking",
    "mode_allowed": "blocking",
    "width_in_bounds": "blocking",
    "height_in_bounds": "blocking",
    "image_files_only": "warning",
    "no_loose_files": "warning",
    "no_unexpected_folders": "blocking",
    "no_symlink_outside": "blocking",
    "unique_in_class": "warning",
    "no_label_conflict": "blocking",
    "min_per_class": "blocking",
    "class_fraction": "warning",
    "no_near_duplicate_leak": "warning",
    "brightness_in_range": "warning",
}


@dataclass(frozen=True)
class ValidateParams:
    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = ("PNG", "JPEG", "BMP")
    modes: tuple[str, ...] = ("L", "LA", "P", "RGB", "RGBA")
    min_side: int = 16
    max_side: int = 4096
    min_per_class: int = 20
    min_class_fraction: float = 0.1
    near_duplicate_distance: int = 8
    brightness_max_z: float = 6.0
    cache_dir: str = ".fanaoi"
    severity: dict[str, str] = field(default_factory=lambda: dict(VALIDATE_SEVERITY))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.severity) - set(VALIDATE_SEVERITY))
        if unknown:
            raise ParamsError(
                f"validate.severity: unknown expectation(s) {', '.join(unknown)}; "
                f"known: {', '.join(VALIDATE_SEVERITY)}"
            )
        wrong = {k: v for k, v in self.severity.items() if v not in ("blocking", "warning")}
        if wrong:
            raise ParamsError(f"validate.severity values must be blocking or warning, got {wrong}")
        # Expectations left out of params keep their default severity.
        object.__setattr__(self, "severity", {**VALIDATE_SEVERITY, **self.severity})


COLLISION_STRATEGIES = ("CANCEL_NEW", "ENQUEUE")


@dataclass(frozen=True)
class NightlyParams:
    cron: str = "0 2 * * *"
    timezone: str | None = None
    collision_strategy: str = "CANCEL_NEW"
    retries: int = 3
    retry_delay_seconds: float = 10.0
    timeout_seconds: float | None = None
    project: str = "fanaoi"
    ingest_quiet_seconds: float | None = 900.0

    def __post_init__(self) -> None:
        if not self.project or not all(c.isalnum() or c in "-_." for c in self.project):
            raise ParamsError(f"nightly.project must be letters, digits, '-', '_' or '.', got {self.project!r}")
        if self.ingest_quiet_seconds is not None and self.ingest_quiet_seconds < 10:
            raise ParamsError(
                f"nightly.ingest_quiet_seconds must be null (no run on ingest) or >= 10 (Prefect's "
                f"shortest window for a trigger on quiet), got {self.ingest_quiet_seconds}"
            )
        if self.timeout_seconds is not None and self.timeout_seconds <= 0:
            raise ParamsError(f"nightly.timeout_seconds must be null or > 0, got {self.timeout_seconds}")
        if self.collision_strategy not in COLLISION_STRATEGIES:
            raise ParamsError(
                f"nightly.collision_strategy must be one of {', '.join(COLLISION_STRATEGIES)}, "
                f"got {self.collision_strategy!r}"
            )
        if self.retries < 0 or self.retry_delay_seconds < 0:
            raise ParamsError("nightly.retries and nightly.retry_delay_seconds must be >= 0")


@dataclass(frozen=True)
class ExportParams:
    check_images: int = 200
    max_abs_diff: float = 1e-4

    def __post_init__(self) -> None:
        if self.check_images < 1:
            raise ParamsError(f"export.check_images must be at least 1, got {self.check_images}")
        if self.max_abs_diff < 0:
            raise ParamsError(f"export.max_abs_diff must be >= 0, got {self.max_abs_diff}")


@dataclass(frozen=True)
class ServeParams:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10_000_000
    max_pixels: int = 50_000_000
    max_concurrency: int = 4
    token: str | None = None
    reports_dir: str = "reports"  # served read-only under /reports/
    public_url: str | None = None  # how other machines reach the service; None: http://host:port

    def base_url(self) -> str:
        """The URL dashboard links start with: ``public_url``, or built from host and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ParamsError(f"serve.port must be between 0 and 65535, got {self.port}")
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_concurrency < 1:
            raise ParamsError(
                "serve.max_upload_bytes, serve.max_pixels and serve.max_concurrency must be at least 1"
            )
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ParamsError(f"serve.public_url must be null or an http(s) URL, got {self.public_url!r}")
        if self.token is not None and len(self.token) < 16:
            raise ParamsError("serve.token must be null or at least 16 characters (a random secret)")


@dataclass(frozen=True)
class LockParams:
    timeout: float = 600.0  # seconds a command waits for the project lock held by another

    def __post_init__(self) -> None:
        if self.timeout < 0:
            raise ParamsError(f"lock.timeout must be >= 0 seconds, got {self.timeout}")


@dataclass(frozen=True)
class ExplainParams:
    max_heatmaps: int = 50

    def __post_init__(self) -> None:
        if self.max_heatmaps < 0:
            raise ParamsError(f"explain.max_heatmaps must be >= 0, got {self.max_heatmaps}")


@dataclass(frozen=True)
class AlertParams:
    webhook_url: str | None = None  # the environment's FANAOI_ALERT_WEBHOOK_URL wins
    block: str | None = None  # a saved Prefect notification block, "<block-type>/<name>"
    reject_streak: int = 3  # rejections in a row that alert; 0 = never

    def __post_init__(self) -> None:
        if self.reject_streak < 0:
            raise ParamsError(f"alerts.reject_streak must be >= 0 (0 = off), got {self.reject_streak}")
        if self.block is not None and "/" not in self.block:
            raise ParamsError(
                f"alerts.block must name a saved block as <block-type>/<name>, e.g. slack-webhook/aoi-line; "
                f"got {self.block!r}"
            )


@dataclass(frozen=True)
class ServerParams:
    host: str = "127.0.0.1"  # 0.0.0.0 lets workers and browsers on other machines in
    port: int = 4200

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ParamsError(f"server.port must be between 1 and 65535, got {self.port}")


@dataclass(frozen=True)
class StatusParams:
    api_timeout: float = 0.5  # seconds per Prefect API request; a down server must not stall the answer

    def __post_init__(self) -> None:
        if self.api_timeout <= 0:
            raise ParamsError(f"status.api_timeout must be > 0 seconds, got {self.api_timeout}")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    demo: DemoParams = field(default_factory=DemoParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    gate: GateParams = field(default_factory=GateParams)
    prune: PruneParams = field(default_factory=PruneParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    nightly: NightlyParams = field(default_factory=NightlyParams)
    export: ExportParams = field(default_factory=ExportParams)
    serve: ServeParams = field(default_factory=ServeParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    lock: LockParams = field(default_factory=LockParams)
    status: StatusParams = field(default_factory=StatusParams)
    alerts: AlertParams = field(default_factory=AlertParams)
    server: ServerParams = field(default_factory=ServerParams)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "params.yaml") -> Params:
        """Build from the parsed YAML; unknown keys and wrong types name the key."""
        return _build(cls, raw, source, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {prefix or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys here: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, prefix=key + ".")
        else:
            values[name] = _coerce(hint, value, source, key)
    try:
        return cls(**values)
    except ParamsError as exc:
        raise ParamsError(f"{source}: {exc}") from None


_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    wrong = ParamsError(f"{source}: {key} = {value!r} is not a valid {_describe(hint)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return _coerce(inner, value, source, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise wrong
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, source, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        item = typing.get_args(hint)[1]
        return {str(k): _coerce(item, v, source, f"{key}.{k}") for k, v in value.items()}
    allowed = _SCALARS.get(hint)
    if allowed is None:
        return value
    # bool is an int in Python; a YAML `yes` must not pass as a number.
    if not isinstance(value, allowed) or (hint is not bool and isinstance(value, bool)):
        raise wrong
    return float(value) if hint is float else value


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
