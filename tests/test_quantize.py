"""Per-layer quantized store: file format, RTN, GPTQ cut, loader round trips, sha256 verification."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llmpq.quantize import LayerFileError, load_mixed_model, load_quantized_layer, read_manifest
from llmpq.quantize.calibration import CalibrationSpec, calibration_windows
from llmpq.quantize.rtn import rtn_dequantize, rtn_grid
from llmpq.quantize.run import QuantizeJob, quantize_store
from llmpq.quantize.settings import LayerHeader, LinearQuant
from llmpq.artifacts import staged_dir
from llmpq.quantize.store import layer_file


@pytest.fixture(scope="module")
def small_opt(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer OPT (no tokenizer): enough for file-format tests."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0)
    out = tmp_path_factory.mktemp("small-opt")
    OPTForCausalLM(config).save_pretrained(out)
    return out


def _job(model_dir: Path, root: Path, scheme: str, bits: int, group_size: int = 32) -> QuantizeJob:
    return QuantizeJob("small-opt", model_dir, root / f"{scheme}-w{bits}", scheme, bits, group_size,
                       calibration=CalibrationSpec("pydoc", 4, 32))


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _layer_input(model, batch: int = 2, seq: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, seq, model.config.hidden_size)


def test_header_round_trips_through_metadata():
    header = LayerHeader(3, "opt", "gptq", 4, {"fc1": LinearQuant(4, 128), "fc2": LinearQuant.fp()})
    assert LayerHeader.from_metadata(header.to_metadata(), "x") == header
    with pytest.raises(ValueError, match="not an llmpq layer file"):
        LayerHeader.from_metadata({}, "some/file.safetensors")
    with pytest.raises(ValueError, match="does not go with"):
        LinearQuant(16, format="gptq")


def test_rtn_grid_is_gptq_symmetric_grid():
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.1, 0.2, -0.3, 0.3]])
    grid = rtn_grid(weight, bits=4, group_size=2)
    assert grid.g_idx.tolist() == [0, 0, 1, 1]
    assert torch.allclose(grid.scales[0], torch.tensor([2 * 1.0 / 15, 2 * 0.25 / 15]).half().float())
    assert grid.zeros.unique().tolist() == [8]
    w_hat = rtn_dequantize(weight, grid, 4)
    assert (w_hat - weight).abs().max() <= grid.scales.max() * 0.51  # the top of the grid is half a step short


def test_fp_store_round_trip_and_manifest(small_opt, tmp_path):
    report = quantize_store(_job(small_opt, tmp_path, "gptq", 16), progress=False)
    manifest = read_manifest(report.out_dir)
    assert sorted(manifest) == [0, 1] and all(r.weight_rel_error == 0 for r in manifest.values())
    assert sorted(p.name for p in report.out_dir.iterdir()) == ["layer_0.safetensors", "layer_1.safetensors", "manifest.parquet"]
    model = _hf_model(small_opt)
    x = _layer_input(model)
    for i, original in enumerate(model.model.decoder.layers):
        layer = load_quantized_layer(model.config, report.out_dir, i)
        assert isinstance(layer.fc1, torch.nn.Linear)
        with torch.no_grad():
            assert torch.equal(layer(x)[0] if isinstance(layer(x), tuple) else layer(x),
                               original(x)[0] if isinstance(original(x), tuple) else original(x))


def test_corrupted_layer_file_is_named(small_opt, tmp_path):
    report = quantize_store(_job(small_opt, tmp_path, "rtn", 16), progress=False)
    path = layer_file(report.out_dir, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    model = _hf_model(small_opt)
    load_quantized_layer(model.config, report.out_dir, 0)
    with pytest.raises(LayerFileError, match=r"layer_1\.safetensors: corrupted layer file"):
        load_quantized_layer(model.config, report.out_dir, 1)
    with pytest.raises(LayerFileError, match=r"layer_1\.safetensors"):
        load_mixed_model(small_opt, tmp_path, [16, 16], scheme="rtn")
    with pytest.raises(LayerFileError, match="holds layer 0, not layer 1"):
        load_quantized_layer(model.config, layer_file(report.out_dir, 0), 1, verify=False)


def test_staged_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "gptq-w4"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as stage:
            (stage / "layer_0.safetensors").write_text("partial")
            raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    final.mkdir()
    (final / "old").write_text("old")
    with staged_dir(final) as stage:
        (stage / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_rtn_file_round_trip_matches_in_memory_quantized_layer(small_opt, tmp_path, bits):
    report = quantize_store(_job(small_opt, tmp_path, "rtn", bits), progress=False)
    model = _hf_model(small_opt)
    x = _layer_input(model)
    for i, original in enumerate(model.model.decoder.layers):
        expected = copy.deepcopy(original)
        with torch.no_grad():
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
                linear = expected.get_submodule(name)
                linear.weight.copy_(rtn_dequantize(linear.weight, rtn_grid(linear.weight, bits, 32), bits))
                linear.bias.copy_(linear.bias.half().float())  # the GPTQ layout stores biases in fp16
            layer = load_quantized_layer(model.config, report.out_dir, i)
            assert type(layer.fc1).__name__ == "TorchLinear"
            got, want = layer(x), expected(x)
            got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    sizes = {r.weight_bytes for r in read_manifest(report.out_dir).values()}
    assert len(sizes) == 1


def _layer_calls(model, windows: torch.Tensor, index: int) -> list[tuple[torch.Tensor, dict]]:
    """The hidden-state input and keyword arguments of decoder layer `index` in a whole-model forward."""
    calls = []
    layer = model.model.decoder.layers[index]
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"],
                                              {k: v for k, v in kwargs.items() if k != "hidden_states"})),
        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    hook.remove()
    return calls


@pytest.mark.slow
def test_gptq_layer_by_layer_holds_one_layer_is_deterministic_and_beats_rtn(tiny_opt_dir, tmp_path, monkeypatch):
    """GPTQ reads one decoder layer at a time (never more than the layer and its quantized rebuild alive),
    gives the same bytes twice, and has a lower output error than round-to-nearest on its calibration data."""
    import gc
    import weakref

    from transformers import AutoTokenizer

    from llmpq.quantize import stream

    alive, peak = set(), [0]

    def tracked(load):
        def wrapper(*args, **kwargs):
            gc.collect()
            layer = load(*args, **kwargs)
            alive.add(id(layer))
            weakref.finalize(layer, alive.discard, id(layer))
            peak[0] = max(peak[0], len(alive))
            return layer
        return wrapper

    monkeypatch.setattr(stream, "load_checkpoint_layer", tracked(stream.load_checkpoint_layer))
    monkeypatch.setattr(stream, "load_quantized_layer", tracked(stream.load_quantized_layer))
    calibration = CalibrationSpec("pydoc", 8, 64)
    jobs = [QuantizeJob("tiny-opt", tiny_opt_dir, tmp_path / name, scheme, 3, 128, calibration=calibration)
            for name, scheme in (("a", "gptq"), ("b", "gptq"), ("rtn", "rtn"))]
    first, second, rtn = (quantize_store(job, progress=False) for job in jobs)
    assert [r.sha256 for r in first.rows] == [r.sha256 for r in second.rows]
    assert 1 <= peak[0] <= 2
    model = _hf_model(tiny_opt_dir)
    windows = calibration_windows(AutoTokenizer.from_pretrained(str(tiny_opt_dir)), calibration)
    errors = {}
    for label, report in (("gptq", first), ("rtn", rtn)):
        layer = load_quantized_layer(model.config, report.out_dir, 0)
        num = den = 0.0
        for hidden, kwargs in _layer_calls(model, windows, 0):
            with torch.no_grad():
                want = model.model.decoder.layers[0](hidden, **kwargs)
                got = layer(hidden, **kwargs)
            want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
            num += float((got - want).pow(2).sum())
            den += float(want.pow(2).sum())
        errors[label] = num / den
    assert 0 < errors["gptq"] < 0.8 * errors["rtn"], errors


def test_read_tensors_are_copied_out_of_the_file(tmp_path):
    """Tensors read from a checkpoint or a layer file own their memory: a tensor left mapped onto the file keeps the
    file pages around it resident (a stage's RSS counted them) and changes when the file is overwritten in place."""
    from safetensors.torch import save_file

    from llmpq.quantize.checkpoint import read_tensors
    from llmpq.quantize.store import read_layer_file

    values = torch.arange(40_000, dtype=torch.float32)
    save_file({"model.decoder.embed_tokens.weight": values}, str(tmp_path / "model.safetensors"))
    header = LayerHeader(layer=0, model_type="opt", scheme="fp", bits=16)
    save_file({"fc1.weight": values}, str(tmp_path / "layer.safetensors"), metadata=header.to_metadata())
    read = read_tensors(tmp_path, lambda key: True)["model.decoder.embed_tokens.weight"]
    _, layer = read_layer_file(tmp_path / "layer.safetensors")
    for name in ("model.safetensors", "layer.safetensors"):
        path = tmp_path / name
        size = path.stat().st_size
        with open(path, "r+b") as fh:  # zero the tensor data in place, as a mapped tensor would see it
            fh.seek(size - values.numel() * 4)
            fh.write(bytes(values.numel() * 4))
    assert torch.equal(read, values) and torch.equal(layer["fc1.weight"], values)
