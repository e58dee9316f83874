"""Prompts files: which `prompts:` is a file, reading and validating one, the planning shape it gives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpq.config import ConfigError, QuantSpec, compose_experiment
from llmpq.costmodel.memory import layer_kv_bytes, stage_memory
from llmpq.data.prompt_source import prompts_kind
from llmpq.artifacts import file_sha256
from llmpq.data.prompts import (PromptsError, prompt_stats, read_prompt_rows, tokenize_prompts,
                                TokenizedPrompt)
from llmpq.generate.planning import planning_experiment, read_prompts
from llmpq.models.source import model_shape
from llmpq.solve.plan import PlanPrompts, read_plan, to_json

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "plan.schema.json"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_opt_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_opt_dir))


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_opt_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_opt_dir))
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("value, kind", [
    ("shakespeare", "source"), ("pydoc", "source"), ("file:notes.txt", "source"),
    ("jsonl:data.jsonl:text", "source"),          # a scheme prefix wins over the suffix
    ("data/prompts.jsonl", "file"), ("PROMPTS.JSONL", "file"), ("/abs/p.parquet", "file"),
    ("C:/data/p.jsonl", "file"),                  # not a text scheme
])
def test_prompts_kind_rule(value, kind):
    assert prompts_kind(value) == kind


@pytest.mark.parametrize("value", ["shakespear", "prompts.json", "http:x.jsonl.gz", "data.txt"])
def test_prompts_kind_refuses_what_is_neither(value):
    with pytest.raises(ValueError, match="neither a text source .* nor a prompts file"):
        prompts_kind(value)


def test_prompts_file_workload_config():
    base = ["workload=example-prompts"]
    w = compose_experiment(base).workload
    assert (w.kind, w.prompts_file, w.gen_len, w.batch, w.stop, w.prompt_len) == \
        ("file", "examples/prompts.jsonl", 24, 8, "eos", 0)
    with pytest.raises(ConfigError, match=r"example-prompts.yaml: prompt_len: not used with a prompts file"):
        compose_experiment(base + ["+workload.prompt_len=64"])
    with pytest.raises(ConfigError, match=r"max_new_tokens: missing required key"):
        compose_experiment(base + ["~workload.max_new_tokens"])
    with pytest.raises(ConfigError, match=r"stop: unknown value 'sometimes'"):
        compose_experiment(base + ["workload.stop=sometimes"])
    with pytest.raises(ConfigError, match=r"s64-n16-b8.yaml: max_new_tokens: only for a prompts file"):
        compose_experiment(["+workload.max_new_tokens=5"])
    with pytest.raises(ConfigError, match=r"prompts: 'hamlet.txt' is neither"):
        compose_experiment(["workload.prompts=hamlet.txt"])


def test_malformed_lines_are_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "fine"}, "", '{"id": "b", "prompt": "cut', '[1, 2]', {"prompt": "no id"},
        {"id": 1.5, "prompt": "x"}, {"id": "c", "prompt": "x", "messages": []}, {"id": "d", "messages": [{"role": 1}]},
        {"id": "e", "prompt": 7}])
    with pytest.raises(PromptsError) as err:
        read_prompt_rows(path)
    text = str(err.value)
    assert text.startswith(f"{path}: prompts: line 3: not valid JSON")
    for piece in ("line 4: expected a JSON object, got list", "line 5: missing id",
                  "line 6: id must be a string or an integer", "line 7 (id 'c'): give exactly one of prompt or messages",
                  "line 8 (id 'd'): messages must be a list of {role, content}", "line 9 (id 'e'): prompt must be a string"):
        assert piece in text
    with pytest.raises(PromptsError, match="no such prompts file"):
        read_prompt_rows(tmp_path / "missing.jsonl")
    with pytest.raises(PromptsError, match="holds no prompts"):
        read_prompt_rows(write_jsonl(tmp_path / "empty.jsonl", ["", " "]))


def test_parquet_prompts(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [3, 1], "prompt": ["To be", "or not"]}), path)
    rows = read_prompt_rows(path)
    assert [(r.id, r.prompt, r.where) for r in rows] == [(3, "To be", "row 1"), (1, "or not", "row 2")]
    pq.write_table(pa.table({"key": [1], "prompt": ["x"]}), path)
    with pytest.raises(PromptsError, match="needs id and prompt or messages"):
        read_prompt_rows(path)


def test_bad_prompts_are_named_by_id(tmp_path, tokenizer):
    long = "To be, or not to be, that is the question. " * 20
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "To be"}, {"id": "b", "prompt": "   "}, {"id": "a", "prompt": "again"},
        {"id": "long", "prompt": long}, {"id": 7, "prompt": ""}, {"id": "chat", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(PromptsError) as err:
        tokenize_prompts(path, read_prompt_rows(path), tokenizer, 100, model="tiny-opt")
    text = str(err.value)
    n_long = len(tokenizer(long)["input_ids"])
    assert "duplicate ids: 'a' (line 1 and line 3)" in text
    assert "empty prompts, ids: 'b', 7" in text
    assert f"prompts longer than 100 tokens (the context of tiny-opt minus max_new_tokens" in text
    assert f"'long' ({n_long} tokens)" in text
    assert "tokenizer of tiny-opt has none" in text and "ids: 'chat'" in text


def test_truncate_left_keeps_the_last_tokens(tmp_path, tokenizer):
    text = "To be, or not to be, that is the question. " * 20
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": text}, {"id": "short", "prompt": "To be"}])
    out = tokenize_prompts(path, read_prompt_rows(path), tokenizer, 50, overlong="truncate_left")
    ids = tokenizer(text)["input_ids"]
    assert out[0] == TokenizedPrompt("long", tuple(ids[-50:]), len(ids) - 50)
    assert out[1].truncated == 0 and list(out[1].ids) == tokenizer("To be")["input_ids"]


def test_chat_messages_use_the_chat_template(tmp_path, chat_tokenizer):
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who goes there?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "c", "messages": messages}])
    out = tokenize_prompts(path, read_prompt_rows(path), chat_tokenizer, 200)
    expected = chat_tokenizer("system: Speak verse.\nuser: Who goes there?\nassistant:", add_special_tokens=False)
    assert list(out[0].ids) == expected["input_ids"]


def test_stats_hand_computed():
    prompts = [TokenizedPrompt(i, (1,) * n, int(n == 9)) for i, n in enumerate([4, 9, 2, 7, 3])]
    s = prompt_stats("abc", prompts)
    assert (s.count, s.min_tokens, s.mean_tokens, s.p50_tokens, s.p90_tokens, s.max_tokens, s.truncated) == \
        (5, 2, 5.0, 4, 9, 9, 1)
    assert s.planning_len == 5 and replace(s, mean_tokens=5.2).planning_len == 6


def test_planning_shape_comes_from_the_file(tiny_opt_dir, tmp_path):
    """s = the mean prompt (time), KV and buffers for the longest prompt + n (memory), N and B recorded."""
    texts = ["To be", "Now is the winter of our discontent made glorious summer by this sun of York",
             "Friends, Romans, countrymen"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": t} for i, t in enumerate(texts)])
    exp = compose_experiment([f"model.source={tiny_opt_dir}", "workload=example-prompts",
                              f"workload.prompts={path}", "workload.max_new_tokens=10", "workload.batch=4"])
    planned, found = planning_experiment(exp)
    lengths = [len(p.ids) for p in found.prompts]
    w = planned.workload
    assert found.stats.sha256 == file_sha256(path) and found.stats.count == 3
    assert w.prompt_len == -(-sum(lengths) // 3) and w.max_prompt_len == max(lengths) and w.gen_len == 10
    shape = model_shape(exp.model)
    device = exp.devices["cpu-large"]
    mem = stage_memory(shape, device, (16, 16), w, 2, 2, QuantSpec(), first=True, last=False, kernels={})
    assert mem.kv_bytes == 2 * layer_kv_bytes(shape, 4, max(lengths) + 10, device)
    with pytest.raises(PromptsError, match="prompts longer than 2 tokens"):
        read_prompts(replace(exp, workload=replace(exp.workload, gen_len=shape.max_positions - 2)))


def test_solve_records_the_prompts_file(tiny_opt_dir, tmp_path, capsys):
    from llmpq.cli import main

    out = tmp_path / "plan.json"
    code = main(["solve", f"model.source={tiny_opt_dir}", "workload=example-prompts", "solver=uniform",
                 f"workload.prompts={ROOT / 'examples' / 'prompts.jsonl'}", f"results={tmp_path / 'results'}",
                 f"out={out}"])
    assert code == 0, capsys.readouterr().err
    plan = read_plan(out)
    rows = read_prompt_rows(ROOT / "examples" / "prompts.jsonl")
    assert plan.prompts is not None and plan.prompts.stats.count == len(rows)
    assert plan.prompts.stats.sha256 == file_sha256(ROOT / "examples" / "prompts.jsonl")
    assert plan.prompts.max_new_tokens == 24
    data = json.loads(out.read_text())
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert to_json(plan) == out.read_text() and isinstance(plan.prompts, PlanPrompts)


def test_bad_prompts_file_fails_solve_with_exit_2(tiny_opt_dir, tmp_path, capsys):
    from llmpq.cli import main

    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, '{"id": '])
    code = main(["solve", f"model.source={tiny_opt_dir}", "workload=example-prompts", f"workload.prompts={path}",
                 f"results={tmp_path / 'results'}", f"out={tmp_path / 'plan.json'}"])
    assert code == 2 and not (tmp_path / "plan.json").exists()
    assert f"input error: {path}: prompts: line 2: not valid JSON" in capsys.readouterr().err


def test_example_prompts_file_is_valid(tokenizer):
    rows = read_prompt_rows(ROOT / "examples" / "prompts.jsonl")
    out = tokenize_prompts("examples/prompts.jsonl", rows, tokenizer, 256 - 24)
    assert len(out) == len(rows) >= 24 and len({len(p.ids) for p in out}) > 10
