"""KV slots: one static cache region per running stream, so graphs write in place.

Per layer the cache is (slots + 1, kv_heads, max_context, head_dim): slot s holds one stream's K/V at positions
0..len-1. The extra last slot is scratch: padding rows of a decode graph read and write only there. A slot is one
contiguous block, so a later prefix cache can copy or share whole blocks."""
from __future__ import annotations

import torch


class KVSlots:
    def __init__(self, n_layers: int, slots: int, n_kv: int, max_context: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.slots, self.max_context = slots, max_context
        shape = (n_layers, slots + 1, n_kv, max_context, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.scratch = slots
        self._free = list(range(slots - 1, -1, -1))     # pop() hands out the lowest slot first

    def alloc(self) -> int:
        return self._free.pop()

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.slots and slot not in self._free
        self._free.append(slot)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
