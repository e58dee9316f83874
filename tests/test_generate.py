"""The batch job: completions for a prompts file through a pipeline plan, equal to HF generate, resumable.

The model is tiny-opt with a line break added to its end-of-sequence ids (tiny-opt never learned to emit
`</s>`: it was trained on plain text), the way an instruct model ends its turn, so that completions end
at EOS after different numbers of tokens and the batcher's compaction and refill are exercised; its
tokenizer gets a chat template so that `messages` rows work.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmpq.artifacts import read_table
from llmpq.cli import main
from llmpq.config import compose_experiment
from llmpq.data.prompts import PromptsError
from llmpq.generate.planning import read_prompts
from llmpq.generate.outputs import (OutputIdentity, finalize_output, load_output, meta_path, partial_path,
                                    prepare_output, read_existing, runs_path)
from llmpq.generate.run import GenerateOptions, generate, summary
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

NEWLINE = 200          # tiny-opt's token for "\n"
MAX_NEW = 24
BATCH = 8
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CLUSTER = ("name: gen-cpu2\nnodes:\n  - {name: local, devices: {cpu: 2}}\npresent: false\n"
           "links:\n  intra_node: {bandwidth_gbps: 2.0, latency_us: 100}\n  inter_node: {bandwidth_gbps: 1.0, latency_us: 100}\n")


@pytest.fixture(scope="module")
def eos_model(tiny_opt_dir, tmp_path_factory) -> Path:
    """tiny-opt that also stops at a line break, with a chat template."""
    out = tmp_path_factory.mktemp("eos-model") / "tiny-opt"
    shutil.copytree(tiny_opt_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [1, NEWLINE]}))
    tok = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def store(tiny_opt_dir, tmp_path_factory) -> Path:
    """A results directory with tiny-opt's 16-bit store."""
    from llmpq.quantize.run import QuantizeJob, quantize_store

    root = tmp_path_factory.mktemp("gen-results")
    quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, root / "quantized" / "tiny-opt" / "gptq-w16", "gptq", 16),
                   progress=False)
    return root


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen-conf")
    (root / "cluster").mkdir()
    (root / "cluster" / "gen-cpu2.yaml").write_text(CLUSTER)
    return root


@pytest.fixture(scope="module")
def prompts_file(eos_model, tmp_path_factory) -> Path:
    """46 text prompts of 5–120 tokens cut from the held-out play, and 2 chat prompts."""
    from transformers import AutoTokenizer

    from llmpq.data.text import encode_split

    tok = AutoTokenizer.from_pretrained(str(eos_model))
    ids = encode_split("shakespeare", "eval", tok)
    rng = random.Random(0)
    rows = []
    while len(rows) < 46:
        n = 5 + len(rows) * 115 // 45        # 5 .. 120 tokens
        start = rng.randrange(len(ids) - n)
        text = tok.decode(ids[start:start + n])
        if tok(text)["input_ids"] == ids[start:start + n]:
            rows.append({"id": f"p{len(rows):02d}", "prompt": text})
    rows.insert(7, {"id": "chat-1", "messages": [{"role": "user", "content": "Where is the king?"}]})
    rows.insert(30, {"id": 31, "messages": [{"role": "system", "content": "Answer in verse."},
                                            {"role": "user", "content": "What news from Denmark?"}]})
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("gen-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(model: Path, prompts: Path, **extra: str) -> list[str]:
    out = [f"model.source={model}", "cluster=gen-cpu2", "workload=example-prompts", "workload.name=example-prompts",
           f"workload.prompts={prompts}",
           f"workload.max_new_tokens={MAX_NEW}", f"workload.batch={BATCH}"]
    return out + [f"{k}={v}" for k, v in extra.items()]


def write_plan(path: Path, stages: list[tuple[int, int]], b_p: int, b_d: int, throughput: float = 1000.0) -> Path:
    """A hand-made 16-bit plan of tiny-opt on gen-cpu2 for the example-prompts workload."""
    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 30)
    plan = Plan(method="test", model="tiny-opt", cluster="gen-cpu2", workload="example-prompts", quant_scheme="gptq",
                quant_group_size=128, micro_batch_prefill=b_p, micro_batch_decode=b_d,
                stages=tuple(StagePlan("cpu", "local", a, b, (16,) * (b - a), memory, 2.0, 1.0) for a, b in stages),
                prefill_s=0.01, decode_s=0.02, throughput_tok_s=throughput, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="roofline", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline")
    path.write_text(to_json(plan))
    return path


def token_ids_of(model_dir: Path, prompts: Path) -> dict:
    """Each prompt's token ids as llmpq generate feeds them."""
    exp = compose_experiment([f"model.source={model_dir}", "workload=example-prompts", f"workload.prompts={prompts}",
                              f"workload.max_new_tokens={MAX_NEW}"])
    return {p.id: list(p.ids) for p in read_prompts(exp, prompts).prompts}


def hf_reference(model_dir: Path, prompts: dict, eos=(1, NEWLINE), max_new: int = MAX_NEW) -> tuple[dict, object]:
    """HF generate, greedy, each prompt alone: its new token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for ident, ids in prompts.items():
            x = torch.tensor([ids])
            seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=list(eos) or None, pad_token_id=0)
            out[ident] = seq[0, len(ids):].tolist()
    return out, model


def compare(lines: list[dict], prompts: dict, reference: dict, model) -> list[str]:
    """Mismatches against the reference: each must be a near-tie (top-2 logit gap < 1e-3) at its first
    differing token; returns their descriptions (reported, not hidden)."""
    mismatches = []
    for line in lines:
        got, want = line["token_ids"], reference[line["id"]]
        if got == want:
            continue
        k = next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompts[line["id"]] + want[:k]])).logits[0, -1].float()
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        mismatches.append(f"{line['id']!r}: first difference at token {k}, top-2 logit gap {gap:.2e}")
        assert gap < 1e-3, mismatches[-1]
    return mismatches


@pytest.fixture(scope="module")
def uninterrupted(eos_model, store, conf, prompts_file, tmp_path_factory):
    """The job run once without interruption on a two-stage plan (continuous mode, token ids kept)."""
    work = tmp_path_factory.mktemp("gen-run")
    plan = write_plan(work / "plan.json", [(0, 2), (2, 4)], b_p=3, b_d=4)
    exp = compose_experiment(overrides(eos_model, prompts_file), config_dir=conf)
    out = work / "out" / "test.jsonl"
    out.parent.mkdir()
    result = generate(exp, plan, out, None, GenerateOptions(token_ids=True, progress=False), store)
    return plan, out, result


@pytest.mark.slow
def test_two_stage_job_matches_hf_generate(uninterrupted, eos_model, prompts_file):
    plan, out, result = uninterrupted
    lines = load_output(out)
    prompts = token_ids_of(eos_model, prompts_file)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in rows]  # every id once, in input order
    lengths = [len(prompts[r["id"]]) for r in rows if "prompt" in r]
    assert min(lengths) == 5 and max(lengths) == 120 and len(lines) >= 40
    reference, model = hf_reference(eos_model, prompts)
    mismatches = compare(lines, prompts, reference, model)
    print(f"{len(mismatches)} of {len(lines)} completions differ from HF generate: {mismatches}")
    assert len(mismatches) <= 0.05 * len(lines)
    for line in lines:
        ids = line["token_ids"]
        assert line["completion_tokens"] == len(ids) and line["prompt_tokens"] == len(prompts[line["id"]])
        assert line["finish_reason"] == ("eos" if ids[-1] in (1, NEWLINE) else "length")
        assert line["finish_reason"] == "eos" or len(ids) == MAX_NEW
        assert "\n" not in line["completion"][-1:] or line["finish_reason"] == "length"
    reasons = {line["finish_reason"] for line in lines}
    assert reasons == {"eos", "length"}
    row = read_table("generate_runs", runs_path(out)).to_pylist()
    assert len(row) == 1 and row[0]["prompts"] == len(lines) and row[0]["stages"] == 2
    assert row[0]["generated_tokens"] == sum(len(line["token_ids"]) for line in lines)
    assert row[0]["eos_stops"] == sum(line["finish_reason"] == "eos" for line in lines)
    assert row[0]["tokens_per_s"] == pytest.approx(row[0]["generated_tokens"] / row[0]["wall_s"])
    assert row[0]["rel_error"] == pytest.approx(row[0]["tokens_per_s"] / 1000.0 - 1)
    assert "tok/s" in summary(result) and "predicted 1000.0 tok/s" in summary(result)
    assert not partial_path(out).exists() and meta_path(out).is_file()


@pytest.mark.slow
def test_rerun_of_a_finished_job_does_nothing(uninterrupted, eos_model, store, conf, prompts_file):
    plan, out, _ = uninterrupted
    before = out.read_bytes()
    exp = compose_experiment(overrides(eos_model, prompts_file), config_dir=conf)
    result = generate(exp, plan, out, None, GenerateOptions(token_ids=True, progress=False), store)
    assert result.row is None and "already complete" in summary(result) and out.read_bytes() == before


@pytest.mark.slow
def test_kill_after_the_first_wave_and_resume(uninterrupted, eos_model, store, conf, prompts_file, tmp_path):
    """SIGTERM to `llmpq generate` once its first wave is on disk; the stages stop; a rerun resumes (a torn
    last line is dropped) and the final file equals the uninterrupted run's byte for byte."""
    plan, reference, _ = uninterrupted
    out = tmp_path / "test.jsonl"
    cmd = [sys.executable, "-m", "llmpq.cli", "generate", "--config-dir", str(conf),
           *overrides(eos_model, prompts_file), f"results={store}", f"plan={plan}", f"out={out}",
           "generate.token_ids=true", "generate.progress=false", "generate.wave_pause_s=1.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = partial_path(out)
    deadline = time.monotonic() + 240
    while not (partial.is_file() and partial.read_text().count("\n") >= BATCH):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no wave written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    written = partial.read_bytes()
    time.sleep(2)
    assert partial.read_bytes() == written, "a stage kept writing after the job was stopped"
    assert not out.exists()
    done = written.count(b"\n")
    assert BATCH <= done < len(load_output(reference))
    with open(partial, "ab") as f:
        f.write(b'{"id": "p00", "completion": "torn')          # a write cut short
    exp = compose_experiment(overrides(eos_model, prompts_file), config_dir=conf)
    result = generate(exp, plan, out, None, GenerateOptions(token_ids=True, progress=False), store)
    assert result.done_before == done and result.row["prompts"] == result.total - done
    assert out.read_bytes() == reference.read_bytes()


def test_bad_inputs_exit_2_and_write_nothing(eos_model, conf, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", [(0, 2), (2, 4)], b_p=3, b_d=4)
    long = "To be, or not to be, that is the question. " * 30
    cases = {
        "malformed": (['{"id": "a", "prompt": "To be"}', '{"id": "b", "prompt": '], "line 2: not valid JSON"),
        "missing-id": (['{"prompt": "To be"}'], "line 1: missing id"),
        "duplicate": (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "duplicate ids: 'a' (line 1 and line 2)"),
        "empty": (['{"id": "e", "prompt": ""}'], "empty prompts, ids: 'e'"),
        "overlong": ([json.dumps({"id": "long", "prompt": long})], f"prompts longer than {256 - MAX_NEW} tokens"),
    }
    for name, (lines, message) in cases.items():
        prompts = tmp_path / f"{name}.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
        out = tmp_path / name / "out.jsonl"
        code = main(["generate", "--config-dir", str(conf), *overrides(eos_model, prompts), f"plan={plan}",
                     f"out={out}", f"results={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and str(prompts) in err, (name, err)
        assert not out.exists() and not partial_path(out).exists() and not meta_path(out).exists(), name


def test_other_inputs_for_an_existing_output_are_refused(eos_model, conf, prompts_file, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", [(0, 2), (2, 4)], b_p=3, b_d=4)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "x", "completion": "", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "eos"}\n')
    meta_path(out).write_text(OutputIdentity("a" * 64, "b" * 64, MAX_NEW, "eos", (1, NEWLINE), "error").to_json())
    before = out.read_bytes()
    code = main(["generate", "--config-dir", str(conf), *overrides(eos_model, prompts_file), f"plan={plan}",
                 f"out={out}", f"results={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "plan sha256 " + "a" * 64 in err and "prompts sha256 " + "b" * 64 in err, err
    assert "differing: plan_sha256, prompts_sha256" in err and out.read_bytes() == before


def test_a_plan_whose_cache_is_too_short_is_refused(eos_model, conf, prompts_file, tmp_path, capsys):
    """A plan solved for a sampled workload (s + n positions) cannot hold a file's longer prompts."""
    plan = write_plan(tmp_path / "plan.json", [(0, 4)], b_p=2, b_d=2)
    data = json.loads(plan.read_text())
    data["workload"] = "s64-n16-b8"
    plan.write_text(json.dumps(data))
    code = main(["generate", "--config-dir", str(conf), f"model.source={eos_model}", "cluster=gen-cpu2",
                 f"prompts={prompts_file}", f"plan={plan}", f"out={tmp_path / 'o.jsonl'}", f"results={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "needs 136 cache positions; plan" in err and "holds 80" in err, err


def test_output_resume_primitives(tmp_path):
    out = tmp_path / "o.jsonl"
    ident = OutputIdentity("p" * 64, "q" * 64, 4, "eos", (1,), "error")
    line = lambda i: json.dumps({"id": i, "completion": "x", "prompt_tokens": 1, "completion_tokens": 1,
                                 "finish_reason": "length"}) + "\n"
    state = prepare_output(out, ident, ["a", 2, "c"])
    assert state.done == {} and meta_path(out).is_file()
    partial_path(out).write_text(line("c") + line(2) + '{"id": "a", "compl')
    state = prepare_output(out, ident, ["a", 2, "c"])
    assert sorted(map(str, state.done)) == ["('int', 2)", "('str', 'c')"] and not state.final
    assert partial_path(out).read_text() == line("c") + line(2)     # the torn tail is gone
    with open(partial_path(out), "a") as f:
        f.write(line("a"))
    assert finalize_output(out, ["a", 2, "c"]) == 3
    assert out.read_text() == line("a") + line(2) + line("c") and not partial_path(out).exists()
    assert prepare_output(out, ident, ["a", 2, "c"]).final
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line("a") + "garbage\n" + line("c"))
    with pytest.raises(PromptsError, match="line 2: not a complete output line"):
        read_existing(bad, {("str", "a"), ("str", "c")})
    bad.write_text(line("zz"))
    with pytest.raises(PromptsError, match="id 'zz' is not in the prompts file"):
        read_existing(bad, {("str", "a")})
    stray = tmp_path / "stray.jsonl"
    stray.write_text(line("a"))
    with pytest.raises(PromptsError, match="exists without its sidecar"):
        prepare_output(stray, ident, ["a"])
    restarted = prepare_output(out, OutputIdentity("r" * 64, "q" * 64, 4, "eos", (1,), "error"), ["a"], "restart")
    assert restarted.done == {} and not out.exists() and OutputIdentity.read(meta_path(out)).plan_sha256 == "r" * 64


@pytest.mark.slow
def test_one_stage_static_and_continuous_agree_and_truncate_left_is_flagged(eos_model, store, conf, tmp_path):
    """In-process (one stage): both modes give HF generate's completions (near-ties aside); a prompt cut by
    truncate_left says so and is generated from its last tokens."""
    long = "To be, or not to be, that is the question. " * 30
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": "long", "prompt": long}, {"id": "chat", "messages": [{"role": "user", "content": "Speak."}]}]
    rows += [{"id": f"s{i}", "prompt": t} for i, t in enumerate(["To be", "Now is the winter", "Friends, Romans,",
                                                                 "O Romeo, Romeo!", "Out, damned spot!"])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = write_plan(tmp_path / "plan.json", [(0, 4)], b_p=2, b_d=3)
    exp = compose_experiment(overrides(eos_model, prompts, **{"workload.overlong": "truncate_left",
                                                               "workload.batch": "3"}), config_dir=conf)
    outputs = {}
    for mode in ("continuous", "static"):
        out = tmp_path / mode / "o.jsonl"
        out.parent.mkdir()
        result = generate(exp, plan, out, None, GenerateOptions(mode=mode, token_ids=True, progress=False), store)
        assert result.row["mode"] == mode and result.row["stages"] == 1
        outputs[mode] = load_output(out)
    found = {p.id: p for p in read_prompts(exp, prompts).prompts}
    assert found["long"].truncated > 0 and len(found["long"].ids) == 256 - MAX_NEW
    lines = {line["id"]: line for line in outputs["continuous"]}
    assert lines["long"]["truncated"] == found["long"].truncated and lines["long"]["prompt_tokens"] == 256 - MAX_NEW
    assert "truncated" not in lines["s0"]
    reference, model = hf_reference(eos_model, {k: list(p.ids) for k, p in found.items()})
    token_prompts = {k: list(p.ids) for k, p in found.items()}
    for mode, out_lines in outputs.items():
        print(mode, compare(out_lines, token_prompts, reference, model))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_variable_lengths_on_other_families_match_hf(family, tiny_opt_dir, conf, tmp_path):
    """Rotary positions (GQA) and ALiBi with left padding, per-row positions and refilled slots."""
    from test_runtime import random_model

    model_dir = random_model(family, tmp_path, tiny_opt_dir)
    prompts = tmp_path / "p.jsonl"
    texts = ["To be", "Now is the winter of our discontent", "O", "Friends, Romans, countrymen, lend me your ears",
             "Out, damned spot! out, I say!", "Double, double toil and trouble;", "What's in a name?"]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    plan = write_plan(tmp_path / "plan.json", [(0, 3)], b_p=2, b_d=2)
    exp = compose_experiment(overrides(model_dir, prompts, **{"workload.max_new_tokens": "8", "workload.stop": "none",
                                                              "workload.batch": "3"}), config_dir=conf)
    out = tmp_path / "o.jsonl"
    generate(exp, plan, out, None, GenerateOptions(token_ids=True, progress=False), tmp_path / "results")
    token_prompts = {p.id: list(p.ids) for p in read_prompts(exp, prompts).prompts}
    reference, _ = hf_reference(model_dir, token_prompts, eos=(), max_new=8)
    assert {line["id"]: line["token_ids"] for line in load_output(out)} == reference
