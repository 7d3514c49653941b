"""``RemoteMixtureOfExperts``: a layer whose experts live on other peers, found through the DHT.

Forward, for a batch ``x [B, in_features]``:

1. a gating network scores every coordinate of every grid dimension (``Linear(in, sum(grid_size))``);
2. a beam search over the DHT finds each sample's ``k_best`` best alive experts;
3. each chosen expert gets one request with the rows of the samples that chose it, all concurrently;
4. once every sample has ``k_min`` answers (or nothing left to wait for) the layer waits at most
   ``timeout_after_k_min`` more for the rest, and never longer than ``forward_timeout`` in total;
5. the output is the average of the answers weighted by the gate's softmax, renormalised over the
   experts that answered that sample.

Backward sends each answering expert the gradient of its rows (it updates itself) and sums the input
gradients that come back; an expert that fails or is late in backward contributes zero. A sample that no
expert answered raises :class:`NoExpertsAvailable`, or yields zeros with ``allow_zero_outputs=True``.
Experts that failed are banned from the search for ``ban_time`` seconds.

An expert's reply is checked before it is used (:func:`hivesim.moe.remote.checked_reply`): an output that
is not ``[rows, out_features]``, not floating point or not finite, and an input gradient that is not
``[rows, in_features]`` and finite, count as that expert failing (``forward_bad_replies`` /
``backward_bad_replies`` in :attr:`stats`): the expert is dropped and banned like a dead one and the
samples are renormalised over the experts that answered well.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hivesim.moe.beam_search import FoundExpert, MoEBeamSearcher
from hivesim.moe.bridge import Bridge
from hivesim.moe.remote import ExpertError, ExpertFailed, call_backward, call_forward


class NoExpertsAvailable(RuntimeError):
    """Some samples got no answer from any expert (all dead, late, or none declared)."""


class RemoteMixtureOfExperts(nn.Module):
    """A mixture-of-experts layer over a grid of remote experts.

    Args:
        in_features: input size; outputs have ``out_features`` (default: the same) columns.
        grid_size: the expert grid, e.g. ``(32, 32)``; experts are ``{uid_prefix}.i.j``.
        dht: the blocking ``hivesim.DHT`` (a plain training loop), or a ``DHTNode`` inside a peer
            (build the layer in the peer's event loop; call it from an executor thread).
        uid_prefix: the experts' name prefix, e.g. ``"ffn"``.
        k_best: experts each sample asks; k_min: answers per sample before the grace period starts.
        forward_timeout: total seconds a forward waits (default 30).
        timeout_after_k_min: grace period once ``k_min`` answered (None: wait for all, up to the timeout).
        backward_k_min, backward_timeout: the same for backward (default timeout: ``forward_timeout``).
        allow_zero_outputs: samples nobody answered get zeros instead of an error.
        failure_rate: hide each (sample, expert) pair with this probability before the top-k (simulated
            failures, as in the learning@home experiments).
        ban_time: seconds an expert that failed is left out of searches.
        retries: fresh searches for samples whose experts all failed fast (within ``forward_timeout``).
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        dht: Any,
        uid_prefix: str,
        k_best: int,
        k_min: int = 1,
        forward_timeout: float | None = None,
        timeout_after_k_min: float | None = None,
        backward_k_min: int = 1,
        backward_timeout: float | None = None,
        allow_zero_outputs: bool = False,
        *,
        out_features: int | None = None,
        failure_rate: float = 0.0,
        ban_time: float = 5.0,
        retries: int = 2,
        cache_ttl: float = 2.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features or in_features
        self.grid_size = tuple(int(g) for g in grid_size)
        self.uid_prefix = uid_prefix
        self.k_best, self.k_min = k_best, k_min
        self.forward_timeout = forward_timeout if forward_timeout is not None else 30.0
        self.timeout_after_k_min = timeout_after_k_min
        self.backward_k_min = backward_k_min
        self.backward_timeout = backward_timeout if backward_timeout is not None else self.forward_timeout
        self.allow_zero_outputs = allow_zero_outputs
        self.failure_rate = failure_rate
        self.ban_time = ban_time
        self.retries = retries
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self._bridge = Bridge.resolve(dht)
        node = dht.node if hasattr(dht, "run_coroutine") else dht
        self.searcher = MoEBeamSearcher(node, uid_prefix, self.grid_size, cache_ttl=cache_ttl)
        self._rng = random.Random(seed)
        self.stats: dict[str, float] = defaultdict(float)

    # ------------------------------------------------------------------ torch side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input [batch, {self.in_features}], got {list(x.shape)}")
        scores = self.proj(x)
        outputs, mask, coords = self._call_experts(x, scores)
        logits = self._expert_logits(scores, coords)
        return self._combine(outputs, mask, logits)

    def _call_experts(self, x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_dim = [s.detach().cpu().numpy() for s in scores.split(list(self.grid_size), dim=1)]
        outputs, mask, coords = _MoECall.apply(_DUMMY, x, self, per_dim)
        return outputs.to(x.device), mask.to(x.device), coords.to(x.device)

    def _expert_logits(self, scores: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """logit[b, j] = sum over dimensions of the gate's score of expert j's coordinate (differentiable)."""
        logits = torch.zeros(coords.shape[:2], dtype=scores.dtype, device=scores.device)
        for dim, part in enumerate(scores.split(list(self.grid_size), dim=1)):
            logits = logits + part.gather(1, coords[:, :, dim])
        return logits

    def _combine(self, outputs: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        masked = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(masked, dim=1).nan_to_num(0.0)  # rows with no answers: all zeros
        return (weights.unsqueeze(-1) * outputs).sum(dim=1)

    # ------------------------------------------------------------------ network side (event loop)

    async def _search(self, per_dim: list[np.ndarray]) -> list[list[FoundExpert]]:
        t0 = time.perf_counter()
        found = await self.searcher.find_best_experts(per_dim, self.k_best, self.failure_rate, self._rng)
        self.stats["search_seconds"] += time.perf_counter() - t0
        return found

    async def _forward_async(self, x: torch.Tensor, per_dim: list[np.ndarray]) -> tuple[list[list[FoundExpert]], list]:
        """Search, ask every chosen expert concurrently; samples left with no answer because their experts
        failed fast (dead host, error) get a fresh search (the failed experts are now banned) while time
        remains, up to ``retries`` times. Returns the chosen experts and ``[(expert, rows, output)]``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.forward_timeout
        chosen = await self._search(per_dim)
        answers: list[tuple[FoundExpert, list[tuple[int, int]], torch.Tensor]] = []
        rows_to_ask = list(range(x.shape[0]))
        for attempt in range(1 + self.retries):
            groups: dict[FoundExpert, list[tuple[int, int]]] = defaultdict(list)
            for b in rows_to_ask:
                for j, expert in enumerate(chosen[b]):
                    groups[_key(expert)].append((b, j))
            results: dict[FoundExpert, torch.Tensor] = {}

            async def ask(expert: FoundExpert, rows: list[tuple[int, int]]) -> torch.Tensor:
                index = torch.tensor([b for b, _ in rows])
                return await call_forward(self._bridge.endpoint, expert.uid, expert.address, x[index],
                                          max(0.01, deadline - loop.time()), (self.out_features,))

            tasks = {asyncio.ensure_future(ask(e, rows)): e for e, rows in groups.items()}
            needs = [min(self.k_min, len(chosen[b])) if b in set(rows_to_ask) else 0 for b in range(x.shape[0])]
            await self._gather(tasks, groups, needs, deadline - loop.time(), results, "forward")
            answers += [(e, groups[e], y) for e, y in results.items()]
            answered_rows = {b for _, rows, _ in answers for b, _ in rows}
            rows_to_ask = [b for b in rows_to_ask if b not in answered_rows]
            if not rows_to_ask or attempt == self.retries or deadline - loop.time() < 0.05:
                break
            tried = {b: {e.uid for e in chosen[b]} for b in rows_to_ask}
            fresh = await self._search([d[rows_to_ask] for d in per_dim])
            self.stats["forward_retries"] += 1
            for b, experts in zip(rows_to_ask, fresh):
                chosen[b] = [e for e in experts if e.uid not in tried[b]] or chosen[b]
            rows_to_ask = [b for b in rows_to_ask if chosen[b] and chosen[b][0].uid not in tried[b]]
            if not rows_to_ask:
                break
        return chosen, answers

    async def _gather(self, tasks: dict[asyncio.Future, FoundExpert], groups: dict, needs: list[int],
                      timeout: float, answers: dict, kind: str) -> None:
        """Wait for ``tasks`` until each sample has ``needs[b]`` answers (or nothing outstanding), then at
        most ``timeout_after_k_min`` more, never past ``timeout``; cancel the rest."""
        answered = np.zeros(len(needs), dtype=np.int64)
        outstanding = np.zeros(len(needs), dtype=np.int64)
        for expert, rows in groups.items():
            for b, _ in rows:
                outstanding[b] += 1
        need = np.asarray(needs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        grace_deadline = None
        pending = set(tasks)
        try:
            while pending:
                until = deadline if grace_deadline is None else min(deadline, grace_deadline)
                wait = until - loop.time()
                if wait <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    expert = tasks[task]
                    rows = [b for b, _ in groups[expert]]
                    outstanding[rows] -= 1
                    error = task.exception()
                    if error is None:
                        answers[expert] = task.result()
                        answered[rows] += 1
                    else:
                        self.stats[f"{kind}_failures"] += 1
                        if isinstance(error, ExpertFailed) and error.remote_type == "BadReply":
                            self.stats[f"{kind}_bad_replies"] += 1
                        if isinstance(error, ExpertError):
                            self.searcher.ban(expert.uid, self.ban_time)
                if grace_deadline is None and np.all((answered >= need) | (outstanding == 0)):
                    if self.timeout_after_k_min is None:
                        if not pending:
                            break
                        grace_deadline = deadline
                    else:
                        grace_deadline = loop.time() + self.timeout_after_k_min
        finally:
            for task in pending:
                task.cancel()
                self.stats[f"{kind}_late"] += 1
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _backward_async(self, x: torch.Tensor, answered: list, grad_outputs: torch.Tensor) -> torch.Tensor:
        grad_x = torch.zeros_like(x)
        groups: dict[FoundExpert, list[tuple[int, int]]] = defaultdict(list)
        for expert, rows, _ in answered:
            groups[expert] += rows

        async def ask(expert: FoundExpert, rows: list[tuple[int, int]]) -> torch.Tensor:
            b_index = torch.tensor([b for b, _ in rows])
            j_index = torch.tensor([j for _, j in rows])
            return await call_backward(self._bridge.endpoint, expert.uid, expert.address, x[b_index],
                                       grad_outputs[b_index, j_index].contiguous(), self.backward_timeout)

        tasks = {asyncio.ensure_future(ask(e, rows)): e for e, rows in groups.items()}
        needs = np.zeros(x.shape[0], dtype=np.int64)
        for rows in groups.values():
            for b, _ in rows:
                needs[b] += 1
        needs = np.minimum(needs, self.backward_k_min).tolist()
        results: dict[FoundExpert, torch.Tensor] = {}
        await self._gather(tasks, groups, needs, self.backward_timeout, results, "backward")
        for expert, gx in results.items():
            grad_x.index_add_(0, torch.tensor([b for b, _ in groups[expert]]), gx.to(grad_x.dtype))
        return grad_x


# Always requires grad, so autograd calls backward (and experts learn) even when the input does not.
_DUMMY = torch.empty(0, requires_grad=True)


def _key(expert: FoundExpert) -> FoundExpert:
    """One request per expert, whatever score each sample gave it."""
    return FoundExpert(expert.uid, expert.address, expert.coords, 0.0)


class _MoECall(torch.autograd.Function):
    """Forward: search + concurrent expert calls; backward: gradients to the experts that answered."""

    @staticmethod
    def forward(ctx: Any, _dummy: torch.Tensor, x: torch.Tensor, moe: RemoteMixtureOfExperts, per_dim: list[np.ndarray]):  # type: ignore[override]
        x_cpu = x.detach().cpu().contiguous()
        chosen, answered = moe._bridge.run(lambda: moe._forward_async(x_cpu, per_dim), moe.forward_timeout + 30)
        batch, k, depth = x.shape[0], moe.k_best, len(moe.grid_size)
        outputs = torch.zeros(batch, k, moe.out_features)
        mask = torch.zeros(batch, k, dtype=torch.bool)
        coords = torch.zeros(batch, k, depth, dtype=torch.long)
        for b, experts in enumerate(chosen):
            for j, expert in enumerate(experts):
                coords[b, j] = torch.tensor(expert.coords)
        kept = []
        for expert, rows, y in answered:
            if tuple(y.shape) != (len(rows), moe.out_features):  # call_forward checked it; never trust a shape
                moe.stats["forward_bad_replies"] += 1
                continue
            kept.append((expert, rows, y))
            b_index = torch.tensor([b for b, _ in rows])
            j_index = torch.tensor([j for _, j in rows])
            outputs[b_index, j_index] = y.to(outputs.dtype)
            mask[b_index, j_index] = True
        moe.stats["forwards"] += 1
        answered = kept
        moe.stats["expert_calls"] += len(answered)
        empty = ~mask.any(dim=1)
        if empty.any():
            moe.stats["samples_without_experts"] += int(empty.sum())
            if not moe.allow_zero_outputs:
                unfound = sum(1 for b in range(batch) if empty[b] and not chosen[b])
                raise NoExpertsAvailable(
                    f"{int(empty.sum())} of {batch} samples got no answer from any expert of {moe.uid_prefix} "
                    f"{moe.grid_size}: for {unfound} of them the DHT listed no live expert, the others' experts "
                    f"failed or missed the {moe.forward_timeout} s timeout; pass allow_zero_outputs=True to get zeros instead")
        ctx.moe, ctx.answered = moe, answered
        ctx.save_for_backward(x_cpu)
        ctx.mark_non_differentiable(mask, coords)
        return outputs, mask, coords

    @staticmethod
    def backward(ctx: Any, grad_outputs: torch.Tensor, _mask: Any, _coords: Any):  # type: ignore[override]
        (x_cpu,) = ctx.saved_tensors
        moe: RemoteMixtureOfExperts = ctx.moe
        grad = grad_outputs.detach().cpu().float()
        grad_x = moe._bridge.run(lambda: moe._backward_async(x_cpu, ctx.answered, grad), moe.backward_timeout + 30)
        return None, grad_x, None, None


class RemoteSwitchMixtureOfExperts(RemoteMixtureOfExperts):
    """Switch routing (k_best=1): each sample goes to its single best alive expert, whose output is scaled by
    the gate's probability of that expert. ``forward`` returns ``(output, balancing_loss)``; add the loss
    (times a small coefficient) to keep the load spread over the grid. ``grid_utilization`` keeps a running
    average of the share of samples each coordinate of each dimension received."""

    def __init__(self, in_features: int, grid_size: Sequence[int], dht: Any, uid_prefix: str, *,
                 utilization_alpha: float = 0.9, **kwargs: Any) -> None:
        kwargs.pop("k_best", None)
        super().__init__(in_features, grid_size, dht, uid_prefix, k_best=1, **kwargs)
        self.utilization_alpha = utilization_alpha
        self.grid_utilization = [torch.full((g,), 1.0 / g) for g in self.grid_size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input [batch, {self.in_features}], got {list(x.shape)}")
        scores = self.proj(x)
        outputs, mask, coords = self._call_experts(x, scores)
        parts = scores.split(list(self.grid_size), dim=1)
        log_probs = sum(torch.log_softmax(p, dim=1).gather(1, coords[:, :1, d]) for d, p in enumerate(parts))
        prob = log_probs.exp() * mask[:, :1]
        output = (prob.unsqueeze(-1) * outputs[:, :1]).sum(dim=1)
        loss = x.new_zeros(())
        for d, part in enumerate(parts):
            share = torch.zeros(self.grid_size[d]).index_add_(0, coords[mask[:, 0], 0, d].cpu(),
                                                              torch.ones(int(mask[:, 0].sum())))
            share = share / max(1, int(mask[:, 0].sum()))
            with torch.no_grad():
                self.grid_utilization[d].mul_(self.utilization_alpha).add_((1 - self.utilization_alpha) * share)
            loss = loss + self.grid_size[d] * (share.to(part.device) * torch.softmax(part, dim=1).mean(0)).sum()
        return output, loss
