"""Speculative decoding: a proposer drafts a few tokens per row, the model checks them in one pass.

One round, for the rows that speculate (the engine's `Engine.step` runs it in place of a decode step):

    1. propose   up to k draft tokens d1..dn per row, and the distribution q_i each was drawn
                 from (`DraftModel`), or none (`PromptLookup`: a point mass on its guess)
    2. verify    the model feeds [last token, d1..dn] at the row's next positions in one pass
                 (a multi-token prefill of the cache): its logits p_0..p_n at each
    3. accept    d_i is kept with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first one
                 refused, a token is drawn from max(p_{i-1} - q_i, 0), renormalized; if all n are
                 kept, one more from p_n. A round adds 1 to n + 1 tokens, each distributed exactly
                 as decoding without a draft would draw it (Leviathan et al. 2023, "Fast Inference
                 from Transformers via Speculative Decoding"; Chen et al. 2023). Greedy (p and q
                 one-hot): d_i is kept iff it is p_{i-1}'s argmax, and the argmax comes next.
    4. nothing   to undo in either KV cache: the keys of refused drafts sit past the row's
                 position, where attention (causal by position) never reads, and the row's next
                 pass overwrites them first.

p and q are the distributions the sampler draws from (`llama.processors.next_token_probs`):
every control (temperature, top-k, top-p, min-p, logit bias, penalties, bad words, min_gen_len)
applies to both in the same way, position by position, with the drafts before it as context.
A row whose drafts were all refused pauses drafting for 1, 2, 4, ... (at most MAX_PAUSE) steps,
decoding plainly, until a draft of it is kept again: which rounds speculate never changes what is
drawn, only how fast. Requests with a grammar do not speculate (a grammar's matcher would have to
follow every draft and be rolled back), nor requests with several rows once one has ended; the rows of one request
keep the same number of new tokens each round (as many as its row with the fewest), since the
request's token history is one (k, t) tensor.

Proposers:
    PromptLookup   the tokens that followed the latest earlier occurrence of the row's last
                   n-gram (n = 3, 2, 1), in its prompt or its tokens so far: no model
                   (transformers' prompt lookup decoding, llama.cpp's lookup).
    DraftModel     a second `Transformer` with the same vocabulary, run by `ModelRunner.draft`
                   with its own KV cache, whose rows move with the model's: another checkpoint,
                   or the model's own weights quantized (`Llama.build(speculative="int4")`).
                   Each row's draft cache catches up (a prefill of what it has not seen) before
                   drafting k tokens with k draft decode steps.

Shapes: k rows of a request, T = n + 1 positions verified, V vocabulary, t tokens so far.
"""

from typing import List, Optional, Tuple

import torch

from llama.engine.model_runner import Step
from llama.engine.sequence import Request, Sequence
from llama.processors import next_token_probs, uses_context

# Drafts: per row of the batch, its draft tokens ([] for none) and the distributions (n, V) they
# were drawn from (None: each a point mass on the token, as a lookup's guess is).
Drafts = Tuple[List[List[int]], List[Optional[torch.Tensor]]]


def can_speculate(request: Request) -> bool:
    """Whether the request's rows draft this round (see the module docstring)."""
    return (request.speculative and request.params.grammar is None
            and not any(seq.finished for seq in request.sequences))


# --- Proposers -----------------------------------------------------------------------------------


class PromptLookup:
    """Drafts by n-gram lookup in the row's own text (prompt and tokens so far).

    Args:
        k: most draft tokens per round.
        max_ngram, min_ngram: the longest and shortest trailing n-gram looked up, longest first.
    """

    name = "prompt-lookup"

    # 15: with the newest token, a verify pass of 16 positions, as many as the CPU kernels take in one
    # call (`llama.kernels.MAX_ROWS`; a 17th moved a SmolLM2 pass onto PyTorch's GEMMs: 45 -> 108 ms).
    def __init__(self, k: int = 15, max_ngram: int = 3, min_ngram: int = 1):
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, runner, batch: List[Sequence], wanted: List[int]) -> Drafts:
        drafts = [self.lookup(seq.prompt_tokens + seq.tokens, w) if w else [] for seq, w in zip(batch, wanted)]
        return drafts, [None] * len(batch)

    def lookup(self, context: List[int], n_tokens: int) -> List[int]:
        """Up to n_tokens tokens that followed the latest earlier occurrence of context's last n-gram."""
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest first, never the tail itself
                if context[start : start + n] == tail:
                    return context[start + n : start + n + n_tokens]
        return []

    def prefill(self, runner, sequences: List[Sequence]) -> None:
        """Nothing to prefill."""

    def update(self, seq: Sequence, kept: int) -> None:
        """Nothing to keep between rounds."""


class DraftModel:
    """Drafts with a small model (`ModelRunner.draft`), sampled with the request's controls.

    Each sequence's `draft_len` counts the positions of its row in the draft's cache that hold
    the draft's keys of its tokens. The draft reads the prompts in the model's prefill step
    (`prefill`), so a round first feeds it what lies past them (one or two tokens; a whole prompt
    for a sequence that did not speculate when it came), then drafts token by token.

    Args:
        k: draft tokens per round.
        name: what the draft is, for messages ("int4", "draft").
    """

    def __init__(self, k: int = 4, name: str = "draft"):
        self.k, self.name = k, name

    def propose(self, runner, batch: List[Sequence], wanted: List[int]) -> Drafts:
        max_seq_len = runner.draft.max_seq_len
        # Catch up, every row of the batch in one pass (the draft's rows are the model's): a row that
        # does not speculate refeeds its newest token where it stands, keys nothing will read.
        feeds, starts = [], []
        for seq, w in zip(batch, wanted):
            if w:
                feeds.append((seq.prompt_tokens + seq.tokens)[seq.draft_len : seq.cache_len + 1])
                starts.append(seq.draft_len)
            else:
                feeds.append([seq.tokens[-1]])
                starts.append(min(seq.cache_len, max_seq_len - 1))
        if all(len(feed) == 1 for feed in feeds):  # the usual case after a refusal: a decode step (compiled if asked)
            logits = runner.run(Step(tokens=[feed[0] for feed in feeds], positions=starts, draft=True))  # (B, V)
        else:
            logits = runner.run(Step(prompts=feeds, starts=starts, draft=True))  # (B, V)
        for seq, w in zip(batch, wanted):
            if w:
                seq.draft_len = seq.cache_len + 1  # the draft now holds the row up to its newest token
                seq.draft_fed = min(w, max(wanted) - 1)  # drafts fed below, each at its position

        requests = list(dict.fromkeys(seq.request for seq, w in zip(batch, wanted) if w))
        index = {seq.id: row for row, seq in enumerate(batch)}
        rows_of = {r.id: [index[s.id] for s in r.sequences] for r in requests}
        tokens = [[] for _ in batch]  # drafted so far, per row
        probs: List[List[torch.Tensor]] = [[] for _ in batch]
        positions = [seq.cache_len for seq in batch]
        for i in range(max(wanted)):
            next_tokens = [seq.tokens[-1] for seq in batch]  # rows not drafting refeed theirs
            for request in requests:
                rows = rows_of[request.id]
                drafted = torch.tensor([tokens[r] for r in rows], dtype=torch.long, device=logits.device)
                context = torch.cat([request.generated, drafted.view(len(rows), i)], dim=1)  # (k, t + i)
                q = next_token_probs(logits[rows], context, request.params, request.prompts)  # (k, V)
                if request.params.temperature == 0:
                    chosen = torch.argmax(q, dim=-1)
                else:
                    chosen = torch.multinomial(q, 1, generator=request.generator)[:, 0]
                for row, token, q_row in zip(rows, chosen.tolist(), q):
                    tokens[row].append(token)
                    next_tokens[row] = token
                    if request.params.temperature != 0:
                        probs[row].append(q_row)
            if i + 1 == max(wanted):
                break
            step_positions = [positions[r] + 1 + i if wanted[r] else min(positions[r], max_seq_len - 1)
                              for r in range(len(batch))]
            logits = runner.run(Step(tokens=next_tokens, positions=step_positions, draft=True))
        drafts = [tokens[r][: wanted[r]] for r in range(len(batch))]
        dists = [torch.stack(probs[r][: wanted[r]]) if probs[r] and wanted[r] else None for r in range(len(batch))]
        return drafts, dists

    def prefill(self, runner, sequences: List[Sequence]) -> None:
        """The prompts of sequences just prefilled in rows 0..k-1 (the model's prefill step) into the draft's
        cache, their whole prompts (a prefix the model found cached is not in the draft's cache): part of
        the time to the first token, not of a decoding round."""
        runner.run(Step(prompts=[seq.prompt_tokens for seq in sequences], draft=True))
        for seq in sequences:
            seq.draft_len = len(seq.prompt_tokens)

    def update(self, seq: Sequence, kept: int) -> None:
        """After the round: `kept` of the row's new tokens are in the model's cache past the position
        it stood at (the newest one never is); the draft holds those of them it was fed."""
        seq.draft_len += min(kept, seq.draft_fed)
        seq.draft_fed = 0


# --- The acceptance rule -------------------------------------------------------------------------


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), renormalized (rows (R, V)): where to draw from once a draft is refused.
    A row where p <= q everywhere (only by rounding: a refusal needs p < q at the draft) falls back to p."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=1e-30), p)


def accept(p: torch.Tensor, q: Optional[torch.Tensor], drafts: torch.Tensor, lengths: torch.Tensor,
           greedy: bool, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for k rows (the module docstring's step 3).

    Args:
        p: (k, T, V) the model's distributions after each of [last token, d1..d_{T-1}].
        q: (k, T - 1, V) the distributions the drafts were drawn from; None: point masses
            (a deterministic guess, as prompt lookup's).
        drafts: (k, T - 1) draft tokens; row r's first lengths[r] are real, the rest padding.
        lengths: (k,) drafts per row.
        greedy: p is one-hot (temperature 0): no random draws.
        generator: the request's random generator.

    Returns:
        (kept (k,): the leading drafts each row keeps, next (k,): the token after them).
    """
    k, T, V = p.shape
    columns = torch.arange(T - 1, device=p.device)
    real = columns[None, :] < lengths[:, None]  # (k, T - 1)
    target = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # (k, T - 1): p_{i-1}(d_i)
    if greedy:
        accepted = target > 0.5
    else:
        proposal = torch.ones_like(target) if q is None else q.gather(-1, drafts[..., None])[..., 0]
        uniform = torch.rand(k, T - 1, generator=generator, device=p.device)
        accepted = uniform * proposal < target  # u < p / q, without dividing by a q of 0
    accepted &= real
    kept = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # (k,)
    rows = torch.arange(k, device=p.device)
    at = p[rows, kept]  # (k, V): the distribution of the token after the kept drafts
    refused = kept < lengths
    if refused.any():
        index = kept.clamp(max=T - 2)
        if q is None:
            drafted = torch.nn.functional.one_hot(drafts[rows, index], V).to(p.dtype)
        else:
            drafted = q[rows, index]
        at = torch.where(refused[:, None], residual_distribution(at, drafted), at)
    if greedy:
        return kept, torch.argmax(at, dim=-1)
    return kept, torch.multinomial(at, 1, generator=generator)[:, 0]


# --- One round -----------------------------------------------------------------------------------


# Most decode steps a row waits before drafting again after its drafts were refused from the first
# token on: a verify pass costs 2 to 3 decode steps on CPUs (small matrix products), so text that
# does not follow the drafts (prompt lookup on new text) must not be verified every step.
MAX_PAUSE = 16


class Speculator:
    """Runs speculative rounds for an engine with one proposer.

    Args:
        proposer: `PromptLookup` or `DraftModel` (which needs the runner's `draft`).
    """

    def __init__(self, proposer):
        self.proposer = proposer

    def wanted(self, batch: List[Sequence], max_seq_len: int) -> List[int]:
        """Drafts to ask for, per row: k, fewer near the row's length limit (a round adds up to
        n + 1 tokens), none for rows that do not speculate or pause (`accept`); all fewer when a row
        is near the end of the context (the verify pass is as wide as the widest row, and every
        row's positions must fit)."""
        width = max_seq_len - max(min(seq.cache_len, max_seq_len - 1) for seq in batch)  # positions T may span
        wanted = []
        for seq in batch:
            left = seq.stop.limit - seq.stop.num_tokens  # tokens the row may still add
            if seq.spec_pause > 0:
                seq.spec_pause -= 1
                wanted.append(0)
            else:
                wanted.append(max(0, min(self.proposer.k, left - 1, width - 1)) if can_speculate(seq.request) else 0)
        return wanted

    def prefill(self, runner, sequences: List[Sequence]) -> None:
        """After the model's prefill of `sequences` (rows 0..k-1): the proposer's, if it has one."""
        self.proposer.prefill(runner, sequences)

    def propose(self, runner, batch: List[Sequence], max_seq_len: int) -> Optional[Drafts]:
        """The drafts of a round, or None when no row drafts a token (decode normally then)."""
        wanted = self.wanted(batch, max_seq_len)
        if not any(wanted):
            return None
        drafts, dists = self.proposer.propose(runner, batch, wanted)
        if not any(drafts):
            return None
        return drafts, dists

    def accept(self, request: Request, logits: torch.Tensor, drafts: List[List[int]],
               dists: List[Optional[torch.Tensor]]) -> Tuple[List[List[int]], int]:
        """(the new tokens of the request's rows, each row as many; how many of them are drafts), from
        the verify pass's logits (k, T, V) over its rows. The tokens are appended to `request.generated`."""
        k, T, V = logits.shape
        params = request.params
        lengths = torch.tensor([len(d) for d in drafts], device=logits.device)
        padded = torch.zeros(k, T - 1, dtype=torch.long, device=logits.device)
        for row, draft in enumerate(drafts):
            padded[row, : len(draft)] = torch.tensor(draft, dtype=torch.long, device=logits.device)
        p = self._target_probs(logits, request, padded)  # (k, T, V)
        q = None
        if any(d is not None for d in dists):
            q = torch.zeros(k, T - 1, V, device=logits.device)
            for row, dist in enumerate(dists):
                if dist is not None:
                    q[row, : dist.shape[0]] = dist
        kept, after = accept(p, q, padded, lengths, params.temperature == 0, request.generator)
        n_new = int(kept.min()) + 1  # every row of the request keeps as many (the module docstring)
        kept_list, after_list = kept.tolist(), after.tolist()
        new_tokens = [(drafts[row][: kept_list[row]] + [after_list[row]])[:n_new] for row in range(k)]
        request.generated = torch.cat(
            [request.generated, torch.tensor(new_tokens, dtype=torch.long, device=logits.device)], dim=1)
        for seq, draft, kept in zip(request.sequences, drafts, kept_list):
            self.proposer.update(seq, n_new - 1)
            if draft:  # a wasted draft pauses the row's drafting: 1, 2, 4, ... steps, MAX_PAUSE at most
                seq.spec_backoff = 0 if kept else min(max(1, 2 * seq.spec_backoff), MAX_PAUSE)
                seq.spec_pause = seq.spec_backoff
        return new_tokens, sum(min(kept, n_new) for kept in kept_list)

    @staticmethod
    def _target_probs(logits: torch.Tensor, request: Request, drafts: torch.Tensor) -> torch.Tensor:
        """The model's distribution (k, T, V) at each verified position, with the drafts before it as context."""
        k, T, V = logits.shape
        params, generated = request.params, request.generated
        if not uses_context(params, generated.shape[1]):  # one call for every position
            flat = next_token_probs(logits.reshape(k * T, V), generated.repeat_interleave(T, dim=0), params)
            return flat.view(k, T, V)
        return torch.stack([next_token_probs(logits[:, j], torch.cat([generated, drafts[:, :j]], dim=1), params,
                                             request.prompts) for j in range(T)], dim=1)

