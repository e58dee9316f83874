"""The messages of a batch job's pipeline: a step header travels with the hidden states it describes.

The first stage schedules; every other stage learns each step from its header (int64: kind, step index,
q, rows, whether the hidden states are inline, then per row its slot, padding and first column), so it
can place the rows in its KV cache and build their positions and masks without knowing the tokens.
A step message is one byte buffer of fixed capacity, header + up to R rows of one token's hidden states
(R = max(b_p, b_d)): a decode step's hidden states travel inline, so its receive can be posted ahead
(module `comm`). A prefill step's q·rows·hidden states do not fit: they follow as a second message whose
size the header gives. A stop message (kind STOP) ends the job. Over gloo a message sends only the bytes
it uses (a receive may be larger than what arrives); over NCCL sizes must match, so it sends the whole
capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rows import RowLayout

PREFILL, DECODE, STOP = 0, 1, 2
KINDS = {"prefill": PREFILL, "decode": DECODE}
PHASE_OF = {PREFILL: "prefill", DECODE: "decode"}
FIXED_FIELDS = 5  # kind, index, q, rows, inline


@dataclass(frozen=True)
class Header:
    """A decoded step header: STOP has no layout."""

    kind: int
    index: int
    layout: RowLayout | None
    inline: bool

    @property
    def phase(self) -> str:
        return PHASE_OF[self.kind]


@dataclass(frozen=True)
class Wire:
    """Message geometry of one job: at most `max_rows` rows per step of `hidden` values in `dtype`."""

    max_rows: int
    hidden: int
    dtype: torch.dtype
    exact: bool = False          # send the whole capacity (NCCL); else only the bytes used

    @property
    def header_len(self) -> int:
        return FIXED_FIELDS + 3 * self.max_rows

    @property
    def header_bytes(self) -> int:
        return 8 * self.header_len

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def capacity(self) -> int:
        """Bytes of a step message: header + max_rows rows of one token."""
        return self.header_bytes + self.max_rows * self.hidden * self.element_bytes

    def _header(self, kind: int, index: int, layout: RowLayout | None, inline: bool) -> torch.Tensor:
        fields = torch.zeros(self.header_len, dtype=torch.long)
        fields[:FIXED_FIELDS] = torch.tensor([kind, index, layout.q if layout else 0, layout.rows if layout else 0,
                                              int(inline)])
        if layout is not None:
            if layout.rows > self.max_rows:
                raise ValueError(f"step {index} has {layout.rows} rows, messages hold {self.max_rows}")
            r, base = layout.rows, FIXED_FIELDS
            fields[base:base + r] = torch.tensor(layout.slots)
            fields[base + self.max_rows:base + self.max_rows + r] = torch.tensor(layout.pads)
            fields[base + 2 * self.max_rows:base + 2 * self.max_rows + r] = torch.tensor(layout.starts)
        return fields

    def encode(self, kind: int, index: int, layout: RowLayout | None, hidden: torch.Tensor | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step message and, for hidden states that do not fit inline, the payload message that follows."""
        inline = hidden is not None and hidden.numel() <= self.max_rows * self.hidden
        header = self._header(kind, index, layout, inline).to(device).view(torch.uint8)
        parts = [header]
        payload = None
        if hidden is not None:
            data = hidden.to(self.dtype).contiguous().view(-1).view(torch.uint8)
            if inline:
                parts.append(data)
            else:
                payload = data
        used = torch.cat(parts) if len(parts) > 1 else header
        if not self.exact:
            return used, payload
        message = torch.zeros(self.capacity, dtype=torch.uint8, device=device)
        message[:used.numel()] = used
        return message, payload

    def decode(self, message: torch.Tensor) -> Header:
        """The header of a received step message."""
        fields = message[:self.header_bytes].view(torch.long).cpu().tolist()
        kind, index, q, rows, inline = fields[:FIXED_FIELDS]
        if kind == STOP:
            return Header(kind, index, None, False)
        base, m = FIXED_FIELDS, self.max_rows
        layout = RowLayout(tuple(fields[base:base + rows]), tuple(fields[base + m:base + m + rows]),
                           tuple(fields[base + 2 * m:base + 2 * m + rows]), q)
        return Header(kind, index, layout, bool(inline))

    def hidden_shape(self, header: Header) -> tuple[int, int, int]:
        assert header.layout is not None
        return (header.layout.rows, header.layout.q, self.hidden)

    def payload_bytes(self, header: Header) -> int:
        rows, q, hidden = self.hidden_shape(header)
        return rows * q * hidden * self.element_bytes

    def inline_hidden(self, message: torch.Tensor, header: Header) -> torch.Tensor:
        """The hidden states carried inside a step message."""
        n = self.payload_bytes(header)
        return message[self.header_bytes:self.header_bytes + n].view(self.dtype).view(self.hidden_shape(header))

    def payload_hidden(self, payload: torch.Tensor, header: Header) -> torch.Tensor:
        return payload.view(self.dtype).view(self.hidden_shape(header))
