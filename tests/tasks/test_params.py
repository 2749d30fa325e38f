import pytest
from pydantic import ValidationError

from flows.params import load_params, params_from
from tasks.params import Params, ParamsError, replace


def test_project_params_file_loads():
    params = load_params("params.yaml")
    assert params.data.class_mapping == {"GO": 0, "NG": 1}
    assert params.model.architecture == "aoi_cnn" and params.model.color_mode == "auto"
    assert params.train.early_stopping_patience and params.gate.target_escape_rate == 0.005


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"train\.epochz"):
        params_from({"train": {"epochz": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"train\.epochs = 'ten'"):
        params_from({"train": {"epochs": "ten"}})


def test_positive_class_must_be_label_one():
    with pytest.raises(ParamsError, match="positive_class"):
        params_from({"data": {"classes": ["GO", "NG"], "positive_class": "GO"}})


def test_unreadable_params_names_file_and_line(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line"):
        load_params(broken)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_nested_augment_section_and_review_band_are_checked():
    params = params_from({"train": {"augment": {"flip": True, "shift": 0.1}},
                               "evaluate": {"review_band": [0.2, 0.8]}})
    assert params.train.augment.flip and params.train.augment.shift == 0.1
    assert params.evaluate.review_band == (0.2, 0.8)
    with pytest.raises(ParamsError, match=r"train\.augment\.flipp"):
        params_from({"train": {"augment": {"flipp": True}}})
    with pytest.raises(ParamsError, match=r"review_band must be null or \[low, high\]"):
        params_from({"evaluate": {"review_band": [0.8, 0.2]}})
    with pytest.raises(ParamsError, match=r"model.color_mode must be one of rgb, grayscale, auto"):
        params_from({"model": {"color_mode": "sepia"}})


@pytest.mark.parametrize(("section", "values", "message"), [
    ("nightly", {"ingest_quiet_seconds": 5}, r"nightly.ingest_quiet_seconds must be null .* or >= 10"),
    ("nightly", {"timeout_seconds": 0}, r"nightly.timeout_seconds must be null or > 0"),
    ("nightly", {"project": "line 7"}, r"nightly.project must be letters"),
    ("alerts", {"reject_streak": -1}, r"alerts.reject_streak must be >= 0"),
    ("alerts", {"block": "aoi-line"}, r"alerts.block must name a saved block as <block-type>/<name>"),
    ("serve", {"public_url": "line-7:8000"}, r"serve.public_url must be null or an http\(s\) URL"),
    ("status", {"api_timeout": 0}, r"status.api_timeout must be > 0"),
    ("server", {"port": 0}, r"server.port must be between 1 and 65535"),
])
def test_operations_settings_are_checked(section, values, message):
    with pytest.raises(ParamsError, match=message):
        params_from({section: values})


def test_dashboard_links_use_the_public_url_or_host_and_port():
    assert params_from({"serve": {"public_url": "http://line-7:8000/"}}).serve.base_url() == "http://line-7:8000"
    assert params_from({"serve": {"port": 8080}}).serve.base_url() == "http://127.0.0.1:8080"


@pytest.mark.parametrize(("changes", "message"), [
    ({"gate": {"min_delta": -0.01}}, r"gate.min_delta must be >= 0, got -0.01"),
    ({"demo": {"ng_fraction": 1.0}}, r"demo.ng_fraction must be > 0 and < 1, got 1.0"),
    ({"train": {"batch_size": 0}}, r"train.batch_size must be between 1 and 1024, got 0"),
    ({"train": {"average_momentum": 1}}, r"train.average_momentum must be null \(off\) or > 0 and < 1, got 1"),
    ({"model": {"conv_filters": [8, 0]}}, r"model.conv_filters.1 must be >= 1, got 0"),
    ({"validate": {"severity": {"readabel": "warning"}}}, r"validate.severity must rate each of .*unknown: readabel"),
])
def test_every_number_and_choice_is_bounded(changes, message):
    with pytest.raises(ParamsError, match=message):
        params_from(changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"input_size": [100000, 100000]}}, r"model.input_size.0 must be <= 2048, got 100000"),
    ({"model": {"conv_filters": [16, 100000]}}, r"model.conv_filters.1 must be <= 1024, got 100000"),
    ({"model": {"convs_per_block": 100}}, r"model.convs_per_block must be between 1 and 8, got 100"),
    ({"model": {"dense_units": 10**6}}, r"model.dense_units must be between 1 and 8192, got 1000000"),
    ({"demo": {"size": 100000}}, r"demo.size must be between 32 and 2048, got 100000"),
    ({"train": {"batch_size": 100000}}, r"train.batch_size must be between 1 and 1024, got 100000"),
    ({"train": {"shuffle_buffer": 10**7}}, r"train.shuffle_buffer must be between 1 and 100000, got 10000000"),
    ({"train": {"cache_max_mb": 10**7}}, r"train.cache_max_mb must be between 0 and 65536, got 10000000"),
    ({"evaluate": {"batch_size": 100000}}, r"evaluate.batch_size must be between 1 and 1024, got 100000"),
    ({"prune": {"speed_images": 10**6}}, r"prune.speed_images must be between 1 and 4096, got 1000000"),
    ({"export": {"check_images": 10**6}}, r"export.check_images must be between 1 and 4096, got 1000000"),
    ({"validate": {"max_pixels": 10**10}}, r"validate.max_pixels must be between 1 and 178956970, got 10000000000"),
    ({"serve": {"max_pixels": 10**10}}, r"serve.max_pixels must be between 1 and 178956970, got 10000000000"),
    ({"serve": {"max_upload_bytes": 10**10}}, r"serve.max_upload_bytes must be between 1 and 1000000000, got"),
    ({"serve": {"max_concurrency": 10**4}}, r"serve.max_concurrency must be between 1 and 64, got 10000"),
])
def test_every_size_that_allocates_memory_has_an_upper_bound(changes, message):
    with pytest.raises(ParamsError, match=message):
        params_from(changes)


def test_a_missing_key_names_the_file_to_add_it_to():
    raw = load_params("params.yaml").to_dict()
    del raw["paths"]["candidate"]
    with pytest.raises(ParamsError, match=r"^mine.yaml: paths.candidate is missing; add it to mine.yaml$"):
        Params.from_dict(raw, source="mine.yaml")


def test_a_changed_copy_is_checked_and_params_stay_frozen():
    params = load_params("params.yaml")
    assert replace(params.train, epochs=3).epochs == 3 and params.train.epochs != 3
    with pytest.raises(ParamsError, match=r"train.epochs must be >= 1, got 0"):
        replace(params.train, epochs=0)
    with pytest.raises(ValidationError, match="frozen"):
        params.train.epochs = 3
