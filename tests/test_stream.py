"""LayerStream: a model run one decoder layer at a time (read alone from the checkpoint) gives the whole
HF model's logits, for every family of the registry."""

import pytest
import torch

from llmpq.models.families import FAMILIES
from llmpq.quantize.stream import LayerStream, run_layers


def _save_tiny(model_type: str, out):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, vocab_size=120, initializer_range=0.2)
    configs = {
        "opt": lambda: tf.OPTConfig(ffn_dim=128, num_hidden_layers=3, max_position_embeddings=64,
                                    word_embed_proj_dim=64, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=120, initializer_range=0.2),
        "llama": lambda: tf.LlamaConfig(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2,
                                        tie_word_embeddings=True, **common),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[model_type]()).eval()
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_layer_by_layer_logits_equal_the_whole_model(model_type, tmp_path):
    model = _save_tiny(model_type, tmp_path)
    ids = torch.randint(0, 120, (5, 17), generator=torch.Generator().manual_seed(1))
    stream = LayerStream(tmp_path, head=True, batch=2)
    logits = stream.logits(run_layers(stream, stream.embed(ids), stream.fp_layer))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    headless = LayerStream(tmp_path, head=False)
    assert all(not path.endswith("lm_head") for path in headless.ends)
    with pytest.raises(ValueError, match="without the head"):
        headless.logits(stream.embed(ids))
