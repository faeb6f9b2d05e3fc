"""llama: Llama inference from scratch, with Meta's reference API."""

from llama.chat_format import ChatFormat, Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama, sample_top_p
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatFormat",
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
    "sample_top_p",
]
