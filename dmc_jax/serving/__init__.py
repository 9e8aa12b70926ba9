"""Continuous batching over the paged KV caches: a host loop (`Engine`) over one cache interface
(`PagedKV` for vanilla, DMC and DMS; `PolicyKV` for the eviction policies).

    from dmc_jax.serving import Engine, paged_kv
    kv = paged_kv(model, "dmc", max_batch=16, kv_budget_mb=256)
    engine = Engine(kv, eos_ids=model.eos_ids)
    req = engine.submit(model.encode("The capital of France is"), max_tokens=16)
    engine.run_until_idle()
    model.tokenizer.decode(req.tokens)

`dmc_jax.api.Model.generate(..., max_batch=N)` and `dmc-jax serve` are built on this.
"""

from dmc_jax.serving.engine import Engine, Request
from dmc_jax.serving.kv import PagedKV, PolicyKV, paged_kv

__all__ = ["Engine", "Request", "PagedKV", "PolicyKV", "paged_kv"]
