"""The plain (eager, host-indexed) forward of one packed step, as the engine runs it.

This is the reference the fast decode path is checked against and the "no graphs" column of the
benchmark: PagedAttention builds its index tensors on the host, every op is a separate launch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.model.model import RankModel
from enginesmith.runtime.model.paged_attention import PagedAttention, SeqSpan
from enginesmith.runtime.parallel.pipeline import MicroBatch, run_layers

Reduce = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def plain_forward(model: RankModel, cache: PagedKVCache, spans: list[SeqSpan], input_ids: list[int],
                  reduce: Reduce | None = None, gather: Reduce | None = None,
                  layers: Callable = run_layers) -> torch.Tensor:
    """Run `spans` (packed, their blocks reserved) through every layer; (len(spans), vocab) float32 logits
    of each span's last token. `reduce`/`gather` are the TP all-reduce and vocab all-gather (None: tp=1);
    `layers` runs the layers (run_layers, or the compiled / graphed prefill runners with its arithmetic)."""
    device = cache.k.device
    positions = [p for s in spans for p in range(s.start, s.end)]
    if len(positions) != len(input_ids):
        raise ValueError(f"spans cover {len(positions)} tokens but {len(input_ids)} input ids were given")
    last = torch.tensor(list(itertools.accumulate(s.num_tokens for s in spans)), device=device) - 1
    mb = MicroBatch(input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
                    positions=torch.tensor(positions, dtype=torch.long, device=device),
                    logit_rows=last, attn=PagedAttention(cache, spans))
    hidden = layers(model, reduce, model.embed(mb.input_ids), mb)
    logits = model.final_logits_shard(hidden[last])
    if gather is not None:
        logits = gather(logits)
    return logits[:, : model.cfg.vocab_size]

