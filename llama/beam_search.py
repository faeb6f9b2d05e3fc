"""Beam search for one prompt, with transformers' semantics (`generate(num_beams=...,
do_sample=False)` with num_beams > 1), so both return the same tokens for the same weights.

The search is ours; the model is run by the engine's `ModelRunner`: the prompt
is prefilled once, into cache row 0. The beams are rows 0..n-1 of the KV cache;
each step keeps the best beams, the cache is reordered so that row i holds the
keys and values of beam i's parent (`ModelRunner.reorder`), and only the n new
tokens go through a decode step.

Each step, as in transformers:
  1. candidates: every beam's score plus every next token's log-probability;
     keep the K = max(2, 1 + number of stop tokens) * n best (enough that n of
     them do not end, whatever the stop tokens do).
  2. candidates that end (a stop token, or the last step) and rank among the
     n best become finished hypotheses, scored
     sum of log-probabilities / (generated length ** length_penalty);
     the n best finished hypotheses are kept.
  3. the n best candidates that do not end are the next beams.
  4. stop when n hypotheses are finished and either early_stopping is True, or
     the best running beam cannot beat the worst finished one (transformers'
     heuristic: the best beam's score divided by the current length ** length_penalty,
     or by the longest length ** length_penalty for early_stopping="never" with
     a positive length_penalty).

Shapes: n beams, K candidates, V vocabulary, t tokens generated so far.
"""

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from llama.engine.model_runner import ModelRunner
from llama.model import Transformer
from llama.processors import SamplingParams, apply_processors

# transformers' stand-in for minus infinity: scores stay finite, so sums and ranks stay defined.
_NEG = -1.0e9


class Hypothesis(NamedTuple):
    tokens: List[int]  # new tokens, cut before the stop token that ended them
    score: float  # sum of log-probabilities (the stop token's included) / length ** length_penalty
    logprobs: List[float]  # log-probability of each of `tokens` (the model's, before any processor)


@torch.inference_mode()
def beam_search(
    model: Union[Transformer, ModelRunner],
    prompt_tokens: List[int],
    max_gen_len: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    stop_tokens: Sequence[int] = (),
    params: Optional[SamplingParams] = None,
) -> List[int]:
    """The new tokens of the best beam-search hypothesis, cut before its stop token.

    See `beam_search_hypotheses` for the arguments.
    """
    return beam_search_hypotheses(
        model, prompt_tokens, max_gen_len, num_beams, length_penalty, early_stopping, stop_tokens, params
    )[0].tokens


@torch.inference_mode()
def beam_search_hypotheses(
    model: Union[Transformer, ModelRunner],
    prompt_tokens: List[int],
    max_gen_len: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    stop_tokens: Sequence[int] = (),
    params: Optional[SamplingParams] = None,
) -> List[Hypothesis]:
    """Beam search for one prompt; the num_beams finished hypotheses, best first.

    Args:
        model: the transformer, or the runner driving it (`Llama.engine.runner`, whose
            decode step may be compiled); its max_batch_size must be >= num_beams.
            Its KV cache rows 0..num_beams-1 are overwritten.
        prompt_tokens: the prompt's token ids.
        max_gen_len: most new tokens (fewer if the context would overflow max_seq_len).
        num_beams: beams kept at each step. 1 is greedy decoding, unless
            early_stopping="never" (the search goes on past a finished
            hypothesis) or a repetition penalty (applied to log-probabilities here).
        length_penalty: exponent of the length that divides a finished
            hypothesis' summed log-probability: > 0 favours longer ones, < 0 shorter ones.
        early_stopping: True stops as soon as num_beams hypotheses are finished;
            False stops when the best running beam, scored at the current length,
            cannot beat them; "never" scores it at the longest length when
            length_penalty > 0 (transformers' canonical beam search).
        stop_tokens: ids that end a hypothesis (transformers' eos_token_id).
        params: if given, its penalties, bad words and min_gen_len apply to each
            step's log-probabilities, as transformers' logits processors do;
            its temperature, top_k, top_p and min_p are ignored (no sampling).

    Raises:
        ValueError: num_beams exceeds the model's max_batch_size, or an argument is out of range.
    """
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
    model = runner.model
    n = num_beams
    max_batch_size, max_seq_len = model.params.max_batch_size, model.params.max_seq_len
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {n!r}")
    if n > max_batch_size:
        raise ValueError(
            f"num_beams={n} exceeds max_batch_size={max_batch_size}: each beam is a row of the KV cache; "
            f"pass fewer beams or build with max_batch_size >= {n}"
        )
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if len(prompt_tokens) == 0 or len(prompt_tokens) >= max_seq_len:
        raise ValueError(f"the prompt needs 1 to max_seq_len - 1 = {max_seq_len - 1} tokens, got {len(prompt_tokens)}")
    if max_gen_len < 1:
        raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")

    device = model.output.weight.device
    vocab_size = model.vocab_size
    prompt_len = len(prompt_tokens)
    max_gen_len = min(max_gen_len, max_seq_len - prompt_len)
    n_candidates = max(2, 1 + len(stop_tokens)) * n  # K
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    prompt = torch.tensor([prompt_tokens], dtype=torch.long, device=device)  # (1, L)

    # The running beams. At first all n would be copies of the prompt: only beam 0
    # counts (the others score -1e9), so the first step's candidates all extend it.
    beam_scores = torch.full((n,), _NEG, device=device)  # (n,) summed log-probabilities
    beam_scores[0] = 0.0
    beam_tokens = torch.empty(n, 0, dtype=torch.long, device=device)  # (n, t)
    beam_logprobs = torch.empty(n, 0, device=device)  # (n, t)
    finished: List[Hypothesis] = []  # the best n, best first

    logits = runner.prefill([prompt_tokens])  # (1, V): the prompt once, into cache row 0

    for step in range(max_gen_len):
        length = step + 1  # tokens each candidate will have
        raw_log_probs = torch.log_softmax(logits, dim=-1).expand(n, vocab_size)  # (n, V); step 0: n copies of row 0
        log_probs = raw_log_probs
        if params is not None:
            log_probs = apply_processors(raw_log_probs, beam_tokens, params, prompt.expand(n, -1))

        # 1. The K best candidates over all beams and tokens, best first.
        scores = beam_scores[:, None] + log_probs  # (n, V)
        cand_scores, flat = torch.topk(scores.reshape(-1), n_candidates)  # (K,)
        parents, tokens = flat // vocab_size, flat % vocab_size  # (K,) beam and token of each
        ends = torch.isin(tokens, stops) | (length == max_gen_len)  # (K,)
        cand_logprobs = raw_log_probs[parents, tokens]  # (K,) before processors, as generate reports them

        # 2. Candidates among the n best that end become finished hypotheses.
        for i in ends[:n].nonzero()[:, 0].tolist():
            parent, token = int(parents[i]), int(tokens[i])
            new_tokens = beam_tokens[parent].tolist() + [token]
            new_logprobs = beam_logprobs[parent].tolist() + [float(cand_logprobs[i])]
            if token in stop_tokens:  # returned without the stop token, but scored with it
                new_tokens, new_logprobs = new_tokens[:-1], new_logprobs[:-1]
            score = float(cand_scores[i] / length**length_penalty)
            finished.append(Hypothesis(new_tokens, score, new_logprobs))
        finished = sorted(finished, key=lambda h: h.score, reverse=True)[:n]

        # 3. The n best candidates that do not end carry on as the beams.
        running = cand_scores + ends.float() * _NEG  # (K,)
        keep = torch.topk(running, n).indices  # (n,) best first
        beam_scores, rows = running[keep], parents[keep]  # (n,) score, parent beam
        beam_tokens = torch.cat([beam_tokens[rows], tokens[keep, None]], dim=1)  # (n, t + 1)
        beam_logprobs = torch.cat([beam_logprobs[rows], cand_logprobs[keep, None]], dim=1)  # (n, t + 1)

        # 4. Stop check.
        if length == max_gen_len:
            break
        if len(finished) == n:
            if early_stopping is True:
                break
            best_length = max_gen_len if early_stopping == "never" and length_penalty > 0 else length
            if float(beam_scores[0] / best_length**length_penalty) <= finished[-1].score:
                break  # the best running beam cannot beat the worst finished hypothesis

        # Decode step: each cache row takes its parent's keys and values, then the n new tokens run.
        runner.reorder(rows)
        logits = runner.decode_step(beam_tokens[:, -1].tolist(), [prompt_len + step] * n)  # (n, V)

    return finished
