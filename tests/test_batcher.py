"""The batch job's scheduler, row layouts and step messages, without a model: fake tokens, a simulated ring."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from llmpq.runtime.batcher import Batcher
from llmpq.runtime.kvcache import CacheShape, StageKVCache
from llmpq.runtime.rows import RaggedView, RowLayout, row_tensors
from llmpq.runtime.wire import DECODE, PREFILL, STOP, Wire

EOS = 1


def fake_next(prompt: tuple[int, ...], generated: list[int]) -> int:
    """A deterministic 'model': the next token from the prompt and what came so far; EOS now and then."""
    h = (sum(prompt) * 31 + len(prompt) * 7 + sum((i + 3) * t for i, t in enumerate(generated))) % 97
    return EOS if h < 9 else 2 + h


def reference(prompt, max_new, eos=True):
    out = []
    while len(out) < max_new:
        out.append(fake_next(prompt, out))
        if eos and out[-1] == EOS:
            return out, "eos"
    return out, "length"


def simulate(prompts, batch, b_p, b_d, max_new, mode, eos=True):
    """Run a Batcher as the first stage does (start every step it may, then take the oldest step's tokens:
    the ring is FIFO). Checks every step's layout against what each sequence has seen; returns the finished
    sequences and the steps issued."""
    batcher = Batcher(prompts, batch, b_p, b_d, max_new, (EOS,) if eos else (), mode)
    seen = {}  # prompt index -> tokens fed so far (prompt + generated)
    flight, steps, finished = deque(), [], {}
    while not batcher.done:
        for step in batcher.issue():
            steps.append(step)
            assert len(set(step.layout.slots)) == step.layout.rows <= (b_p if step.phase == "prefill" else b_d)
            tokens = []
            for r, i in enumerate(step.sequences):
                if step.phase == "prefill":
                    pad = step.layout.pads[r]
                    assert step.inputs[r][pad:] == prompts[i] and pad == step.layout.q - len(prompts[i])
                    seen[i] = []
                else:
                    # the fed token sits right after everything the row has written so far
                    assert step.layout.starts[r] == step.layout.pads[r] + len(prompts[i]) + len(seen[i]) - 1
                    if i not in finished:  # a finished row of a static wave runs on, its tokens unused
                        assert step.inputs[r] == (seen[i][-1],)
                tokens.append(fake_next(prompts[i], seen[i]))
            flight.append((step, tokens))
        assert flight, "stalled"
        step, tokens = flight.popleft()
        for i, t in zip(step.sequences, tokens):
            seen[i].append(t)
        for f in batcher.complete(step.index, tokens):
            assert f.index not in finished
            finished[f.index] = f
    return finished, steps


@pytest.mark.parametrize("mode", ["continuous", "static"])
@pytest.mark.parametrize("batch, b_p, b_d", [(4, 2, 2), (5, 3, 2), (8, 8, 3), (3, 1, 3), (1, 1, 1)])
def test_every_prompt_gets_its_sequential_completion(mode, batch, b_p, b_d):
    rng = random.Random(batch * 100 + b_p * 10 + b_d)
    prompts = [tuple(rng.randrange(2, 90) for _ in range(rng.randint(1, 12))) for _ in range(23)]
    finished, steps = simulate(prompts, batch, b_p, b_d, 9, mode)
    assert sorted(finished) == list(range(len(prompts)))
    for i, p in enumerate(prompts):
        tokens, reason = reference(p, 9)
        assert (list(finished[i].tokens), finished[i].finish) == (tokens, reason)
    assert {f.finish for f in finished.values()} == {"eos", "length"}
    # the cache never needs more than the longest prompt + max_new_tokens − 1 columns
    assert max(max(s.layout.starts) + s.layout.q for s in steps) <= max(map(len, prompts)) + 9 - 1


def test_continuous_mode_needs_fewer_row_steps_than_static():
    rng = random.Random(7)
    prompts = [tuple(rng.randrange(2, 90) for _ in range(rng.randint(3, 10))) for _ in range(40)]
    work = {}
    for mode in ("continuous", "static"):
        finished, steps = simulate(prompts, 8, 4, 4, 16, mode)
        assert sorted(finished) == list(range(40))
        work[mode] = sum(s.layout.rows for s in steps if s.phase == "decode")
    assert work["continuous"] < work["static"]


def test_static_mode_runs_waves_and_keeps_finished_rows():
    prompts = [(3, 4), (5,), (6, 7, 8), (9, 9)]
    finished, steps = simulate(prompts, 2, 2, 2, 4, "static", eos=False)
    prefill_at = [k for k, s in enumerate(steps) if s.phase == "prefill"]
    assert len(prefill_at) == 2 and [len(s.layout.slots) for s in steps if s.phase == "decode"] == [2] * 6
    assert all(len(f.tokens) == 4 and f.finish == "length" for f in finished.values())
    assert steps[0].sequences == (2, 0)  # longest first, ties in input order


def test_row_tensors_hand_computed():
    layout = RowLayout(slots=(3, 0), pads=(2, 0), starts=(0, 0), q=4)
    rows = row_tensors(layout, torch.device("cpu"))
    assert rows.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert rows.key_valid.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert rows.visible[0].int().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert rows.visible[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    decode = row_tensors(RowLayout((1, 2), (2, 0), (6, 3), 1), torch.device("cpu"))
    assert decode.positions.tolist() == [[4], [3]]
    assert decode.key_valid.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]
    mask = decode.additive_mask(torch.float32)
    assert mask.shape == (2, 1, 1, 7) and mask[1, 0, 0, 4] == torch.finfo(torch.float32).min and mask[0, 0, 0, 6] == 0
    with pytest.raises(ValueError, match="leave no token"):
        RowLayout((0,), (3,), (0,), 3)


def test_ragged_view_writes_each_row_at_its_column():
    cache = StageKVCache(CacheShape(first_layer=1, layers=1, sequences=4, kv_heads=1, max_len=6, head_dim=2),
                         torch.float32)
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, _ = RaggedView(cache, RowLayout((3, 1), (1, 0), (0, 0), 3)).update(k, -k, layer_idx=1)
    assert keys.shape == (2, 1, 3, 2) and torch.equal(cache.keys[0, 3, :, :3], k[0]) and torch.equal(cache.keys[0, 1, :, :3], k[1])
    new = torch.full((2, 1, 1, 2), 9.0)
    keys, values = RaggedView(cache, RowLayout((1, 3), (0, 1), (3, 4), 1)).update(new, new, layer_idx=1)
    assert keys.shape == (2, 1, 5, 2)
    assert (cache.keys[0, 1, 0, 3] == 9).all() and (cache.keys[0, 3, 0, 4] == 9).all() and (cache.keys[0, 3, 0, 3] == 0).all()
    assert torch.equal(keys[1, :, :3], k[0])  # gathered rows come back in the step's order
    with pytest.raises(IndexError, match="reads 7 columns"):
        RaggedView(cache, RowLayout((0,), (0,), (6,), 1))


@pytest.mark.parametrize("exact", [False, True])
def test_step_messages_round_trip(exact):
    wire = Wire(max_rows=3, hidden=4, dtype=torch.float32, exact=exact)
    layout = RowLayout((2, 0), (0, 1), (5, 4), 1)
    hidden = torch.randn(2, 1, 4)
    message, payload = wire.encode(DECODE, 11, layout, hidden, torch.device("cpu"))
    assert payload is None and message.dtype == torch.uint8
    assert message.numel() == (wire.capacity if exact else wire.header_bytes + 2 * 4 * 4)
    buffer = torch.zeros(wire.capacity, dtype=torch.uint8)
    buffer[:message.numel()] = message
    header = wire.decode(buffer)
    assert (header.kind, header.index, header.layout, header.inline) == (DECODE, 11, layout, True)
    assert torch.equal(wire.inline_hidden(buffer, header), hidden)
    prefill = RowLayout((0, 1), (2, 0), (0, 0), 5)
    big = torch.randn(2, 5, 4)
    message, payload = wire.encode(PREFILL, 12, prefill, big, torch.device("cpu"))
    header = wire.decode(message)
    assert not header.inline and payload.numel() == wire.payload_bytes(header) == 2 * 5 * 4 * 4
    assert torch.equal(wire.payload_hidden(payload, header), big)
    stop, _ = wire.encode(STOP, 13, None, None, torch.device("cpu"))
    assert wire.decode(stop).kind == STOP and wire.decode(stop).index == 13
