"""Chat rendering: messages -> tokens with the model's chat template, prompt masked for training.

A `ChatRenderer` turns a conversation into the tokens the model sees. For supervised learning it
builds a `Datum` whose `weights` are 0 on the prompt (system and user turns, and the assistant
header) and 1 on the assistant's reply and its end-of-turn token, so the loss is on what the
assistant says only. For sampling it builds the prompt ending in the assistant header.

The template is the tokenizer's own (`apply_chat_template`, from the files the server serves);
a tokenizer without one (the SDK's small `bios.tokenizer.Tokenizer`) gets ChatML, which is
SmolLM2's template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bios import types

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

END_OF_TURN = "<|im_end|>"


def chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    """ChatML text of `messages` (the fallback template)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{END_OF_TURN}\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass
class ChatRenderer:
    """Renders conversations for one tokenizer.

    Attributes:
        tokenizer: a transformers tokenizer or a `bios.tokenizer.Tokenizer`.
    """

    tokenizer: Any

    def text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as template text."""
        if getattr(self.tokenizer, "chat_template", None) and hasattr(self.tokenizer,
                                                                         "apply_chat_template"):
            return str(self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt))
        return chatml(messages, add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def end_of_turn(self) -> int:
        """The token id that ends an assistant turn (the sampling stop token)."""
        ids = self.encode(END_OF_TURN)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no single {END_OF_TURN} token")
        return ids[0]

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """Tokens of `messages` followed by the assistant header: what to sample from."""
        return self.encode(self.text(messages, add_generation_prompt=True))

    def completion_tokens(self, reply: str) -> list[int]:
        """Tokens of an assistant reply, ending with the end-of-turn token."""
        return [*self.encode(reply), self.end_of_turn]

    def supervised_tokens(self, messages: list[Message]) -> tuple[list[int], list[float]]:
        """(tokens, per-token weight) of a conversation whose last message is the assistant's:
        weight 1 on the reply and its end-of-turn, 0 on everything before."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reply to train on")
        prompt = self.prompt_tokens(messages[:-1])
        completion = self.completion_tokens(messages[-1]["content"])
        tokens = prompt + completion
        return tokens, [0.0] * len(prompt) + [1.0] * len(completion)

    def supervised_datum(self, messages: list[Message]) -> types.Datum:
        """A cross-entropy `Datum` for the conversation, loss on the assistant's reply only."""
        tokens, weights = self.supervised_tokens(messages)
        return sequence_datum(tokens, weights=weights)

    def decode(self, tokens: list[int]) -> str:
        """Text of sampled tokens, without the end-of-turn token."""
        end = self.end_of_turn
        return str(self.tokenizer.decode([t for t in tokens if t != end]))


def sequence_datum(tokens: list[int], **per_token: list[float]) -> types.Datum:
    """A `Datum` for a full sequence: input `tokens[:-1]`, targets `tokens[1:]`.

    The `per_token` lists (weights, logprobs, advantages) are given per token of `tokens` and
    shifted the same way: entry i+1 belongs to the prediction made at position i.
    """
    if len(tokens) < 2:
        raise ValueError("a training sequence needs at least 2 tokens")
    inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    for name, values in per_token.items():
        if len(values) != len(tokens):
            raise ValueError(f"{name} has {len(values)} entries for {len(tokens)} tokens")
        inputs[name] = values[1:]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs=inputs)
