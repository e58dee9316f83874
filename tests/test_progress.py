"""Progress lines on the console descriptor (llmpq.progress): what they say, when, and when not."""

from __future__ import annotations

import os
import re
import sys

from llmpq.progress import PROGRESS_FD_ENV, bar, clock, progress_fd, progress_line


def read_lines(fd_read: int) -> list[str]:
    return os.read(fd_read, 1 << 16).decode().splitlines()


def test_line_counts_percent_and_eta():
    assert progress_line("quantize m gptq-w4", 3, 4, "layers", 12.0) == \
        "llmpq quantize m gptq-w4: 3/4 layers (75%), 0:00:12 elapsed, ETA 0:00:04"
    assert progress_line("x", 0, 4, "layers", 1.0).endswith("ETA ?")
    assert progress_line("x", 7, None, "steps", 3725.0) == "llmpq x: 7 steps, 1:02:05 elapsed"
    assert progress_line("deploy p", 0, 1, "plans", 0.0) == "llmpq deploy p: started"
    assert clock(-1) == "0:00:00"


def test_a_disabled_bar_still_writes_start_periodic_and_end_lines(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setenv(PROGRESS_FD_ENV, str(w))
    for _ in bar(range(3), desc="calibrate m", unit="layers", disable=True, every_s=0.0):
        pass
    with bar(total=2, desc="profile m on d", unit="points", disable=True, every_s=3600.0) as b:
        b.update(1)
        b.update(1)
    os.close(w)
    lines = read_lines(r)
    assert lines[0] == "llmpq calibrate m: 0/3 layers (0%), 0:00:00 elapsed, ETA ?"
    assert [line.split(": ")[1].split(" (")[0] for line in lines[1:3]] == ["1/3 layers", "2/3 layers"]
    assert re.fullmatch(r"llmpq calibrate m: done, 3 layers in 0:00:00", lines[3])
    assert lines[4].startswith("llmpq profile m on d: 0/2 points") and lines[5].startswith("llmpq profile m on d: done, 2")
    assert len(lines) == 6  # every_s = 1 h: no periodic line between start and end


def test_resumed_work_starts_from_its_initial_count(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setenv(PROGRESS_FD_ENV, str(w))
    with bar(total=10, initial=6, desc="generate", unit="prompts", disable=True) as b:
        b.update(4)
    os.close(w)
    lines = read_lines(r)
    assert lines[0].startswith("llmpq generate: 6/10 prompts") and lines[-1].startswith("llmpq generate: done, 10")


def test_a_single_step_says_started_and_done(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setenv(PROGRESS_FD_ENV, str(w))
    with bar(total=1, desc="deploy llmpq", unit="plans", disable=True) as b:
        b.update(1)
    os.close(w)
    assert read_lines(r) == ["llmpq deploy llmpq: started", "llmpq deploy llmpq: done in 0:00:00"]


def test_no_variable_or_a_closed_descriptor_writes_nothing(monkeypatch, capfd):
    monkeypatch.delenv(PROGRESS_FD_ENV, raising=False)
    assert progress_fd() is None
    r, w = os.pipe()
    os.close(w)
    assert progress_fd({PROGRESS_FD_ENV: str(w)}) is None
    assert progress_fd({PROGRESS_FD_ENV: "three"}) is None
    monkeypatch.setenv(PROGRESS_FD_ENV, str(w))
    assert list(bar(range(2), desc="x", disable=True)) == [0, 1]  # the step runs all the same
    assert "llmpq x" not in capfd.readouterr().err


def test_stage_launchers_do_not_inherit_the_descriptor_number(monkeypatch, tmp_path):
    """torchrun closes descriptor 3 in its workers, so the number must not reach them (another file may hold it)."""
    from llmpq.runtime.launch import _run

    out = tmp_path / "env.txt"
    code = _run([sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ.get({PROGRESS_FD_ENV!r}, '-'))"],
                {**os.environ, PROGRESS_FD_ENV: "3"})
    assert code == 0 and out.read_text() == "-"


def test_the_launcher_watches_while_it_waits(tmp_path):
    from llmpq.runtime.launch import _run

    calls = []
    code = _run([sys.executable, "-c", "import time; time.sleep(0.5)"], dict(os.environ), lambda: calls.append(1),
                every_s=0.1)
    assert code == 0 and len(calls) >= 2
