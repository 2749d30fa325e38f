from flows.params import load_params, write_params
from tasks.params import replace
from tests.conftest import BASE


def test_written_params_load_back_equal(tmp_path):
    params = replace(
        BASE,
        model=replace(BASE.model, input_size=(32, 48), conv_filters=(8, 16)),  # tuples in, YAML lists out
        gate=replace(BASE.gate, significance=0.05),
    )
    path = write_params(params, tmp_path / "params.yaml")
    assert "!!python" not in path.read_text()
    assert load_params(path) == params


def test_a_params_file_names_only_what_it_changes(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    project = load_params("params.yaml")
    assert load_params(path) == replace(project, train=replace(project.train, epochs=3))
