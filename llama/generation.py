"""`Llama`: build a model from a checkpoint and generate text with it.

The API follows Meta's reference (`meta-llama/llama3`): `Llama.build` ->
`generate` on token ids -> `text_completion` / `chat_completion` on strings.
"""

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.beam_search import beam_search_hypotheses
from llama.chat_format import Dialog, Message, choose_tool_format, make_chat_format
from llama.checkpoint import find_shards, load_model, read_params
from llama.distributed import choose_device, choose_dtype, is_main_process, setup_model_parallel
from llama.engine import Engine, ModelRunner, Request, StopCriteria
from llama.engine.speculative import DraftModel, PromptLookup, Speculator
from llama.errors import InvalidArgument
from llama.model import ModelArgs, Transformer
from llama.processors import SamplingParams, sample_top_p  # noqa: F401 (sample_top_p: the reference's name)
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.tools import ToolCallStream, apply_tool_choice, forced_call_grammar, normalize_tools, parse_reply

if TYPE_CHECKING:
    from llama.grammar import Grammar
    from llama.tools import ToolCall

logger = logging.getLogger(__name__)

SPECULATIVE = ("int4", "int8", "prompt-lookup", "draft")  # Llama.build's speculative= choices


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message  # with tools: also "tool_calls" (`llama.tools.AssistantMessage`)
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True
    stop_reason: str  # present with tools: "eom", "eot" (the stop token's), "stop" (a stop string) or "length"


class Llama:
    @staticmethod
    def build(
        ckpt_dir: Union[str, Path],
        tokenizer_path: Union[str, Path],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
        prefix_cache_tokens: int = 0,
        speculative: Optional[str] = None,
        draft: Optional[Union[str, Path]] = None,
        speculative_tokens: Optional[int] = None,
    ) -> "Llama":
        """Loads a Meta-format checkpoint and its tokenizer.

        Runs in a plain `python` process (a single-rank process group is
        created in memory) and under `torchrun`, one rank per checkpoint shard.

        Args:
            ckpt_dir: directory with `params.json` and `consolidated.NN.pth` shards.
            tokenizer_path: the tokenizer file (`tokenizer.model`); its kind
                (Llama 3 tiktoken, a converted model's BPE, SentencePiece) and the
                chat format are read from the file and the config beside it.
            max_seq_len: longest prompt + generation, in tokens (sizes the KV cache). Beyond the
                positions the model was trained for (params.json's max_position_embeddings,
                stored by `llama.convert`) it is accepted with a logged warning.
            max_batch_size: most sequences generated at once (sizes the KV cache).
            model_parallel_size: ranks the model is split over; defaults to
                the number of processes launched, and must equal the number of shards.
            seed: seed of the sampling generator; every rank must use the same.
            device: defaults to this rank's GPU if CUDA is available, else the CPU.
            dtype: defaults to bf16 on GPUs (fp16 where bf16 is unsupported), fp32 on CPU.
            compile: compile the decode step with `torch.compile` (CUDA graphs on
                GPUs; on CPU one compiled graph shared by the transformer blocks, see
                `compile_decode_step`). The first generation at each batch bucket
                (1, 2, 4, 8, ...) pays the compilation: about 20 s on 2 CPU cores
                for SmolLM2 the first time, a few seconds in later processes, which
                load it from inductor's cache.
            quantize: "int8", "int4" or "llm.int8" quantizes the weights after
                loading (see `llama.quantize`); a checkpoint written by
                `python -m llama.quantize` is loaded quantized without this.
            prefix_cache_tokens: keep the keys and values of up to this many tokens of earlier
                prompts and answers, and prefill a new prompt only after its longest cached prefix
                (`llama.engine.prefix_cache`; 0, the default: off). Outputs are the same either way.
            speculative: decode speculatively (`llama.engine.speculative`): "int4" or "int8" drafts
                with the model's own weights quantized (a copy made at load time), "prompt-lookup"
                drafts the tokens that followed the text's last n-gram where it occurred before
                (no model), "draft" with the checkpoint `draft`. Greedy output is the same as
                without, sampled output follows the same distribution. None (the default): off.
            draft: a draft checkpoint for speculative="draft" (implied): same tokenizer and
                vocabulary, as many shards as this one.
            speculative_tokens: draft tokens per round (default 4 for model drafts, 15 for
                prompt lookup).

        Returns:
            A ready `Llama`. No global torch default (dtype, device) is changed.

        Raises:
            FileNotFoundError: the directory, params.json, a shard or the tokenizer is missing.
            ValueError: the shard count, vocabulary size, keys or shapes do not match.
        """
        start_time = time.perf_counter()
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size), ("seed", seed)):
            if not _is_int(value):
                raise InvalidArgument(name, f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if model_parallel_size is not None and (not _is_int(model_parallel_size) or model_parallel_size < 1):
            raise InvalidArgument("model_parallel_size",
                                  f"model_parallel_size must be an integer >= 1 or None, got {model_parallel_size!r}")
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if value < 1:
                raise InvalidArgument(name, f"{name} must be >= 1, got {value}")
        # Validate the files before starting any process group.
        ckpt_dir = Path(ckpt_dir)
        shards = find_shards(ckpt_dir)
        params = read_params(ckpt_dir)
        tokenizer = load_tokenizer(tokenizer_path)

        device = choose_device(device)
        dtype = choose_dtype(device, dtype)
        model_parallel_size = setup_model_parallel(model_parallel_size, device)
        if len(shards) != model_parallel_size:
            raise ValueError(
                f"{ckpt_dir} holds {len(shards)} checkpoint shard(s) but the model-parallel size is "
                f"{model_parallel_size}: launch one process per shard "
                f"(torchrun --nproc_per_node {len(shards)} ...) or pass model_parallel_size={len(shards)}"
            )

        if draft is not None and speculative not in (None, "draft"):
            raise InvalidArgument("speculative", f"draft= is a draft checkpoint, for speculative='draft' (implied), "
                                                 f"not speculative={speculative!r}")
        speculative = "draft" if draft is not None else speculative
        if speculative not in (None, *SPECULATIVE):
            raise InvalidArgument("speculative", f"speculative must be one of {', '.join(SPECULATIVE)} or None, "
                                                 f"got {speculative!r}")
        if speculative == "draft" and draft is None:
            raise InvalidArgument("draft", "speculative='draft' needs draft=<a draft checkpoint directory>")
        if speculative_tokens is not None and (not _is_int(speculative_tokens) or speculative_tokens < 1):
            raise InvalidArgument("speculative_tokens",
                                  f"speculative_tokens must be an integer >= 1, got {speculative_tokens!r}")

        model, quantization = _load_transformer(ckpt_dir, shards, params, tokenizer, tokenizer_path, max_seq_len,
                                                max_batch_size, device, dtype)
        if quantize is not None:
            if quantization is not None:
                raise ValueError(f"{ckpt_dir} is already quantized ({quantization['mode']}): build it without quantize=")
            from llama.quantize import quantize_model  # optional feature, imported on use

            quantize_model(model, quantize)
        draft_model = None
        if speculative in ("int4", "int8"):
            if quantization is not None or quantize is not None:
                raise ValueError(f"speculative={speculative!r} drafts with a quantized copy of the model's float "
                                 f"weights: build from a float checkpoint, without quantize=")
            from llama.quantize import quantize_model

            draft_model = quantize_model(copy.deepcopy(model), speculative)
        elif speculative == "draft":
            draft_dir = Path(draft)
            draft_shards = find_shards(draft_dir)
            if len(draft_shards) != model_parallel_size:
                raise ValueError(f"the draft {draft_dir} holds {len(draft_shards)} shard(s) but the model-parallel "
                                 f"size is {model_parallel_size}: reshard it (python -m llama.convert reshard)")
            draft_model, _ = _load_transformer(draft_dir, draft_shards, read_params(draft_dir), tokenizer,
                                               tokenizer_path, max_seq_len, max_batch_size, device, dtype)
        if is_main_process():
            logger.info("Loaded in %.2f seconds", time.perf_counter() - start_time)
        return Llama(model, tokenizer, seed=seed, compile=compile, prefix_cache_tokens=prefix_cache_tokens,
                     speculative=speculative, draft=draft_model, speculative_tokens=speculative_tokens)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, seed: int = 1, compile: bool = False,
                 prefix_cache_tokens: int = 0, speculative: Optional[str] = None, draft: Optional[Transformer] = None,
                 speculative_tokens: Optional[int] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = make_chat_format(tokenizer)
        self.device = model.output.weight.device
        # Sampling draws from this generator only, never from torch's global one,
        # so every rank draws the same tokens and callers' RNG state is untouched.
        self.generator = torch.Generator(self.device).manual_seed(seed)
        speculator = None
        if speculative == "prompt-lookup":
            speculator = Speculator(PromptLookup(k=speculative_tokens) if speculative_tokens else PromptLookup())
        elif speculative is not None:
            speculator = Speculator(DraftModel(k=speculative_tokens or 4, name=speculative))
        # The one decoding engine under generate, stream, explain and the server.
        self.engine = Engine(ModelRunner(model, compile=compile, draft=draft), tokenizer,
                             prefix_cache_tokens=prefix_cache_tokens, speculator=speculator)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        min_gen_len: int = 0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        bad_words: Optional[Sequence[Union[str, Sequence[int]]]] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        seed: Optional[int] = None,
        n: int = 1,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: Union[bool, str] = False,
        truncate: Optional[str] = None,
        json_schema: Optional[dict] = None,
        grammar: Optional[Union[str, "Grammar"]] = None,
        speculative: bool = True,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generates continuations of a batch of tokenized prompts.

        Args:
            prompt_tokens: one list of token ids per prompt; lengths may differ.
            max_gen_len: most tokens generated per prompt (fewer if the prompt
                plus max_gen_len would exceed max_seq_len).
            temperature: sampling temperature; 0 picks the most likely token (greedy).
            top_p: nucleus sampling: sample among the most likely tokens whose
                probabilities sum to top_p.
            logprobs: also return the log-probability of each returned token.
            echo: return the prompt tokens before the generated ones.
            top_k: sample among the k most likely tokens only (0: all).
            min_p: drop tokens less likely than min_p times the most likely one (0: none).
            min_gen_len: stop tokens are not generated before this many tokens.
            repetition_penalty: > 1 discourages tokens already in the prompt or
                the generation (CTRL / transformers semantics; 1: off).
            presence_penalty, frequency_penalty: in [-2, 2], subtracted from the logits
                of generated tokens once, and once per occurrence (OpenAI semantics; 0: off).
            bad_words: words never generated: token-id lists, or strings (banned as
                tokenized alone and after a space); a single string is one word. A word
                of several tokens is banned only where its other tokens were just generated.
            logit_bias: {token id: bias in [-100, 100]} added to the model's logits before
                every other control (OpenAI's; -100 in effect bans a token, 100 forces it).
            stop: strings that end a generation once the decoded text holds one (a single
                string is one stop string); the token completing it is the last returned
                (`text_completion` and `chat_completion` cut their text before the string).
            seed: seeds a fresh generator for this call only (default: the generator
                seeded in `build`, which carries on from call to call).
            n: continuations per prompt (sampled, or the n best beams), returned
                prompt by prompt: results[i * n + j] is prompt i's j-th. Sampling needs
                len(prompt_tokens) * n <= max_batch_size.
            num_beams: > 1 decodes each prompt by beam search with transformers'
                semantics (`llama.beam_search`): temperature, top_p, top_k and min_p are
                ignored, the penalties, bad words and min_gen_len apply. Needs
                num_beams <= max_batch_size.
            length_penalty, early_stopping: beam search's, as in transformers.
            truncate: a prompt too long for max_seq_len raises ValueError, unless
                truncate is "left" (drop its oldest tokens, keeping BOS) or "right"
                (drop its newest), so that it and max_gen_len tokens fit.
            json_schema: constrained decoding (`llama.grammar`, needs llguidance): each
                continuation is a JSON document valid against this schema (a dict), written
                compactly, and ends where the document does (unless max_gen_len cuts it).
            grammar: likewise, a sentence of this grammar: Lark in llguidance's dialect (a str),
                or a `llama.grammar.Grammar`. Neither works with num_beams > 1 or min_gen_len.
            speculative: False decodes this call without the speculation `Llama.build(speculative=...)`
                set up (greedy tokens are the same either way; grammars and beam search never speculate).

        Returns:
            (tokens, logprobs): per prompt (n per prompt), the generated token ids,
            cut before the first stop token, and their log-probabilities (None unless requested).

        Raises:
            ValueError: an argument is out of its range (an `InvalidArgument` naming it).
        """
        controls = dict(top_k=top_k, min_p=min_p, min_gen_len=min_gen_len, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, bad_words=bad_words,
                        logit_bias=logit_bias)
        if num_beams != 1:
            if json_schema is not None or grammar is not None:
                raise InvalidArgument("num_beams", "beam search cannot follow a grammar or json_schema: sample "
                                                   "(num_beams=1, temperature=0 for greedy) instead")
            self._check_beams(n, num_beams)
            prompt_tokens = self._checked_prompts(prompt_tokens, max_gen_len, truncate, rows_per_prompt=0)
            params = self.sampling_params(temperature, top_p, **controls)
            return self._generate_beams(prompt_tokens, max_gen_len, params, logprobs, echo, _strings("stop", stop),
                                        n, num_beams, length_penalty, early_stopping)
        request = self.request(prompt_tokens, max_gen_len, temperature, top_p, n=n, seed=seed, stop=stop,
                               truncate=truncate, logprobs=logprobs, json_schema=json_schema, grammar=grammar,
                               speculative=speculative, **controls)
        self._run(request)
        prompts = [seq.prompt_tokens for seq in request.sequences]
        prompt_logprobs = self._prompt_logprobs(prompts) if logprobs and echo else None
        out_tokens, out_logprobs = [], []
        for i, seq in enumerate(request.sequences):
            out_tokens.append((seq.prompt_tokens if echo else []) + seq.result)
            if logprobs:
                out_logprobs.append((prompt_logprobs[i] if echo else []) + seq.logprobs[: len(seq.result)])
        return out_tokens, (out_logprobs if logprobs else None)

    def _run(self, request: Request) -> None:
        """Steps the engine until the request is finished."""
        self.engine.add(request)
        try:
            with self._speculation_logged():
                while not request.finished:
                    self.engine.step()
        finally:
            self.engine.abort(request)  # only if a step raised: the engine stays ready for the next call

    @contextlib.contextmanager
    def _speculation_logged(self) -> Iterator[None]:
        """Logs the acceptance rate of the speculative rounds the block ran, if any."""
        counters = self.engine.counters
        before = {key: counters[key] for key in ("draft_tokens", "accepted_tokens", "speculative_steps")}
        yield
        drafted, accepted, rounds = (counters[key] - value for key, value in before.items())
        if drafted and is_main_process():
            logger.info("speculative decoding (%s): %d of %d draft tokens accepted (%.0f%%) in %d rounds",
                        self.engine.speculator.proposer.name, accepted, drafted, 100 * accepted / drafted, rounds)

    def request(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        n: int = 1,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        truncate: Optional[str] = None,
        logprobs: bool = False,
        text: bool = False,
        speculative: bool = True,
        **controls,
    ) -> Request:
        """A validated engine request for `generate`'s arguments (n rows per prompt, prompt by prompt),
        for drivers of `self.engine` (`stream`, `llama.explain`): add it and step the engine.

        text: decode each sequence's text as it grows (`TokenOutput.text`), for streaming.
        speculative: False: never drafted for, even when the engine speculates.
        **controls: the sampling controls of `generate` (top_k, min_p, ..., bad_words).

        Raises:
            ValueError: an argument is out of its range (an `InvalidArgument` naming it).
        """
        if not _is_int(n) or n < 1:
            raise InvalidArgument("n", f"n must be an integer >= 1, got {n!r}")
        prompt_tokens = self._checked_prompts(prompt_tokens, max_gen_len, truncate, rows_per_prompt=n)
        params = self.sampling_params(temperature, top_p, **controls)
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        rows = [prompt for prompt in prompt_tokens for _ in range(n)]  # each prompt n times in a row
        return self.engine.request(rows, params, max_gen_len, generator=generator, stop=_strings("stop", stop),
                                   text=text, logprobs=logprobs, speculative=bool(speculative))

    def sampling_params(self, temperature: float = 0.6, top_p: float = 0.9, **controls) -> SamplingParams:
        """The validated sampling controls for `generate`'s keyword options (bad words read with this tokenizer).

        Raises:
            ValueError: a control is out of its range (an `InvalidArgument` naming it).
        """
        return SamplingParams.from_options(self.tokenizer, self.model.params.vocab_size, temperature, top_p,
                                           **controls)

    def _prompt_logprobs(self, prompt_tokens: List[List[int]]) -> List[List[float]]:
        """Log-probability of every prompt token given those before it (0 for the first), for echo."""
        result = []
        for prompt in prompt_tokens:
            logits = self.engine.runner.prefill([prompt], every_position=True)[0, :-1]  # (L - 1, V); decoding is over
            tokens = torch.tensor(prompt[1:], device=self.device)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
            result.append([0.0] + lp.tolist())
        return result

    def _generate_beams(
        self, prompt_tokens, max_gen_len, params, logprobs, echo, stop, n, num_beams, length_penalty, early_stopping
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """`generate` by beam search: one prompt at a time, its beams as rows of the KV cache."""
        prompt_logprobs = self._prompt_logprobs(prompt_tokens) if logprobs and echo else None
        max_seq_len = self.model.params.max_seq_len
        out_tokens, out_logprobs = [], []
        for i, prompt in enumerate(prompt_tokens):
            found = beam_search_hypotheses(
                self.engine.runner, prompt, max_gen_len, num_beams, length_penalty, early_stopping,
                self.tokenizer.stop_tokens, params=params,
            )
            for hypothesis in found[:n]:
                # Stop strings cut each hypothesis afterwards, with the engine's stop rules.
                criteria = StopCriteria(self.tokenizer, len(prompt), max_gen_len, max_seq_len, stop=stop)
                for token in hypothesis.tokens:
                    if criteria.append(token)[1] is not None:
                        break
                end = criteria.num_tokens
                out_tokens.append((prompt if echo else []) + hypothesis.tokens[:end])
                if logprobs:
                    out_logprobs.append((prompt_logprobs[i] if echo else []) + hypothesis.logprobs[:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def _encode_text(self, index: int, prompt: str) -> List[int]:
        """Token ids of a text prompt, after BOS; index names the prompt in errors."""
        if not isinstance(prompt, str):
            raise InvalidArgument("prompts", f"prompt {index} must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidArgument(
                "prompts",
                f"prompt {index} is empty: pass some text (to start from BOS alone, call generate([[bos_id]], ...))",
            )
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def _truncate(self, prompt: List[int], max_gen_len: int, side: str) -> List[int]:
        """The prompt cut so that it and max_gen_len new tokens fit in max_seq_len (at least one new token)."""
        if side not in ("left", "right"):
            raise InvalidArgument("truncate", f"truncate must be 'left', 'right' or None, got {side!r}")
        room = max(1, self.model.params.max_seq_len - max(max_gen_len, 1))
        if len(prompt) <= room:
            return prompt
        logger.warning("prompt of %d tokens truncated on the %s to %d", len(prompt), side, room)
        if side == "right":
            return prompt[:room]
        keep_bos = prompt[0] == self.tokenizer.bos_id and room > 1
        return ([prompt[0]] if keep_bos else []) + prompt[len(prompt) - room + keep_bos :]

    def _check_beams(self, n, num_beams) -> None:
        max_batch_size = self.model.params.max_batch_size
        if not _is_int(n) or n < 1:
            raise InvalidArgument("n", f"n must be an integer >= 1, got {n!r}")
        if not _is_int(num_beams) or num_beams < 1:
            raise InvalidArgument("num_beams", f"num_beams must be an integer >= 1, got {num_beams!r}")
        if num_beams > max_batch_size:
            raise InvalidArgument(
                "num_beams",
                f"num_beams={num_beams} exceeds max_batch_size={max_batch_size}: each beam is a row of "
                f"the KV cache; pass fewer beams, or build with a larger max_batch_size",
            )
        if n > num_beams:
            raise InvalidArgument(
                "n", f"n={n} exceeds num_beams={num_beams}: beam search returns at most num_beams sequences"
            )

    def _checked_prompts(self, prompt_tokens, max_gen_len, truncate, rows_per_prompt: int) -> List[List[int]]:
        """The prompts, truncated if asked, after checking them and max_gen_len (rows_per_prompt: n, 0 for beams)."""
        params = self.model.params
        if not _is_int(max_gen_len):
            raise InvalidArgument(
                "max_gen_len", f"max_gen_len must be an integer >= 1, got {type(max_gen_len).__name__} {max_gen_len!r}"
            )
        if max_gen_len < 1:
            raise InvalidArgument("max_gen_len", f"max_gen_len must be >= 1, got {max_gen_len}")
        if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, (list, tuple)):
            raise InvalidArgument(
                "prompt_tokens",
                f"prompt_tokens must be a list of token-id lists, got {type(prompt_tokens).__name__}"
                f"{' (text: use text_completion, or tokenizer.encode first)' if isinstance(prompt_tokens, str) else ''}",
            )
        if len(prompt_tokens) == 0:
            raise InvalidArgument("prompt_tokens", "no prompts given: pass at least one")
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)) or not all(_is_int(t) for t in prompt):
                got = type(prompt).__name__ if not isinstance(prompt, (list, tuple)) else "a list holding non-integers"
                raise InvalidArgument(
                    "prompt_tokens",
                    f"prompt {i} must be a list of token ids (ints), got {got}"
                    f"{': encode text with tokenizer.encode, or call text_completion' if isinstance(prompt, str) else ''}",
                )
        if truncate is not None:
            prompt_tokens = [self._truncate(list(prompt), max_gen_len, truncate) for prompt in prompt_tokens]
        rows = len(prompt_tokens) * rows_per_prompt
        if rows > params.max_batch_size:
            n = rows_per_prompt
            raise InvalidArgument(
                "prompt_tokens",
                f"{len(prompt_tokens)} prompts{f' x n={n}' if n > 1 else ''} exceed max_batch_size="
                f"{params.max_batch_size}: pass fewer, or build with a larger max_batch_size",
            )
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise InvalidArgument("prompt_tokens", f"prompt {i} is empty: a prompt needs at least one token")
            if len(prompt) >= params.max_seq_len:
                raise InvalidArgument(
                    "prompt_tokens",
                    f"prompt {i} has {len(prompt)} tokens, but max_seq_len={params.max_seq_len} leaves room for "
                    f"at most {params.max_seq_len - 1} (one position is for the answer): shorten it, pass "
                    f"truncate='left' to keep its end, or build with a larger max_seq_len",
                )
            if min(prompt) < 0 or max(prompt) >= params.vocab_size:
                raise InvalidArgument(
                    "prompt_tokens", f"prompt {i} has token ids outside the vocabulary [0, {params.vocab_size})"
                )
        return [list(prompt) for prompt in prompt_tokens]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        **options,
    ) -> List[CompletionPrediction]:
        """Continues each text prompt.

        Args:
            prompts: the texts to continue.
            temperature, top_p: as in `generate`.
            max_gen_len: most tokens generated; defaults to max_seq_len - 1.
            logprobs: also return each generated token's text and log-probability.
            echo: include the prompt in the returned text.
            **options: `generate`'s keyword-only controls (top_k, min_p, min_gen_len,
                repetition_penalty, presence_penalty, frequency_penalty, bad_words,
                stop, seed, n, num_beams, length_penalty, early_stopping).

        Returns:
            One `CompletionPrediction` per prompt (n per prompt, prompt by prompt):
            {"generation": str}, cut before any stop string, plus "tokens" and
            "logprobs" when logprobs=True.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        _check_list("prompts", prompts, "a list of strings", "text_completion([\"...\"])")
        prompt_tokens = [self._encode_text(i, prompt) for i, prompt in enumerate(prompts)]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo, **options
        )
        n = options.get("n", 1)
        # With echo the text starts with the prompt: stop strings are looked for after it.
        starts = [len(self.tokenizer.decode(p)) if echo else 0 for p in prompt_tokens for _ in range(n)]
        texts = [
            _cut_at_stop(self.tokenizer.decode(t), options.get("stop"), start)
            for t, start in zip(generation_tokens, starts)
        ]
        if logprobs:
            return [
                {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp in zip(texts, generation_tokens, generation_logprobs)
            ]
        return [{"generation": text} for text in texts]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        tools: Optional[Sequence[dict]] = None,
        tool_choice: Union[str, dict] = "auto",
        tool_format: Optional[str] = None,
        parallel_tool_calls: bool = True,
        **options,
    ) -> List[ChatPrediction]:
        """Generates the assistant's next message for each dialog.

        Args:
            dialogs: each a list of {"role", "content"} messages; roles are system, user,
                assistant (with "tool_calls" for the tools it called) and tool (or Meta's
                ipython): a tool's result.
            temperature, top_p: as in `generate`.
            max_gen_len: most tokens generated; defaults to max_seq_len - 1.
            logprobs: also return each generated token's text and log-probability.
            tools: tool definitions, OpenAI's {"type": "function", "function": {"name",
                "description", "parameters"}} (and for Llama 3 the built-ins {"type": "brave_search"},
                "wolfram_alpha", "code_interpreter"), written into the prompt as the chat format
                does (`llama.tools`); each reply is then read for calls.
            tool_choice: "auto" (the model decides), "none" (no tools shown), "required" or
                {"type": "function", "function": {"name": ...}}: the last two force a valid call by
                constrained decoding (`llama.tools.forced_call_grammar`, needs llguidance).
            tool_format: Llama 3: "llama3.1" (the default, JSON calls) or "llama3.2" (pythonic calls);
                ChatML: "hermes" (<tool_call> blocks).
            parallel_tool_calls: False keeps at most one call per reply (the first), and a forced
                Hermes reply holds one call.
            **options: `generate`'s keyword-only controls, as in `text_completion` (with tools,
                not num_beams).

        Returns:
            One `ChatPrediction` per dialog (n per dialog, dialog by dialog): {"generation": {"role": "assistant",
            "content": str}} plus "tokens" and "logprobs" when logprobs=True.
            A dialog the chat format refuses (Llama 2: text holding its [INST] or
            <<SYS>> tags) is not generated: its content is the format's error
            message, with no tokens; the other dialogs are generated as usual.
            With tools, the generation also holds "tool_calls" (OpenAI's: id, type, function name
            and arguments as a JSON string; content "" for a reply that only calls), and
            "stop_reason" says how the reply ended: "eom" (Llama 3: it waits for the tools'
            results), "eot", "stop" (a stop string) or "length".
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        _check_list("dialogs", dialogs, "a list of dialogs (each a list of messages)", "chat_completion([dialog])")
        if isinstance(dialogs[0], dict):
            raise InvalidArgument("dialogs", "dialogs must be a list of dialogs, got one dialog (a list of messages): "
                                             "pass [dialog]")
        if tools is not None:
            return self._chat_with_tools(dialogs, temperature, top_p, max_gen_len, logprobs, tools, tool_choice,
                                         tool_format, parallel_tool_calls, options)
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        refuse = getattr(self.formatter, "refusal", None)  # only formats with forgeable tags have one
        refusals = [refuse(dialog) if refuse else None for dialog in dialogs]
        accepted = [tokens for tokens, refusal in zip(prompt_tokens, refusals) if refusal is None]
        generation_tokens, generation_logprobs = [], None
        if accepted:
            generation_tokens, generation_logprobs = self.generate(
                accepted, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, **options
            )
        generated = iter(zip(generation_tokens, generation_logprobs or [None] * len(generation_tokens)))

        predictions: List[ChatPrediction] = []
        for refusal in (r for r in refusals for _ in range(options.get("n", 1))):
            if refusal is not None:  # not generated: the refusal is the whole answer
                tokens, token_logprobs, content = [], [], refusal
            else:
                tokens, token_logprobs = next(generated)
                content = _cut_at_stop(self.tokenizer.decode(tokens), options.get("stop"))
            prediction: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                prediction["tokens"] = [self.tokenizer.decode([x]) for x in tokens]
                prediction["logprobs"] = token_logprobs
            predictions.append(prediction)
        return predictions

    def _chat_with_tools(self, dialogs, temperature, top_p, max_gen_len, logprobs, tools, tool_choice, tool_format,
                         parallel_tool_calls, options) -> List[ChatPrediction]:
        """`chat_completion` with tools: replies read for calls, with their stop reasons."""
        if options.get("num_beams", 1) != 1:
            raise InvalidArgument("num_beams", "tool calls are sampled: num_beams is not supported with tools")
        tool_format, shown, options = self._tool_options(tools, tool_choice, tool_format, parallel_tool_calls, options)
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog, tools, tool_choice, tool_format)
                         for dialog in dialogs]
        request = self.request(prompt_tokens, max_gen_len, temperature, top_p, logprobs=logprobs, **options)
        self._run(request)
        predictions: List[ChatPrediction] = []
        for seq in request.sequences:
            message = parse_reply(_cut_at_stop(self.tokenizer.decode(seq.result), options.get("stop")), shown,
                                  tool_format)
            if not parallel_tool_calls:
                message["tool_calls"] = message["tool_calls"][:1]
            prediction: ChatPrediction = {"generation": message, "stop_reason": self._stop_reason(seq)}
            if logprobs:
                prediction["tokens"] = [self.tokenizer.decode([x]) for x in seq.result]
                prediction["logprobs"] = seq.logprobs[: len(seq.result)]
            predictions.append(prediction)
        return predictions

    def tool_setup(self, tools: Sequence[dict], tool_choice: Union[str, dict] = "auto",
                   tool_format: Optional[str] = None,
                   parallel_tool_calls: bool = True) -> Tuple[str, List[dict], Optional["Grammar"]]:
        """What a chat with tools needs beside its prompt, for drivers of `self.engine` (the server):
        (the tool format, the tools shown to the model (`llama.tools.normalize_tools`), the grammar
        that forces the call tool_choice demands, or None).

        Raises:
            ValueError: malformed tools or tool_choice, a tool format the chat format lacks, or
                parameters that constrained decoding cannot enforce (an `InvalidArgument` naming "tools").
        """
        tool_format = choose_tool_format(tool_format, self.formatter.tool_formats)
        shown, _ = apply_tool_choice(normalize_tools(tools, tool_format), tool_choice)
        forced = forced_call_grammar(shown, tool_choice, tool_format, parallel_tool_calls)
        if forced is None:
            return tool_format, shown, None
        from llama.grammar import Grammar  # an optional feature, imported on use

        try:
            return tool_format, shown, Grammar.lark(forced, self.tokenizer)
        except ValueError as e:
            raise InvalidArgument("tools", f"tool_choice={tool_choice!r} forces a call by constrained decoding, which "
                                           f"cannot enforce these tools' parameters: {e}") from None

    def _tool_options(self, tools, tool_choice, tool_format, parallel_tool_calls,
                      options) -> Tuple[str, List[dict], dict]:
        """`tool_setup`, with the forced call's grammar put into the generation options."""
        tool_format, shown, grammar = self.tool_setup(tools, tool_choice, tool_format, parallel_tool_calls)
        if grammar is None:
            return tool_format, shown, options
        if options.get("json_schema") is not None or options.get("grammar") is not None:
            raise InvalidArgument("tool_choice", f"tool_choice={tool_choice!r} forces a tool call: it cannot be "
                                                 f"combined with json_schema or grammar")
        return tool_format, shown, {**options, "grammar": grammar}

    def _stop_reason(self, seq) -> str:
        """How a sequence ended: its stop token's reason in the chat format ("eom", "eot"), "stop" or "length"."""
        if seq.stop.cause == "stop token":
            return self.formatter.stop_reason(seq.tokens[seq.stop.num_tokens])
        return "stop" if seq.stop.cause == "stop string" else "length"

    @torch.inference_mode()
    def stream(
        self,
        prompt: Union[str, Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        tools: Optional[Sequence[dict]] = None,
        tool_choice: Union[str, dict] = "auto",
        tool_format: Optional[str] = None,
        parallel_tool_calls: bool = True,
        **options,
    ) -> Iterator[Union[str, "ToolCall"]]:
        """Generates one completion (prompt: a string) or one assistant reply
        (prompt: a dialog), yielding its text piece by piece as tokens are decided.

        Joined, the pieces are what `text_completion` / `chat_completion` return
        for the same arguments and seed (for a batch of one: in a batch, the rows of
        one call share the random draws). A character whose bytes span several
        tokens is yielded once whole; a stop string ends the stream before it,
        even when it spans tokens. Closing the iterator early (or an exception
        in the caller's loop) leaves the generator ready for the next call.

        With tools (a dialog only), the pieces are the reply's content, and its tool calls
        come last, each a `llama.tools.ToolCall` dict: as `chat_completion` reads them.
        Text that may be a call is held back until it is known not to be (`llama.tools.ToolCallStream`).

        Args:
            prompt: the text to continue, or a dialog to answer.
            temperature, top_p, max_gen_len: as in `text_completion`.
            tools, tool_choice, tool_format, parallel_tool_calls: as in `chat_completion`.
            **options: `generate`'s keyword-only controls for one sequence (not n or num_beams).

        Yields:
            Pieces of text, each non-empty, then with tools the calls (dicts).
        """
        if "n" in options or "num_beams" in options:
            raise InvalidArgument("n", "stream generates one sequence: n and num_beams are not supported")
        calls = None  # with tools: reads the calls out of the reply
        if isinstance(prompt, str):
            if tools is not None:
                raise InvalidArgument("tools", "tools need a dialog to answer (a list of messages), not a text prompt")
            prompt_tokens = self._encode_text(0, prompt)
        elif tools is not None:
            tool_format, shown, options = self._tool_options(tools, tool_choice, tool_format, parallel_tool_calls,
                                                             options)
            prompt_tokens = self.formatter.encode_dialog_prompt(prompt, tools, tool_choice, tool_format)
            calls = ToolCallStream(shown, tool_format)
        else:
            refuse = getattr(self.formatter, "refusal", None)
            refusal = refuse(prompt) if refuse else None
            if refusal is not None:
                yield refusal
                return
            prompt_tokens = self.formatter.encode_dialog_prompt(prompt)
        max_gen_len = self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len
        request = self.request([prompt_tokens], max_gen_len, temperature, top_p, text=True, **options)
        self.engine.add(request)
        try:
            with self._speculation_logged():
                while not request.finished:
                    for output in self.engine.step():
                        piece = calls.push(output.text) if calls is not None else output.text
                        if piece:
                            yield piece
        finally:
            self.engine.abort(request)  # closed early: its row is freed (nothing to do once finished)
        if calls is not None:
            rest, tool_calls = calls.finish()
            if rest:
                yield rest
            yield from tool_calls if parallel_tool_calls else tool_calls[:1]


def _load_transformer(ckpt_dir: Path, shards: List[Path], params: dict, tokenizer: Tokenizer, tokenizer_path,
                      max_seq_len: int, max_batch_size: int, device: torch.device,
                      dtype: torch.dtype) -> Tuple[Transformer, Optional[dict]]:
    """(this rank's shard of the checkpoint, loaded with a KV cache of max_batch_size rows of
    max_seq_len positions; its quantization, None for float weights, which are fused)."""
    quantization = params.pop("quantization", None)  # written by `python -m llama.quantize`
    args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    if args.vocab_size <= 0:  # Llama 2's params.json leaves the vocabulary to the tokenizer
        args.vocab_size = tokenizer.n_words
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"{ckpt_dir / 'params.json'} says vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} "
            f"has {tokenizer.n_words} tokens: use the tokenizer that ships with this checkpoint"
        )
    trained = args.max_position_embeddings
    if trained is not None and max_seq_len > trained and is_main_process():
        logger.warning(
            "max_seq_len=%d exceeds the %d positions %s was trained for: text past position %d is likely "
            "to degrade, and the KV cache is sized for all %d", max_seq_len, trained, ckpt_dir.name, trained,
            max_seq_len,
        )
    transform = None  # a quantized checkpoint loads into quantized modules
    if quantization is not None:
        from llama.quantize import read_quantization, skeleton_transform

        transform = skeleton_transform(read_quantization({"quantization": quantization}))
    model = load_model(shards[fs_init.get_model_parallel_rank()], args, device, dtype, transform)
    model.fuse_projections()  # one matmul for wq, wk, wv and one for w1, w3 in each layer
    return model, quantization


def _strings(name: str, value: Optional[Union[str, Sequence[str]]]) -> List[str]:
    """A list of strings from a string (one item, OpenAI's convention) or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(name, f"{name} must be a string or a list of strings, got {value!r}")
    return list(value)


def _check_list(name: str, value, what: str, example: str) -> None:
    """Raises InvalidArgument unless value is a non-empty list or tuple (a str is not a list of prompts)."""
    if not isinstance(value, (list, tuple)):
        hint = f": wrap it in a list, {example}" if isinstance(value, str) else ""
        raise InvalidArgument(name, f"{name} must be {what}, got {type(value).__name__}{hint}")
    if len(value) == 0:
        raise InvalidArgument(name, f"no {name} given: pass at least one")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _cut_at_stop(text: str, stop: Optional[Union[str, Sequence[str]]], start: int = 0) -> str:
    """text before the first stop string found at or after `start` (all of it if none is)."""
    found = [i for i in (text.find(s, start) for s in _strings("stop", stop)) if i >= 0]
    return text[: min(found)] if found else text
