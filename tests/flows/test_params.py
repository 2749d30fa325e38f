import dataclasses

from flows.params import load_params, write_params
from tasks.params import GateParams, ModelParams, Params


def test_written_params_load_back_equal(tmp_path):
    params = dataclasses.replace(
        Params(),
        model=ModelParams(input_size=(32, 48), conv_filters=(8, 16)),  # tuples in, YAML lists out
        gate=GateParams(significance=0.05),
    )
    path = write_params(params, tmp_path / "params.yaml")
    assert "!!python" not in path.read_text()
    assert load_params(path) == params
