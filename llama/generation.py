"""`Llama`: build a model from a checkpoint and generate text with it.

The API follows Meta's reference (`meta-llama/llama3`): `Llama.build` ->
`generate` on token ids -> `text_completion` / `chat_completion` on strings.
"""

import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple, TypedDict, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F

from llama.chat_format import Dialog, Message, make_chat_format
from llama.checkpoint import find_shards, load_model, read_params
from llama.distributed import choose_device, choose_dtype, is_main_process, setup_model_parallel
from llama.model import ModelArgs, Transformer
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

        args = ModelArgs.from_params({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
        if args.vocab_size <= 0:  # Llama 2's params.json leaves the vocabulary to the tokenizer
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"params.json says vocab_size={args.vocab_size} but the tokenizer {tokenizer_path} has "
                f"{tokenizer.n_words} tokens: use the tokenizer that ships with this checkpoint"
            )

        shard = shards[fs_init.get_model_parallel_rank()]
        model = load_model(shard, args, device, dtype)
        if is_main_process():
            logger.info("Loaded in %.2f seconds", time.perf_counter() - start_time)
        return Llama(model, tokenizer, seed=seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = make_chat_format(tokenizer)
        self.device = model.output.weight.device
        # Sampling draws from this generator only, never from torch's global one,
        # so every rank draws the same tokens and callers' RNG state is untouched.
        self.generator = torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generates continuations of a batch of tokenized prompts.

        Args:
            prompt_tokens: one list of token ids per prompt; lengths may differ.
            max_gen_len: most tokens generated per prompt.
            temperature: sampling temperature; 0 picks the most likely token (greedy).
            top_p: nucleus sampling: sample among the most likely tokens whose
                probabilities sum to top_p.
            logprobs: also return the log-probability of each returned token.
            echo: return the prompt tokens before the generated ones.

        Returns:
            (tokens, logprobs): per prompt, the generated token ids, cut before
            the first stop token, and their log-probabilities (None unless requested).
        """
        params = self.model.params
        self._check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        # One row per prompt: its prompt, then room for generated tokens.
        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)  # (B, total_len)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        positions = torch.arange(total_len, device=self.device)
        is_prompt = positions[None, :] < torch.tensor(prompt_lens, device=self.device)[:, None]  # (B, total_len)
        token_logprobs = torch.zeros(bsz, total_len, device=self.device) if logprobs else None
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=self.device)
        stopped = torch.zeros(bsz, dtype=torch.bool, device=self.device)

        if min_prompt_len == total_len:  # nothing to generate: only score the prompts
            logits = self.model.forward(tokens, 0)
            if logprobs:
                token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
                )

        # The loop, one position at a time. The first step is the prefill: it
        # runs every position up to the shortest prompt in one forward pass.
        # Later steps feed one token each; a row still inside its (longer)
        # prompt keeps its prompt token instead of the sampled one.
        prev_pos = 0
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # (B, cur_pos - prev_pos, V)
            next_token = self._sample(logits[:, -1], temperature, top_p)  # (B,)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                # Log-probability of each token fed in this step's window, given what precedes it.
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            # Stop check: a row stops at its first generated stop token.
            stopped |= ~is_prompt[:, cur_pos] & torch.isin(next_token, stop_tokens)
            prev_pos = cur_pos
            if stopped.all():  # the only host-device sync of the step
                break

        return self._collect(tokens, token_logprobs, prompt_lens, max_gen_len, echo)

    def _sample(self, last_logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """Next token of each row from the logits of its last position: (B, V) -> (B,)."""
        if temperature > 0:
            probs = torch.softmax(last_logits / temperature, dim=-1)
            return sample_top_p(probs, top_p, generator=self.generator).reshape(-1)
        return torch.argmax(last_logits, dim=-1)

    def _collect(self, tokens, token_logprobs, prompt_lens, max_gen_len, echo):
        """Per row: the returned tokens (prompt if echo, then generated) cut at the first generated stop token."""
        stop_tokens = set(self.tokenizer.stop_tokens)
        all_logprobs = token_logprobs.tolist() if token_logprobs is not None else None
        out_tokens, out_logprobs = [], []
        for row, row_tokens in enumerate(tokens.tolist()):
            prompt_len = prompt_lens[row]
            end = prompt_len + max_gen_len
            for pos in range(prompt_len, min(end, len(row_tokens))):
                if row_tokens[pos] in stop_tokens:
                    end = pos
                    break
            start = 0 if echo else prompt_len
            out_tokens.append(row_tokens[start:end])
            if all_logprobs is not None:
                out_logprobs.append(all_logprobs[row][start:end])
        return out_tokens, (out_logprobs if all_logprobs is not None else None)

    def _check_generate_args(self, prompt_tokens, max_gen_len, temperature, top_p):
        params = self.model.params
        if len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass at least one")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}: "
                f"pass fewer, or build with a larger max_batch_size"
            )
        for i, prompt in enumerate(prompt_tokens):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            if len(prompt) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, more than max_seq_len={params.max_seq_len}: "
                    f"shorten it or build with a larger max_seq_len"
                )
            if min(prompt) < 0 or max(prompt) >= params.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {params.vocab_size})")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Continues each text prompt.

        Args:
            prompts: the texts to continue.
            temperature, top_p: as in `generate`.
            max_gen_len: most tokens generated; defaults to max_seq_len - 1.
            logprobs: also return each generated token's text and log-probability.
            echo: include the prompt in the returned text.

        Returns:
            One `CompletionPrediction` per prompt: {"generation": str} plus
            "tokens" and "logprobs" when logprobs=True.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo
        )
        if logprobs:
            return [
                {
                    "generation": self.tokenizer.decode(t),
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": lp,
                }
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Generates the assistant's next message for each dialog.

        Args:
            dialogs: each a list of {"role", "content"} messages; roles are
                system, user, assistant and ipython (tool results).
            temperature, top_p: as in `generate`.
            max_gen_len: most tokens generated; defaults to max_seq_len - 1.
            logprobs: also return each generated token's text and log-probability.

        Returns:
            One `ChatPrediction` per dialog: {"generation": {"role": "assistant",
            "content": str}} plus "tokens" and "logprobs" when logprobs=True.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs
        )
        if logprobs:
            return [
                {
                    "generation": {"role": "assistant", "content": self.tokenizer.decode(t)},
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": lp,
                }
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}} for t in generation_tokens]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draws from the smallest set of most likely tokens whose
    probabilities sum to at least p.

    Args:
        probs: (B, V) probability distributions.
        p: the cumulative probability kept.
        generator: the random generator to draw from (torch's global one if None).

    Returns:
        (B, 1) sampled token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens entirely beyond the nucleus
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)
