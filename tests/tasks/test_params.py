import pytest

from flows.params import load_params
from tasks.params import Params, ParamsError


def test_project_params_file_loads():
    params = load_params("params.yaml")
    assert params.data.class_mapping == {"GO": 0, "NG": 1}
    assert params.model.architecture == "aoi_cnn" and params.model.color_mode == "auto"
    assert params.train.early_stopping_patience and params.gate.target_escape_rate == 0.005


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"train\.epochz"):
        Params.from_dict({"train": {"epochz": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"train\.epochs = 'ten'"):
        Params.from_dict({"train": {"epochs": "ten"}})


def test_positive_class_must_be_label_one():
    with pytest.raises(ParamsError, match="positive_class"):
        Params.from_dict({"data": {"classes": ["GO", "NG"], "positive_class": "GO"}})


def test_unreadable_params_names_file_and_line(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line"):
        load_params(broken)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_nested_augment_section_and_review_band_are_checked():
    params = Params.from_dict({"train": {"augment": {"flip": True, "shift": 0.1}},
                               "evaluate": {"review_band": [0.2, 0.8]}})
    assert params.train.augment.flip and params.train.augment.shift == 0.1
    assert params.evaluate.review_band == (0.2, 0.8)
    with pytest.raises(ParamsError, match=r"train\.augment\.flipp"):
        Params.from_dict({"train": {"augment": {"flipp": True}}})
    with pytest.raises(ParamsError, match=r"review_band must be null or \[low, high\]"):
        Params.from_dict({"evaluate": {"review_band": [0.8, 0.2]}})
    with pytest.raises(ParamsError, match=r"model.color_mode must be one of rgb, grayscale, auto"):
        Params.from_dict({"model": {"color_mode": "sepia"}})


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
        Params.from_dict({section: values})


def test_dashboard_links_use_the_public_url_or_host_and_port():
    assert Params.from_dict({"serve": {"public_url": "http://line-7:8000/"}}).serve.base_url() == "http://line-7:8000"
    assert Params.from_dict({"serve": {"port": 8080}}).serve.base_url() == "http://127.0.0.1:8080"
