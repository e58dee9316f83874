"""The family registry: its module paths exist in real HF models, and unknown model types stop at config time."""

import json
import subprocess
import sys

import pytest
import torch

from llmpq.models.families import FAMILIES, family
from llmpq.models.shape import shape_from_model


def _tiny_model(model_type: str):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, vocab_size=100)
    configs = {
        "opt": tf.OPTConfig(ffn_dim=128, num_hidden_layers=3, max_position_embeddings=64, word_embed_proj_dim=64, **common),
        "bloom": tf.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=100),
        "llama": tf.LlamaConfig(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, **common),
        "mistral": tf.MistralConfig(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, **common),
        "qwen2": tf.Qwen2Config(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, **common),
    }
    return tf.AutoModelForCausalLM.from_config(configs[model_type])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_registry_paths_exist_in_the_hf_model(model_type):
    fam = family(model_type)
    model = _tiny_model(model_type)
    assert fam.model_type == model.config.model_type == model_type
    layers = model.get_submodule(fam.layers)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 3
    assert model.config.to_dict()[fam.layers_key] == 3
    assert model.get_submodule(fam.embed[0]) is model.get_input_embeddings()
    assert model.get_submodule(fam.head[-1]) is model.get_output_embeddings()
    present = [p for p in fam.embed + fam.head if _has(model, p)]
    assert fam.embed[0] in present and fam.head[0] in present
    assert (fam.rotary is not None) == (fam.position == "rotary")
    if fam.rotary is not None:
        assert _has(model, fam.rotary)
    assert fam.position == {"opt": "learned", "bloom": "alibi"}.get(model_type, "rotary")
    assert shape_from_model(model).params == sum(p.numel() for p in model.parameters())


def _has(model, path: str) -> bool:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def _llmpq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmpq.cli", *args], capture_output=True, text=True, timeout=120)


def _user_model(tmp_path, config_json: dict | None, hf_config: dict | None = None):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    source = tmp_path / "weights"
    if config_json is not None:
        source.mkdir()
        (source / "config.json").write_text(json.dumps(config_json))
    lines = ["name: mine", f"source: {source}", "family: llama", "bits: [16, 4]",
             "quant: {scheme: gptq, group_size: 128}", f"hf_config: {json.dumps(hf_config) if hf_config else 'null'}"]
    (conf / "model" / "mine.yaml").write_text("\n".join(lines) + "\n")
    return conf, source


def test_unknown_model_type_in_config_json_is_refused_at_config_time(tmp_path):
    conf, source = _user_model(tmp_path, {"model_type": "gemma3", "hidden_size": 640})
    done = _llmpq("config", "--config-dir", str(conf), "model=mine")
    assert done.returncode == 2, done.stderr
    assert str(source / "config.json") in done.stderr
    assert "unknown model_type 'gemma3' (known families: bloom, llama, mistral, opt, qwen2)" in done.stderr
    assert done.stdout == ""


def test_unknown_model_type_in_hf_config_names_the_model_file(tmp_path):
    conf, _ = _user_model(tmp_path, None, {"model_type": "phi3", "hidden_size": 64})
    done = _llmpq("solve", "--config-dir", str(conf), "model=mine", "out=" + str(tmp_path / "plan.json"))
    assert done.returncode == 2, done.stderr
    assert "mine.yaml: model_type: unknown model_type 'phi3'" in done.stderr
    assert not (tmp_path / "plan.json").exists()
