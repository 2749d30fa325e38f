import pytest

from flows.params import load_params
from tasks.params import Params, ParamsError


def test_project_params_file_loads():
    params = load_params("params.yaml")
    assert params.data.class_mapping == {"GO": 0, "NG": 1}
    assert params.model.input_size == (80, 80)
    assert params.train.epochs == 10 and params.train.batch_size == 32


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
