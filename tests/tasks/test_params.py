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
