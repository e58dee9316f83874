"""The shipped model configs users plan with: parameter counts from the published shapes, 16-bit bytes, plans.

Expected counts are written out here from each model's published config.json (hidden h, MLP width f,
layers L, heads, KV heads, vocab V, tied or not, q/k/v biases), not computed by the code under test, and
checked against the published totals.
"""

import json

import pytest

from llmpq.cli import main
from llmpq.config import compose_experiment
from llmpq.config.types import DeviceSpec, QuantSpec
from llmpq.costmodel.memory import embed_bytes, layer_weight_bytes
from llmpq.models.source import model_shape


def llama_style_params(h: int, f: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
                       qkv_bias: bool) -> int:
    """q, k, v, o + gate, up, down + two RMSNorms per layer; token embedding, final norm, LM head."""
    head_dim = h // heads
    q = h * heads * head_dim + (heads * head_dim if qkv_bias else 0)
    k = v = h * kv_heads * head_dim + (kv_heads * head_dim if qkv_bias else 0)
    o = heads * head_dim * h
    mlp = 3 * h * f
    layer = q + k + v + o + mlp + 2 * h
    return layers * layer + vocab * h + h + (0 if tied else vocab * h)


PUBLISHED = {
    # model: (h, f, L, heads, kv_heads, V, tied, qkv_bias), published total
    "llama-3.1-8b": ((4096, 14336, 32, 32, 8, 128256, False, False), 8_030_261_248),
    "llama-3.1-70b": ((8192, 28672, 80, 64, 8, 128256, False, False), 70_553_706_496),
    "qwen2.5-7b": ((3584, 18944, 28, 28, 4, 152064, False, True), 7_615_616_512),
    "qwen2.5-72b": ((8192, 29568, 80, 64, 8, 152064, False, True), 72_706_203_648),
    "mistral-7b": ((4096, 14336, 32, 32, 8, 32000, False, False), 7_241_732_096),
    "smollm2-135m": ((576, 1536, 30, 9, 3, 49152, True, False), 134_515_008),
}

GPU = DeviceSpec(stem="gpu", name="gpu", kind="gpu", memory_gib=80, mem_bandwidth_gbps=2000, fp16_tflops=300,
                 int8_tops=None, bits=(16, 8, 4, 3))


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_weight_bytes_at_16_bits_are_twice_the_published_parameters(model):
    dims, published = PUBLISHED[model]
    assert llama_style_params(*dims) == published
    shape = model_shape(compose_experiment([f"model={model}"]).model)
    assert shape.params == published
    quant = QuantSpec("gptq", 128)
    head = 0 if shape.tied_head else shape.head_params * 2
    total = (shape.num_layers * layer_weight_bytes(shape, 16, quant, GPU) + embed_bytes(shape, GPU)
             + shape.final_norm_params * 2 + head)
    assert total == 2 * published


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-72b", "mistral-7b"])
def test_hf_builds_the_layer_the_shape_describes(model):
    """transformers' own decoder layer for the shipped config (on `meta`) has exactly the shape's linears."""
    from llmpq.models.shape import decoder_layers, layer_linears
    from llmpq.profile.timing import one_layer_model

    exp = compose_experiment([f"model={model}"])
    shape = model_shape(exp.model)
    layer = decoder_layers(one_layer_model(exp.model.hf_config))[0]
    found = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in layer_linears(layer).items()}
    assert found == {l.name: (l.in_features, l.out_features, l.bias) for l in shape.layer.linears}


@pytest.mark.parametrize("model, cluster", [("llama-3.1-70b", "paper-c6"), ("qwen2.5-72b", "paper-c8")])
def test_solve_plans_70b_class_models_on_paper_clusters_from_shapes(model, cluster, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["solve", f"model={model}", f"cluster={cluster}", "workload=s512-n100-b32", f"out={out}",
                 f"results={tmp_path / 'results'}"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    layers = [i for stage in plan["stages"] for i in range(*stage["layers"])]
    assert layers == list(range(80))
    assert plan["sources"] == {"latency": "roofline", "omega": "proxy"}
    for stage in plan["stages"]:
        memory = stage["memory"]
        used = sum(v for k, v in memory.items() if k != "capacity_bytes")
        assert used <= memory["capacity_bytes"]
    assert plan["predicted"]["throughput_tok_s"] > 0


def test_a_local_directory_with_only_config_json_plans(tmp_path, capsys):
    """`source:` a user's directory holding just config.json (no weights): the shape comes from it."""
    weights = tmp_path / "my-model"
    weights.mkdir()
    published = dict(compose_experiment(["model=llama-3.1-8b"]).model.hf_config)
    (weights / "config.json").write_text(json.dumps({**published, "num_hidden_layers": 16}))
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"name: mine\nsource: {weights}\nfamily: llama\nbits: [16, 8, 4]\n"
                                    "quant: {scheme: gptq, group_size: 128}\nhf_config: null\n")
    exp = compose_experiment(["model=mine"], config_dir=tmp_path / "conf")
    assert model_shape(exp.model).num_layers == 16
    out = tmp_path / "plan.json"
    code = main(["solve", "--config-dir", str(tmp_path / "conf"), "model=mine", "cluster=paper-c3",
                 "workload=s512-n100-b32", f"out={out}", f"results={tmp_path / 'results'}"])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    assert plan["stages"][-1]["layers"][1] == 16 and {b for s in plan["stages"] for b in s["bits"]} <= {16, 8, 4}
