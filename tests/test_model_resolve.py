"""resolve_model: presets, aliases, files; YAML models and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorstage.errors import SpecError
from tensorstage.model import get_preset, list_presets, param_counts, resolve_model
from tensorstage.model.presets import preset_aliases

DATA = Path(__file__).parent / "data"


def test_preset_case_insensitive_and_aliases() -> None:
    assert resolve_model("Llama3.1-8B").name == "llama3.1-8b"
    assert resolve_model("GPT3-XL").name == "gpt3-1.3b"
    assert resolve_model("megatron-530b").name == "megatron-529.6b"


def test_every_preset_has_source_and_resolves() -> None:
    names = list_presets()
    assert len(names) == len(set(names)) >= 34
    for name in names:
        spec = resolve_model(name)
        assert spec.source, name
    assert all(v in names for v in preset_aliases().values())


def test_unknown_preset_lists_closest() -> None:
    with pytest.raises(SpecError) as exc:
        resolve_model("llama3-7b")
    text = str(exc.value)
    assert exc.value.field == "model"
    assert "unknown model 'llama3-7b'" in text and "closest presets: " in text and "\n" not in text
    closest = text.split("closest presets: ")[1].split(" (")[0].split(", ")
    assert "llama3-8b" in closest and set(closest) <= set(list_presets())


def test_unknown_without_close_match_lists_all() -> None:
    with pytest.raises(SpecError) as exc:
        resolve_model("zzzzzz")
    assert exc.value.field == "model"
    assert all(name in str(exc.value) for name in list_presets())  # no close match: every preset listed


def test_hf_json_path_and_directory(tmp_path: Path) -> None:
    assert resolve_model(str(DATA / "hf" / "qwen3-30b-a3b.json")).moe.num_experts == 128
    model_dir = tmp_path / "Qwen3-8B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((DATA / "hf" / "qwen3-8b.json").read_text())
    spec = resolve_model(str(model_dir))
    assert spec.name == "Qwen3-8B" and spec.qk_norm


def test_missing_file() -> None:
    with pytest.raises(SpecError) as exc:
        resolve_model("nope/does-not-exist.yaml")
    assert exc.value.field == "model" and "file not found: nope/does-not-exist.yaml" in str(exc.value)


def test_yaml_model_example() -> None:
    spec = resolve_model(str(DATA / "models" / "tiny-moe.yaml"))
    assert spec.name == "tiny-moe" and spec.moe is not None and spec.moe.shared_experts == 1
    # independent closed form for this small file (rmsnorm, swiglu, GQA 8/2 heads of 32, qk-norm):
    h, v, f, fe, e, d = 256, 1000, 1024, 128, 8, 32
    attn = h * 8 * d + 2 * h * 2 * d + 8 * d * h + 2 * d
    moe_layer = attn + 2 * h + h * e + (e + 1) * 3 * h * fe
    dense_layer = attn + 2 * h + 3 * h * f
    assert param_counts(spec).total == 2 * v * h + h + dense_layer + 3 * moe_layer


def test_yaml_name_defaults_to_stem(tmp_path: Path) -> None:
    path = tmp_path / "my-model.yml"
    path.write_text("num_layers: 2\nhidden: 64\nnum_heads: 4\nffn: 256\nvocab: 100\n")
    assert resolve_model(str(path)).name == "my-model"


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 2\nhidden: 64\nnum_heads: [4\nffn: 256\n")
    with pytest.raises(SpecError) as exc:
        resolve_model(str(path))
    text = str(exc.value)
    assert f"{path}:" in text and "invalid YAML" in text and "\n" not in text


def test_yaml_missing_field_named(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 2\nhidden: 64\nnum_heads: 4\nvocab: 100\n")
    with pytest.raises(SpecError) as exc:
        resolve_model(str(path))
    assert exc.value.field == f"{path}.ffn"


def test_yaml_invalid_field_named(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("num_layers: 2\nhidden: 64\nnum_heads: 4\nffn: 256\nvocab: 100\nactivation: tanh\n")
    with pytest.raises(SpecError) as exc:
        resolve_model(str(path))
    assert exc.value.field == f"{path}.activation"


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError) as exc:
        resolve_model(str(path))
    assert exc.value.field == str(path) and "expected a mapping" in str(exc.value)


def test_get_preset_unknown_is_spec_error() -> None:
    with pytest.raises(SpecError) as exc:
        get_preset("mixtral-8x7")
    assert exc.value.field == "model"
    assert "closest presets: mixtral-8x7b, mixtral-8x22b" in str(exc.value) and "\n" not in str(exc.value)
