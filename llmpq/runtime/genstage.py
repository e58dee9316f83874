"""One stage process of a batch job: `python -m llmpq.runtime.genstage JOB.json`.

The same process model as `llmpq.runtime.stage` (rank and world from torchrun's or SLURM's variables,
the memory cap checked before loading, only the stage's layers loaded, any error ends the process
non-zero): the difference is the loop. Rank 0 schedules (`Batcher`), writes the completions a wave at a
time to the job's partial output file and shows progress; every rank writes a `GenerateReport` beside
the job when the job is done.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch

from ..artifacts import write_text
from ..generate.outputs import CompletionWriter, completion_line
from ..generate.progress import Progress
from ..profile.timing import torch_threads
from .batcher import Batcher, Finished
from .caps import MemoryCapError, cap_violation
from .genloop import GenerateLoop, GenerateRing, window_size
from .job import StageSpec
from .kvcache import StageKVCache, cache_shape
from .measure import StageClock, StageMemorySampler
from .parts import load_stage
from .stage import Placement, _init_process_group, placement_from_env, run_and_report, torch_device, torch_dtype
from .wire import Wire


@dataclass(frozen=True)
class GenerateJob:
    """Everything a stage process of a batch job needs: the plan's stages, the prompts still to do (token
    ids, ids, tokens cut by truncate_left), the generation settings and where completions go."""

    method: str
    model_dir: str
    quant_root: str
    scheme: str
    stages: tuple[StageSpec, ...]
    workdir: str
    micro_batch_prefill: int
    micro_batch_decode: int
    batch: int
    max_new_tokens: int
    max_len: int                      # cache columns per sequence: the longest prompt + max_new_tokens
    eos: tuple[int, ...]              # ids that end a sequence (empty for stop: none)
    pad_id: int
    mode: str                         # continuous | static (llmpq.runtime.batcher)
    prompts: tuple[tuple[int, ...], ...]
    ids: tuple[Any, ...]
    truncated: tuple[int, ...]
    partial: str
    total: int                        # prompts of the whole job (N), some possibly done before this run
    done_before: int
    token_ids: bool = False
    progress: bool = True
    wave_pause_s: float = 0.0         # test hook: sleep after each written wave
    backend: str = "gloo"
    timeout_s: float = 60.0
    verify: bool = True
    dtype: str = "float32"            # compute dtype of every stage (`llmpq.config.dtypes`)

    @property
    def sequences(self) -> int:
        """KV cache rows: B rounded up to whole decode micro-batches (as planned)."""
        return -(-self.batch // self.micro_batch_decode) * self.micro_batch_decode

    def report_path(self, rank: int) -> Path:
        return Path(self.workdir) / f"generate-rank{rank}.json"

    def write(self, path: str | Path) -> Path:
        return write_text(json.dumps(asdict(self), sort_keys=True) + "\n", path)

    @staticmethod
    def read(path: str | Path) -> "GenerateJob":
        data = json.loads(Path(path).read_text())
        stages = tuple(StageSpec(**{**s, "bits": tuple(s["bits"]), "kernels": tuple(tuple(k) for k in s["kernels"])})
                       for s in data.pop("stages"))
        tuples = {k: tuple(data.pop(k)) for k in ("eos", "ids", "truncated")}
        prompts = tuple(tuple(p) for p in data.pop("prompts"))
        return GenerateJob(stages=stages, prompts=prompts, **tuples, **data)


@dataclass(frozen=True)
class GenerateReport:
    """What one stage measured; rank 0 adds the job's counts (this run only)."""

    rank: int
    device: str
    host: str
    steps: int
    phases: dict[str, dict[str, float]]
    memory: dict[str, int]
    prompts: int = 0
    tokens: int = 0
    eos: int = 0
    wall_s: float = 0.0

    def write(self, path: str | Path) -> Path:
        return write_text(json.dumps(asdict(self)) + "\n", path)

    @staticmethod
    def read(path: str | Path) -> "GenerateReport":
        return GenerateReport(**json.loads(Path(path).read_text()))


class Completions:
    """Rank 0's sink: finished sequences -> output lines (a wave at a time) and progress."""

    def __init__(self, job: GenerateJob, tokenizer: Any):
        self.job, self.tokenizer = job, tokenizer
        pause = (lambda: time.sleep(job.wave_pause_s)) if job.wave_pause_s > 0 else None
        self.writer = CompletionWriter(Path(job.partial), job.batch, pause)
        self.progress = Progress(job.total, job.done_before, enabled=job.progress)
        self.prompts = self.tokens = self.eos = 0

    def __call__(self, finished: Sequence[Finished]) -> None:
        job, lines = self.job, []
        for f in finished:
            text_ids = f.tokens[:-1] if f.finish == "eos" else f.tokens
            text = self.tokenizer.decode(list(text_ids), skip_special_tokens=True)
            lines.append(completion_line(job.ids[f.index], text, len(job.prompts[f.index]), f.tokens, f.finish,
                                         job.truncated[f.index], job.token_ids))
            self.tokens += len(f.tokens)
            self.eos += f.finish == "eos"
        self.prompts += len(finished)
        self.writer.add(lines)
        self.progress.update(len(finished), sum(len(f.tokens) for f in finished))

    def close(self) -> None:
        self.writer.flush()
        self.progress.close()


def run_generate_stage(job: GenerateJob, place: Placement, init_dist: bool = True) -> GenerateReport:
    """Run stage `place.rank` of a batch job: cap check, load, (process group), the loop; its report."""
    spec = job.stages[place.rank]
    problem = cap_violation(spec)
    if problem is not None:
        raise MemoryCapError(problem)
    device, dtype = torch_device(spec, place.local_rank), torch_dtype(job.dtype)
    last = spec.index == len(job.stages) - 1
    with torch_threads(spec.threads), torch.inference_mode():
        sampler = StageMemorySampler(device).start()
        model = load_stage(job.model_dir, job.quant_root, job.scheme, spec.start, spec.bits, first=spec.first,
                           last=last, device=device, dtype=dtype, verify=job.verify, kernels=spec.kernel_map)
        cache = StageKVCache(cache_shape(model.config, spec.start, spec.end - spec.start, job.sequences, job.max_len),
                             dtype, device)
        clock = StageClock(device)
        ring = None
        if place.world > 1:
            if init_dist:
                _init_process_group(job, place, device)  # type: ignore[arg-type]
            ring = GenerateRing(place.rank, place.world, clock, device, timedelta(seconds=job.timeout_s))
            ring.connect()
        wire = Wire(max(job.micro_batch_prefill, job.micro_batch_decode), model.hidden, dtype,
                    exact=job.backend == "nccl")
        loop = GenerateLoop(model, cache, clock, wire, ring,
                            window_size(job.batch, job.micro_batch_prefill, job.micro_batch_decode))
        counts: dict[str, Any] = {}
        if spec.first:
            from transformers import AutoTokenizer

            sink = Completions(job, AutoTokenizer.from_pretrained(job.model_dir))
            batcher = Batcher(job.prompts, job.batch, job.micro_batch_prefill, job.micro_batch_decode,
                              job.max_new_tokens, job.eos, job.mode, job.pad_id)
            start = time.perf_counter()
            try:
                loop.run_first(batcher, sink)
            finally:
                sink.close()  # completions finished before a failure are kept too
            counts = {"prompts": sink.prompts, "tokens": sink.tokens, "eos": sink.eos,
                      "wall_s": time.perf_counter() - start}
        else:
            loop.run_relay()
        memory = sampler.stop(model.weight_bytes(), cache.nbytes)
    return GenerateReport(place.rank, spec.device, platform.node(), loop.steps, clock.to_dict(), asdict(memory),
                          **counts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmpq.runtime.genstage JOB.json", file=sys.stderr)
        return 2
    job = GenerateJob.read(argv[0])
    place = placement_from_env()
    return run_and_report(job, place, f"llmpq generate stage {place.rank}", run_generate_stage)


if __name__ == "__main__":
    sys.exit(main())
