"""The sampler: every row's next token from its logits, each request with its own controls.

The rows of one request are chosen together, in one call of `llama.processors.next_token`
with the request's generator: a batch from one `generate` call draws exactly what
Meta's reference draws. Greedy requests with no processor to apply are decided
together in one argmax over all their rows, whatever request they belong to.

Log-probabilities are of the model's distribution (before any processor), as the
reference reports them.

Shapes: B rows in the step, k rows of one request, V vocabulary, t tokens sampled so far.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from llama.engine.sequence import Request
from llama.processors import SamplingParams, next_token

# (request, its rows of the step's logits, in the order of request.sequences)
Group = Tuple[Request, List[int]]


def needs_only_argmax(params: SamplingParams, generated: int) -> bool:
    """Greedy with every processor off (min_gen_len no longer applying after `generated` tokens)."""
    return (params.temperature == 0 and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.bad_words and not params.logit_bias
            and generated >= params.min_gen_len)


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
        argmax_rows: List[int] = []
        for request, rows in groups:
            if needs_only_argmax(request.params, request.generated.shape[1]):
                argmax_rows.extend(rows)
                continue
            index = rows_index(rows)
            tokens[index] = next_token(logits[index], request.generated, request.params, request.generator,
                                       prompt=request.prompts)  # (k,)
        if argmax_rows:
            index = rows_index(argmax_rows)
            tokens[index] = torch.argmax(logits[index], dim=-1)
        for request, rows in groups:
            request.generated = torch.cat([request.generated, tokens[rows_index(rows), None]], dim=1)  # (k, t + 1)
        return tokens

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
