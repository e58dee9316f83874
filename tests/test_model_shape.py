"""Model adapter: shapes from HF configs (hand counts) and from loaded weights, several families."""

import pytest

from llmpq.config import compose_experiment
from llmpq.models.shape import shape_from_config, shape_from_model
from llmpq.models.source import model_shape


def test_opt30b_layer_hand_count():
    shape = model_shape(compose_experiment(["model=opt-30b"]).model)
    h, f = 7168, 28672
    attention = 4 * (h * h + h)          # q, k, v, out with biases
    mlp = (h * f + f) + (f * h + h)       # fc1, fc2 with biases
    norms = 2 * (2 * h)                   # two LayerNorms, weight + bias
    assert shape.layer.params == attention + mlp + norms == 616_655_872
    assert (shape.num_layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads, shape.head_dim) == (48, h, f, 56, 56, 128)
    embed = 50272 * h + (2048 + 2) * h    # tokens + learned positions (OPT offsets by 2)
    assert shape.embed_params == embed
    assert shape.tied_head and shape.head_params == 50272 * h
    assert shape.params == 48 * 616_655_872 + embed + 2 * h == 29_974_540_288


@pytest.mark.parametrize("model, billions", [("opt-13b", 12.85), ("opt-66b", 65.72), ("bloom-176b", 176.25)])
def test_paper_model_sizes(model, billions):
    assert model_shape(compose_experiment([f"model={model}"]).model).params / 1e9 == pytest.approx(billions, abs=0.01)


def test_gqa_kv_width():
    shape = shape_from_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "vocab_size": 128256})
    assert shape.kv_heads == 8 and shape.kv_dim == 1024
    k_proj = next(l for l in shape.layer.linears if l.name == "self_attn.k_proj")
    assert (k_proj.in_features, k_proj.out_features) == (4096, 1024)
    assert not shape.tied_head


def _tiny(kind):
    import transformers as tf

    configs = {
        "opt": (tf.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                             max_position_embeddings=64, word_embed_proj_dim=64), tf.OPTForCausalLM),
        "llama": (tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100), tf.LlamaForCausalLM),
        "bloom": (tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=100), tf.BloomForCausalLM),
        "qwen2": (tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100), tf.Qwen2ForCausalLM),
    }
    config, cls = configs[kind]
    return cls(config)


@pytest.mark.parametrize("kind", ["opt", "llama", "bloom", "qwen2"])
def test_shape_from_weights_matches_parameter_count(kind):
    model = _tiny(kind)
    shape = shape_from_model(model)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_unknown_family():
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt_neox' \(known families: bloom, llama, mistral, opt, qwen2\)"):
        shape_from_config({"model_type": "gpt_neox"})
