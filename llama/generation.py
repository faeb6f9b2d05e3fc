"""`Llama`: build a model from a checkpoint and generate text with it.

The API follows Meta's reference (`meta-llama/llama3`): `Llama.build` ->
`generate` on token ids -> `text_completion` / `chat_completion` on strings.
"""

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch

from llama.beam_search import beam_search_hypotheses
from llama.chat_format import Dialog, Message, make_chat_format
from llama.checkpoint import find_shards, load_model, read_params
from llama.distributed import choose_device, choose_dtype, is_main_process, setup_model_parallel
from llama.model import ModelArgs, Transformer
from llama.parallel import make_compilable
from llama.processors import SamplingParams, next_token, pad_prompts, sample_top_p  # noqa: F401 (re-exported)
from llama.streaming import TextStream
from llama.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


# Inductor settings of the compiled decode step on CPU. Freezing makes the weights constants of
# the graph, so max-autotune can use inductor's own C++ GEMM kernels, which repack each weight
# once for the matrix-vector products of decoding; where they lose, it keeps ATen's (MKL's).
# MKL's fp32 matrix-vector path streams about half the memory bandwidth on the AMD CPUs we
# measured (benchmarks/README.md, "Kernels"; `python -m benchmarks.linear_kernels`).
# The tuning is not printed (inductor writes every candidate's timing to stderr by default).
CPU_INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


def compile_decode_step(step: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """`step` compiled once per batch size: its shapes are static (one token per row, the whole
    cache read). On GPUs it is replayed as a CUDA graph. On CPU the weights are frozen into the
    compiled code: changing them afterwards is not seen, and the repacked copies the GEMM kernels
    read take about as much memory again as the weights."""
    if device.type == "cuda":
        return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    import torch._inductor.config as inductor_config  # imported on use: loading it takes a second

    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def frozen_step(*args, **kwargs) -> torch.Tensor:
        # torch.compile(options=...) does not reach freezing; patch inductor's config for
        # this call only (compilation happens inside it) instead of changing it for everyone.
        with inductor_config.patch(CPU_INDUCTOR_OPTIONS):
            return compiled(*args, **kwargs)

    return frozen_step


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
    ) -> "Llama":
        """Loads a Meta-format checkpoint and its tokenizer.

        Runs in a plain `python` process (a single-rank process group is
        created in memory) and under `torchrun`, one rank per checkpoint shard.

        Args:
            ckpt_dir: directory with `params.json` and `consolidated.NN.pth` shards.
            tokenizer_path: the tokenizer file (`tokenizer.model`); its kind
                (Llama 3 tiktoken, a converted model's BPE, SentencePiece) and the
                chat format are read from the file and the config beside it.
            max_seq_len: longest prompt + generation, in tokens (sizes the KV cache).
            max_batch_size: most sequences generated at once (sizes the KV cache).
            model_parallel_size: ranks the model is split over; defaults to
                the number of processes launched, and must equal the number of shards.
            seed: seed of the sampling generator; every rank must use the same.
            device: defaults to this rank's GPU if CUDA is available, else the CPU.
            dtype: defaults to bf16 on GPUs (fp16 where bf16 is unsupported), fp32 on CPU.
            compile: compile the decode step with `torch.compile` (CUDA graphs on
                GPUs; frozen weights and inductor's GEMM kernels on CPU, see
                `compile_decode_step`). The first generation of each batch size pays
                the compilation (minutes on CPU for SmolLM2, tuning each GEMM).
            quantize: "int8", "int4" or "llm.int8" quantizes the weights after
                loading (see `llama.quantize`); a checkpoint written by
                `python -m llama.quantize` is loaded quantized without this.

        Returns:
            A ready `Llama`. No global torch default (dtype, device) is changed.

        Raises:
            FileNotFoundError: the directory, params.json, a shard or the tokenizer is missing.
            ValueError: the shard count, vocabulary size, keys or shapes do not match.
        """
        start_time = time.perf_counter()
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be >= 1")
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

        quantization = params.pop("quantization", None)  # written by `python -m llama.quantize`
        args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
        if args.vocab_size <= 0:  # Llama 2's params.json leaves the vocabulary to the tokenizer
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"params.json says vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: use the tokenizer that ships with this checkpoint"
            )

        shard = shards[fs_init.get_model_parallel_rank()]
        if quantization is None:
            model = load_model(shard, args, device, dtype)
        else:
            from llama.quantize import load_quantized_model, read_quantization

            model = load_quantized_model(shard, args, device, dtype, read_quantization({"quantization": quantization}))
        if quantize is not None:
            if quantization is not None:
                raise ValueError(f"{ckpt_dir} is already quantized ({quantization['mode']}): build it without quantize=")
            from llama.quantize import quantize_model  # optional feature, imported on use

            quantize_model(model, quantize)
        if is_main_process():
            logger.info("Loaded in %.2f seconds", time.perf_counter() - start_time)
        return Llama(model, tokenizer, seed=seed, compile=compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = make_chat_format(tokenizer)
        self.device = model.output.weight.device
        # Sampling draws from this generator only, never from torch's global one,
        # so every rank draws the same tokens and callers' RNG state is untouched.
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.compiled = compile
        if compile:
            make_compilable(model)  # fairscale's layers -> traceable twins with the same weights
            self._decode_one = compile_decode_step(self._decode_one, self.device)

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
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        n: int = 1,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: Union[bool, str] = False,
        truncate: Optional[str] = None,
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
                tokenized alone and after a space). A word of several tokens is banned
                only where its other tokens were just generated.
            stop: strings that end a generation once the decoded text holds one; the
                token completing it is the last returned (`text_completion` and
                `chat_completion` cut their text before the string).
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

        Returns:
            (tokens, logprobs): per prompt (n per prompt), the generated token ids,
            cut before the first stop token, and their log-probabilities (None unless requested).

        Raises:
            ValueError: an argument is out of its range (the message names it).
        """
        if truncate is not None:
            prompt_tokens = [self._truncate(prompt, max_gen_len, truncate) for prompt in prompt_tokens]
        self._check_generate_args(prompt_tokens, max_gen_len, n, num_beams)
        params = self._sampling_params(
            temperature, top_p, top_k=top_k, min_p=min_p, min_gen_len=min_gen_len,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, bad_words=bad_words,
        )
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        if num_beams > 1:
            return self._generate_beams(
                prompt_tokens, max_gen_len, params, logprobs, echo, stop, n, num_beams, length_penalty, early_stopping
            )
        prompt_tokens = [prompt for prompt in prompt_tokens for _ in range(n)]  # each prompt n times in a row
        max_seq_len = self.model.params.max_seq_len
        # Each row may generate until max_gen_len tokens or the end of the context.
        limits = [min(max_gen_len, max_seq_len - len(p)) for p in prompt_tokens]
        limit = torch.tensor(limits, device=self.device)
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=self.device)
        stopped = torch.zeros(len(prompt_tokens), dtype=torch.bool, device=self.device)
        texts = [TextStream(self.tokenizer, stop) for _ in prompt_tokens] if stop else []  # per row, for stop strings

        new_tokens, new_logprobs = [], []  # one (B,) tensor per step, kept on the device
        steps = self._decode_steps(prompt_tokens, max(limits), params, logprobs, generator)
        for step, (tokens, token_logprobs) in enumerate(steps):
            new_tokens.append(tokens)
            new_logprobs.append(token_logprobs)
            # Stop check: a row stops at a stop token or at its length limit,
            stopped |= torch.isin(tokens, stop_tokens) | (step + 1 >= limit)
            if stop:  # or once its text holds a stop string (the tokens go to the host each step)
                for text, token in zip(texts, tokens.tolist()):
                    text.push(token)
                stopped |= torch.tensor([text.stopped for text in texts], device=self.device)
            if stopped.all():  # the one host-device sync of a step
                break

        generated = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
        generated_logprobs = torch.stack(new_logprobs, dim=1).tolist() if logprobs else None
        prompt_logprobs = self._prompt_logprobs(prompt_tokens) if logprobs and echo else None

        out_tokens, out_logprobs = [], []
        stop_set = set(self.tokenizer.stop_tokens)
        for row, prompt in enumerate(prompt_tokens):
            row_tokens = generated[row][: limits[row]]
            end = next((i for i, t in enumerate(row_tokens) if t in stop_set), len(row_tokens))
            if stop and texts[row].stopped:  # the token completing the stop string is the last one kept
                end = min(end, len(texts[row].tokens))
            out_tokens.append((prompt if echo else []) + row_tokens[:end])
            if logprobs:
                out_logprobs.append((prompt_logprobs[row] if echo else []) + generated_logprobs[row][:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def _decode_steps(
        self,
        prompt_tokens: List[List[int]],
        max_steps: int,
        params: SamplingParams,
        logprobs: bool,
        generator: torch.Generator,
    ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The decoding loop. Yields, for each new position, every row's next
        token (B,) and, if asked, its log-probability (B,); stop by closing the iterator.

        Phase 1, prefill: every prompt in one forward pass, right-padded, each
        row reading its own last prompt position. Phase 2, decode steps: feed
        each row's newest token at its own position, one position per step.
        """
        bsz = len(prompt_tokens)
        lengths = [len(p) for p in prompt_tokens]
        same_length = min(lengths) == max(lengths)  # then every row shares its positions (simplest path)
        prompt_lens = torch.tensor(lengths, device=self.device)

        # Phase 1: prefill.
        padded = torch.zeros(bsz, max(lengths), dtype=torch.long, device=self.device)  # (B, L), 0 = filler
        for row, prompt in enumerate(prompt_tokens):
            padded[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        start = 0 if same_length else torch.zeros(bsz, dtype=torch.long, device=self.device)
        hidden = self.model.forward_hidden(padded, start, kv_len=max(lengths))  # (B, L, D)
        last_hidden = hidden[torch.arange(bsz, device=self.device), prompt_lens - 1]  # (B, D)
        logits = self.model.output(last_hidden).float()  # (B, V)
        prompts = pad_prompts(prompt_tokens, self.device)  # (B, L) left-padded with -1: the processors' context
        generated = torch.empty(bsz, 0, dtype=torch.long, device=self.device)  # (B, step)

        for step in range(max_steps):
            tokens = next_token(logits, generated, params, generator, prompt=prompts)  # (B,)
            token_logprobs = None
            if logprobs:  # of the unscaled distribution, as in the reference
                token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
            yield tokens, token_logprobs
            if step + 1 == max_steps:
                return
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            # Phase 2: one decode step. Rows past their limit write at the last slot of their own cache row.
            max_seq_len = self.model.params.max_seq_len
            kv_len = min(max(lengths) + step + 1, max_seq_len)
            if same_length and not self.compiled:
                logits = self.model(tokens[:, None], kv_len - 1)[:, -1]
            else:
                positions = torch.clamp(prompt_lens + step, max=max_seq_len - 1)  # (B,)
                # Compiled: read the whole cache (masked), a static shape whatever the step.
                logits = self._decode_one(tokens[:, None], positions, max_seq_len if self.compiled else kv_len)

    def _decode_one(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits (B, V) of one new token per row (B, 1) at each row's position (B,)."""
        return self.model(tokens, positions, kv_len=kv_len)[:, -1]

    def _prompt_logprobs(self, prompt_tokens: List[List[int]]) -> List[List[float]]:
        """Log-probability of every prompt token given those before it (0 for the first), for echo."""
        result = []
        for prompt in prompt_tokens:
            tokens = torch.tensor([prompt], device=self.device)
            logits = self.model(tokens, 0)[0, :-1]  # (L - 1, V); reuses cache row 0, decoding is over
            lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[0, 1:, None])[:, 0]
            result.append([0.0] + lp.tolist())
        return result

    def _generate_beams(
        self, prompt_tokens, max_gen_len, params, logprobs, echo, stop, n, num_beams, length_penalty, early_stopping
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """`generate` by beam search: one prompt at a time, its beams as rows of the KV cache."""
        prompt_logprobs = self._prompt_logprobs(prompt_tokens) if logprobs and echo else None
        out_tokens, out_logprobs = [], []
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) >= self.model.params.max_seq_len:  # no room: nothing generated, as when sampling
                hypotheses = [([], [])] * n
            else:
                found = beam_search_hypotheses(
                    self.model, prompt, max_gen_len, num_beams, length_penalty, early_stopping,
                    self.tokenizer.stop_tokens, params=params,
                )
                hypotheses = [(h.tokens, h.logprobs) for h in found[:n]]
            for tokens, token_logprobs in hypotheses:
                end = _tokens_until_stop(self.tokenizer, tokens, stop) if stop else None  # cut afterwards
                out_tokens.append((prompt if echo else []) + tokens[:end])
                out_logprobs.append((prompt_logprobs[i] if echo else []) + token_logprobs[:end])
        return out_tokens, (out_logprobs if logprobs else None)

    def _sampling_params(
        self, temperature, top_p, *, top_k=0, min_p=0.0, min_gen_len=0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, bad_words=None,
    ) -> SamplingParams:
        """The validated controls. A bad word given as text is banned as tokenized alone and after a space."""
        words = []
        for word in bad_words or []:
            if isinstance(word, str):
                words.append(self.tokenizer.encode(word, bos=False, eos=False))
                words.append(self.tokenizer.encode(" " + word, bos=False, eos=False))
            else:
                words.append(list(word))
        vocab_size = self.model.params.vocab_size
        for word in words:
            if any(not 0 <= t < vocab_size for t in word):
                raise ValueError(f"bad_words: {word} holds token ids outside the vocabulary [0, {vocab_size})")
        return SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, min_gen_len=min_gen_len,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, bad_words=list(dict.fromkeys(map(tuple, words))),
            stop_tokens=self.tokenizer.stop_tokens,
        )

    def _encode_text(self, index: int, prompt: str) -> List[int]:
        """Token ids of a text prompt, after BOS; index names the prompt in errors."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {index} must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(
                f"prompt {index} is empty: pass some text (to start from BOS alone, call generate([[bos_id]], ...))"
            )
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def _truncate(self, prompt: List[int], max_gen_len: int, side: str) -> List[int]:
        """The prompt cut so that it and max_gen_len new tokens fit in max_seq_len (at least one new token)."""
        if side not in ("left", "right"):
            raise ValueError(f"truncate must be 'left', 'right' or None, got {side!r}")
        room = max(1, self.model.params.max_seq_len - max(max_gen_len, 1))
        if len(prompt) <= room:
            return prompt
        logger.warning("prompt of %d tokens truncated on the %s to %d", len(prompt), side, room)
        if side == "right":
            return prompt[:room]
        keep_bos = prompt[0] == self.tokenizer.bos_id and room > 1
        return ([prompt[0]] if keep_bos else []) + prompt[len(prompt) - room + keep_bos :]

    def _check_generate_args(self, prompt_tokens, max_gen_len, n, num_beams):
        params = self.model.params
        if len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass at least one")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
        if num_beams > params.max_batch_size:
            raise ValueError(
                f"num_beams={num_beams} exceeds max_batch_size={params.max_batch_size}: each beam is a row of "
                f"the KV cache; pass fewer beams, or build with a larger max_batch_size"
            )
        if num_beams > 1 and n > num_beams:
            raise ValueError(f"n={n} exceeds num_beams={num_beams}: beam search returns at most num_beams sequences")
        rows = len(prompt_tokens) * n if num_beams == 1 else 0
        if rows > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts{f' x n={n}' if n > 1 else ''} exceed max_batch_size="
                f"{params.max_batch_size}: pass fewer, or build with a larger max_batch_size"
            )
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(prompt) >= params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, but max_seq_len={params.max_seq_len} leaves room for "
                    f"at most {params.max_seq_len - 1} (one position is for the answer): shorten it, pass "
                    f"truncate='left' to keep its end, or build with a larger max_seq_len"
                )
            if min(prompt) < 0 or max(prompt) >= params.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {params.vocab_size})")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")

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
        **options,
    ) -> List[ChatPrediction]:
        """Generates the assistant's next message for each dialog.

        Args:
            dialogs: each a list of {"role", "content"} messages; roles are
                system, user, assistant and ipython (tool results).
            temperature, top_p: as in `generate`.
            max_gen_len: most tokens generated; defaults to max_seq_len - 1.
            logprobs: also return each generated token's text and log-probability.
            **options: `generate`'s keyword-only controls, as in `text_completion`.

        Returns:
            One `ChatPrediction` per dialog (n per dialog, dialog by dialog): {"generation": {"role": "assistant",
            "content": str}} plus "tokens" and "logprobs" when logprobs=True.
            A dialog the chat format refuses (Llama 2: text holding its [INST] or
            <<SYS>> tags) is not generated: its content is the format's error
            message, with no tokens; the other dialogs are generated as usual.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
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


    @torch.inference_mode()
    def stream(
        self,
        prompt: Union[str, Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        **options,
    ) -> Iterator[str]:
        """Generates one completion (prompt: a string) or one assistant reply
        (prompt: a dialog), yielding its text piece by piece as tokens are decided.

        Joined, the pieces are what `text_completion` / `chat_completion` return
        for the same arguments and seed. A character whose bytes span several
        tokens is yielded once whole; a stop string ends the stream before it,
        even when it spans tokens. Closing the iterator early (or an exception
        in the caller's loop) leaves the generator ready for the next call.

        Args:
            prompt: the text to continue, or a dialog to answer.
            temperature, top_p, max_gen_len: as in `text_completion`.
            **options: `generate`'s keyword-only controls for one sequence (not n or num_beams).

        Yields:
            Pieces of text, each non-empty.
        """
        if "n" in options or "num_beams" in options:
            raise ValueError("stream generates one sequence: n and num_beams are not supported")
        stop, seed, truncate = options.pop("stop", None) or (), options.pop("seed", None), options.pop("truncate", None)
        if isinstance(prompt, str):
            prompt_tokens = self._encode_text(0, prompt)
        else:
            refuse = getattr(self.formatter, "refusal", None)
            refusal = refuse(prompt) if refuse else None
            if refusal is not None:
                yield refusal
                return
            prompt_tokens = self.formatter.encode_dialog_prompt(prompt)
        max_seq_len = self.model.params.max_seq_len
        max_gen_len = max_seq_len - 1 if max_gen_len is None else max_gen_len
        if truncate is not None:
            prompt_tokens = self._truncate(prompt_tokens, max_gen_len, truncate)
        self._check_generate_args([prompt_tokens], max_gen_len, 1, 1)
        params = self._sampling_params(temperature, top_p, **options)
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)

        text = TextStream(self.tokenizer, stop)
        limit = min(max_gen_len, max_seq_len - len(prompt_tokens))
        with contextlib.closing(self._decode_steps([prompt_tokens], limit, params, False, generator)) as steps:
            for tokens, _ in steps:
                token = int(tokens[0])  # a host-device sync per token: the text needs it
                if token in self.tokenizer.stop_tokens:
                    break
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    return
        rest = text.flush()
        if rest:
            yield rest


def _tokens_until_stop(tokenizer, tokens: List[int], stop: Sequence[str]) -> int:
    """How many of `tokens` it takes for their text to hold a stop string (all of them if it never does)."""
    text = TextStream(tokenizer, stop)
    for token in tokens:
        text.push(token)
        if text.stopped:
            break
    return len(text.tokens)


def _cut_at_stop(text: str, stop: Optional[Sequence[str]], start: int = 0) -> str:
    """text before the first stop string found at or after `start` (all of it if none is)."""
    found = [i for i in (text.find(s, start) for s in stop or []) if i >= 0]
    return text[: min(found)] if found else text
