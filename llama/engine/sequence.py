"""What the engine decodes: `Sequence`s (one row of the batch each), grouped in `Request`s.

A `Request` is one call of `Llama.generate` (all its prompts, n continuations each)
or one server request. Its sequences share the sampling controls and one random
generator, and are sampled in one draw per step, as Meta's reference samples a
batch. So they join the batch together and leave it together: a sequence that
ends early keeps its row and goes on being decoded and sampled, its tokens past
the end discarded, until the request's last sequence ends. That keeps every draw
of the others exactly what the reference draws.
"""

import itertools
from typing import TYPE_CHECKING, List, Optional

import torch

from llama.engine.stopping import StopCriteria
from llama.processors import SamplingParams

if TYPE_CHECKING:
    from llama.grammar import GrammarState

_ids = itertools.count()


class Sequence:
    """One prompt being continued: its tokens, its stop rules, its row of the KV cache.

    Args:
        prompt_tokens: the prompt's token ids (1 to max_seq_len - 1 of them).
        stop: its stop rules (which also hold its length limit).
        logprobs: record each token's log-probability ...
        top_logprobs: ... and this many most likely alternatives.
    """

    def __init__(self, prompt_tokens: List[int], stop: StopCriteria, *, logprobs: bool = False,
                 top_logprobs: int = 0):
        self.id = next(_ids)
        self.prompt_tokens = list(prompt_tokens)
        self.stop = stop
        self.want_logprobs = logprobs or top_logprobs > 0
        self.top_logprobs = top_logprobs
        self.tokens: List[int] = []  # every token sampled, also past its end while its request runs
        self.logprobs: List[float] = []  # of each of `tokens`, when asked for
        self.row: Optional[int] = None  # its row of the KV cache while in the batch
        self.request: Optional["Request"] = None  # the request it belongs to
        # Speculative decoding with a draft model (`llama.engine.speculative.DraftModel`): positions of
        # its row in the draft's cache that hold the draft's keys of its tokens, and drafts fed this round.
        self.draft_len = 0
        self.draft_fed = 0
        self.spec_pause = 0  # decode steps left before it drafts again (`Speculator.accept`) ...
        self.spec_backoff = 0  # ... after a pause this long

    @property
    def finished(self) -> bool:
        return self.stop.stopped

    @property
    def result(self) -> List[int]:
        """The generated tokens: cut before a stop token, ending with the token completing a stop string."""
        return self.tokens[: self.stop.num_tokens]

    @property
    def cache_len(self) -> int:
        """Positions of its cache row holding keys: the prompt and every sampled token but the newest."""
        return len(self.prompt_tokens) + len(self.tokens) - 1


class Request:
    """Sequences sampled together with one set of controls and one generator (see the module docstring).

    Args:
        sequences: its sequences, in the order their rows are filled.
        params: how each next token is chosen.
        generator: the random generator every draw of this request comes from.
        speculative: False: never drafted for (`generate(speculative=False)`, a server request's opt-out).
    """

    def __init__(self, sequences: List[Sequence], params: SamplingParams, generator: torch.Generator,
                 speculative: bool = True):
        self.id = next(_ids)
        self.sequences = sequences
        self.params = params
        self.generator = generator
        for seq in sequences:
            seq.request = self
        # The processors' view of the rows, on the device, built at admission and grown each step.
        self.prompts: Optional[torch.Tensor] = None  # (k, L) prompts left-padded with -1
        self.generated: Optional[torch.Tensor] = None  # (k, t) every token sampled so far
        self.grammar: Optional["GrammarState"] = None  # with params.grammar: its rows' matchers, made by the sampler
        self.speculative = speculative

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)
