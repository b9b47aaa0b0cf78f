"""A KV cache whose batch rows come and go between steps: the serving engine's cache surgery.

transformers' ``DynamicCache`` holds one ``[B, H, S, d]`` key and value tensor per layer. The engine adds rows
when requests join, drops rows when they finish, and feeds rows of different lengths in one step (left
padded). ``SlotCache`` keeps, beside the cache, a ``[B, S]`` mask of which slots hold real tokens, builds the
4-D additive attention mask that lets each query see exactly its own row's real past, and compacts the cache
after a step with padding (real slots moved right, padding zeroed, all-padding columns dropped), so pure
decode steps carry no waste.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache


class SlotCache:
    """The engine's KV cache and its per-slot validity mask.

    Args:
        model: the causal LM (its config builds the cache).
        device: where the mask lives.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # [B, S] bool: which cache slots hold real tokens

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def reset(self) -> None:
        self.cache, self.mask = None, None

    def add_rows(self, n: int) -> None:
        """Append ``n`` empty rows (at a step boundary)."""
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
            self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        else:
            for layer in self._layers():
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    setattr(layer, name, torch.cat([t, t.new_zeros((n, *t.shape[1:]))]))
        self.mask = torch.cat([self.mask, torch.zeros((n, self.mask.shape[1]), dtype=torch.bool,
                                                      device=self.device)])

    def attention_mask(self, step_mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The 4-D additive mask ``[B, 1, T, S + T]`` for a step whose real tokens are ``step_mask`` [B, T],
        and the validity mask ``[B, S + T]`` the cache will have after it (pass it to ``commit``)."""
        b, t = step_mask.shape
        s = self.width
        kv = torch.cat([self.mask, step_mask], dim=1)
        causal = (torch.arange(s + t, device=self.device)[None, :]
                  <= (torch.arange(t, device=self.device) + s)[:, None])
        allowed = kv[:, None, :] & causal[None]
        # A large negative number, not -inf: a query with nothing to attend to (a padding position) then
        # gets a uniform average instead of NaN, and NaN could never reach a real row through the cache.
        mask = torch.zeros((b, 1, t, s + t), dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        return mask, kv

    def commit(self, kv: Tensor, padded: bool) -> None:
        """After the forward pass: adopt the step's validity mask; compact when the step had padding."""
        self.mask = kv
        if padded:
            self.compact()

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows leave), then compact."""
        if not keep:
            self.reset()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        self.compact()

    def compact(self) -> None:
        """Move each row's real slots to the right end, zero the padding, and drop all-padding columns."""
        mask = self.mask
        width = int(mask.sum(1).max()) if mask.shape[0] else 0
        right_aligned = bool((mask.to(torch.int8).diff(dim=1) >= 0).all()) if mask.shape[1] > 1 else True
        if width == mask.shape[1] and right_aligned:
            return
        b = mask.shape[0]
        # Stable sort puts padding (False) first and keeps real slots in order.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, mask.shape[1] - width:]
        new_mask = torch.gather(mask, 1, order)
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [B, H, S, d]
                g = order[:, None, :, None].expand(b, t.shape[1], width, t.shape[3])
                setattr(layer, name, torch.gather(t, 2, g) * new_mask[:, None, :, None].to(t.dtype))
        self.mask = new_mask

    def _layers(self) -> list:
        layers = getattr(self.cache, "layers", None)
        if layers is None or (layers and not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers)):
            raise RuntimeError("this transformers' DynamicCache has no .layers[i].keys/.values; the serving engine "
                               "needs them to add and drop rows between steps")
        return [x for x in layers if isinstance(getattr(x, "keys", None), Tensor) and x.keys.numel()]
