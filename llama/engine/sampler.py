"""The sampler: every row's next token from its logits, each request with its own controls.

The rows of one request are chosen together, in one call of `llama.processors.next_token`
with the request's generator: a batch from one `generate` call draws exactly what
Meta's reference draws. Greedy requests with no processor to apply are decided
together in one argmax over all their rows, whatever request they belong to.

Requests with a grammar (`SamplingParams.grammar`) keep a matcher per row
(`Request.grammar`, made at their first token); the masks of every constrained
row of the step are computed in one call (`llama.grammar.logit_masks`) and
applied as one more processor, and each matcher then takes its row's token.
Rows whose sequence has ended are neither masked nor advanced.

Log-probabilities are of the model's distribution (before any processor), as the
reference reports them.

Shapes: B rows in the step, k rows of one request, V vocabulary, t tokens sampled so far.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llama.engine.sequence import Request
from llama.processors import SamplingParams, next_token

# (request, its rows of the step's logits, in the order of request.sequences)
Group = Tuple[Request, List[int]]


def needs_only_argmax(params: SamplingParams, generated: int) -> bool:
    """Greedy with every processor off (min_gen_len no longer applying after `generated` tokens)."""
    return (params.temperature == 0 and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.bad_words and not params.logit_bias
            and params.grammar is None and generated >= params.min_gen_len)


def rows_index(rows: Sequence[int]):
    """rows as a slice when they are consecutive (a view, no copy), else as a list."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return list(rows)


class Sampler:
    """Chooses the next token of every row; keeps each request's view of its tokens for the processors."""

    def __call__(self, logits: torch.Tensor, groups: List[Group]) -> torch.Tensor:
        """The next token of each row (B,) from the step's fp32 logits (B, V)."""
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        constrained = [request for request, _ in groups if request.params.grammar is not None]
        masks = self._grammar_masks(constrained, logits)
        argmax_rows: List[int] = []
        for request, rows in groups:
            if needs_only_argmax(request.params, request.generated.shape[1]):
                argmax_rows.extend(rows)
                continue
            index = rows_index(rows)
            tokens[index] = next_token(logits[index], request.generated, request.params, request.generator,
                                       prompt=request.prompts, grammar_mask=masks.get(request.id))  # (k,)
        if argmax_rows:
            index = rows_index(argmax_rows)
            tokens[index] = torch.argmax(logits[index], dim=-1)
        for request, rows in groups:
            request.generated = torch.cat([request.generated, tokens[rows_index(rows), None]], dim=1)  # (k, t + 1)
            if request.grammar is not None:
                request.grammar.advance(request.generated[:, -1].tolist(), _active(request))
        return tokens

    @staticmethod
    def _grammar_masks(requests: List[Request], logits: torch.Tensor) -> Dict[int, torch.Tensor]:
        """request id -> (k, V) its grammar's logit masks (0: allowed, -inf: not), for every constrained request."""
        if not requests:
            return {}
        for request in requests:
            if request.grammar is None:  # its first token
                request.grammar = request.params.grammar.start(len(request.sequences))
        from llama.grammar import logit_masks  # only requests with a grammar need llguidance

        masks = logit_masks([(r.grammar, _active(r)) for r in requests], logits.shape[-1], logits.device)
        return {request.id: mask for request, mask in zip(requests, masks)}

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: List[int],
                 top: int = 0) -> Tuple[List[float], Optional[List[List[Tuple[int, float]]]]]:
        """Log-probabilities of `tokens` (B,) at `rows` under logits (B, V), and the `top` most likely ids'."""
        index = rows_index(rows)
        logprobs = torch.log_softmax(logits[index], dim=-1)  # (k, V)
        chosen = logprobs.gather(-1, tokens[index, None])[:, 0].tolist()
        if top == 0:
            return chosen, None
        best = torch.topk(logprobs, top, dim=-1)
        alternatives = [list(zip(ids, values)) for ids, values in zip(best.indices.tolist(), best.values.tolist())]
        return chosen, alternatives


def _active(request: Request) -> List[bool]:
    """Which of the request's rows are still generating (the others are decoded only to keep its draws)."""
    return [not seq.finished for seq in request.sequences]
