"""GPTQ rounding for int8 (llama/gptq.py): the objective it minimizes, against round-to-nearest,
the offline `--gptq` checkpoint path, and top-1 agreement with fp32 on the bundled model."""

import shutil

import pytest
import torch

import llama.quantize as quantize
from llama import Llama
from llama.default_model import DEFAULT_MODEL_NAME, checkpoints_dir
from llama.quantize import default_calibration_text, quantize_int8_rows, quantize_model
from llama.tokenizer import load_tokenizer
from tests.test_quantize import TEXT, bundled, decode_logits  # noqa: F401 (bundled is a fixture)


def output_error(x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> float:
    """||X Wᵀ - X Qᵀ||²: what GPTQ minimizes."""
    return (x @ weight.T - x @ (q.float() * scales.float()[:, None]).T).pow(2).sum().item()


def correlated_inputs(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n, K) activations with correlated features of very different energies, like a transformer's."""
    mixing = torch.randn(k, k, generator=generator) / k**0.5
    energies = torch.logspace(-1, 1, k)[torch.randperm(k, generator=generator)]
    return torch.randn(n, k, generator=generator) @ mixing * energies


def test_gptq_rounding_beats_round_to_nearest_on_held_out_inputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator) / 128**0.5
    inputs = correlated_inputs(1024, 128, generator)
    calibration, held_out = inputs[:512], inputs[512:]
    moment = calibration.double().T @ calibration.double()

    q, scales = quantize_int8_rows(weight, moment)  # GPTQ's codes
    nearest_q, nearest_scales = quantize_int8_rows(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and q.abs().max() <= 127
    assert torch.equal(scales, nearest_scales)  # same format, same scales: only the codes differ
    assert not torch.equal(q, nearest_q)
    for x in (calibration, held_out):
        ratio = output_error(x, weight, q, scales) / output_error(x, weight, nearest_q, nearest_scales)
        assert ratio < 0.7, ratio


def test_gptq_leaves_weights_of_dead_inputs_at_zero_code():
    """An input that was always 0 in calibration carries no information: its column rounds to 0."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=generator)
    x = correlated_inputs(256, 32, generator)
    x[:, 5] = 0.0
    q, _ = quantize_int8_rows(weight, x.double().T @ x.double())
    assert torch.all(q[:, 5] == 0)


def test_calibration_is_refused_for_modes_other_than_int8(tiny_checkpoints, llama3_tokenizer_path):
    llama = Llama.build(tiny_checkpoints["gqa"], llama3_tokenizer_path, max_seq_len=16, max_batch_size=1)
    with pytest.raises(ValueError, match="int8"):
        quantize_model(llama.model, "int4", calibration=torch.tensor([[128000, 791, 6864]]))


def test_offline_gptq_checkpoint_is_closer_to_fp32(tmp_path, tiny_checkpoints, llama3_tokenizer_path):
    """`python -m llama.quantize SRC DST --mode int8 --gptq` writes a checkpoint that build() loads;
    on text other than the calibration text its logits are closer to fp32's than plain int8's."""
    src = tmp_path / "fp32"
    shutil.copytree(tiny_checkpoints["gqa"], src)
    shutil.copy(llama3_tokenizer_path, src / "tokenizer.model")
    quantize.main([str(src), str(tmp_path / "gptq"), "--mode", "int8", "--gptq"])
    quantize.main([str(src), str(tmp_path / "nearest"), "--mode", "int8"])

    tokens = torch.tensor([load_tokenizer(llama3_tokenizer_path).encode(TEXT, bos=True, eos=False)[:64]])
    logits = {}
    for name in ("fp32", "gptq", "nearest"):
        llama = Llama.build(tmp_path / name, src / "tokenizer.model", max_seq_len=64, max_batch_size=1)
        with torch.no_grad():
            logits[name] = llama.model(tokens, 0)
    gptq_error = (logits["gptq"] - logits["fp32"]).pow(2).mean().item()
    nearest_error = (logits["nearest"] - logits["fp32"]).pow(2).mean().item()
    # Both a scale per group of 32 columns, which leaves rounding less to gain than one per row did
    # (measured: 0.88 of nearest rounding's error here).
    assert gptq_error < 0.95 * nearest_error, (gptq_error, nearest_error)


def test_offline_gptq_refuses_what_it_cannot_calibrate(tmp_path, tiny_checkpoints, llama3_tokenizer_path):
    with pytest.raises(ValueError, match="reshard it to 1 shard"):
        quantize.quantize_checkpoint(tiny_checkpoints["gqa-2shards"], tmp_path / "a", "int8", calibration_text="Hi there")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        quantize.quantize_checkpoint(tiny_checkpoints["gqa"], tmp_path / "b", "int8", calibration_text="Hi there")
    with pytest.raises(ValueError, match="int8"):
        quantize.quantize_checkpoint(tiny_checkpoints["gqa"], tmp_path / "c", "int4", calibration_text="Hi there")


def test_gptq_top1_agreement_with_fp32_on_the_bundled_model(bundled):  # noqa: F811
    """Calibrated on the shipped text (prose, dialogue, code, lists), measured on TEXT, which it does not contain."""
    load, tokens, fp32_logits, _ = bundled
    calibration_text = default_calibration_text()
    assert TEXT[:80] not in calibration_text
    model = load()
    tokenizer = load_tokenizer(checkpoints_dir() / DEFAULT_MODEL_NAME / "tokenizer.model")
    ids = tokenizer.encode(calibration_text, bos=True, eos=False)
    calibration = torch.tensor(ids[: 4 * 256]).view(4, 256)  # rows of the fixture's max_seq_len
    quantize_model(model, "int8", calibration=calibration)
    logits = decode_logits(model, tokens)
    agreement = (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    print(f"SmolLM2 int8 + GPTQ: top-1 agreement {agreement:.1%} over 256 positions")
    assert agreement >= 0.95, f"int8 + GPTQ: top-1 agreement {agreement:.1%}"
