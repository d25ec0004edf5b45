"""Prompts as token ids: text or ids (completions), messages through the tokenizer's chat template (chat),
checked against the engine's limits (build.max_input_len, build.max_seq_len)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enginesmith.triton_repo.openai_api.errors import bad_request


@dataclass(frozen=True)
class Limits:
    max_input_len: int
    max_seq_len: int


class Prompter:
    def __init__(self, tokenizer: Any, limits: Limits):
        self.tokenizer, self.limits = tokenizer, limits
        self.vocab_size = len(tokenizer)
        self.adds_bos = tokenizer.bos_token is not None and tokenizer.bos_token_id in tokenizer.encode("")

    def completion_ids(self, prompt: str | list[int]) -> list[int]:
        """Text is encoded as the preprocessing model encodes it (special tokens added); ids are taken as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        return list(prompt)

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        """The messages rendered by the tokenizer's chat template, ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template, so messages cannot be formatted: use "
                              "/v1/completions with the prompt text, or serve a tokenizer that has one "
                              "(chat_template in tokenizer_config.json)", "messages", "chat_template_missing")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template raises whatever it likes on messages it refuses
            raise bad_request(f"messages: the model's chat template refused them: {e}", "messages") from None

    def chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        """The rendered messages and their ids (no special tokens added: the template writes them)."""
        text = self.chat_text(messages)
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def for_text_model(self, chat_text: str) -> str:
        """Rendered messages as a text model (the ensemble) should get them: its preprocessing model encodes
        with special tokens, so a BOS the template wrote would be there twice."""
        bos = self.tokenizer.bos_token
        return chat_text[len(bos):] if self.adds_bos and chat_text.startswith(bos) else chat_text

    def max_tokens(self, requested: int | None, prompt_len: int, default: int | None, what: str) -> int:
        """The output length to ask for: `requested`, else `default`, else what the context has left."""
        lim = self.limits
        if prompt_len > lim.max_input_len:
            raise bad_request(f"the {what} has {prompt_len} tokens, more than this model's maximum input length "
                              f"{lim.max_input_len} (build.max_input_len): shorten it", what,
                              "context_length_exceeded")
        room = lim.max_seq_len - prompt_len
        n = requested if requested is not None else (default if default is not None else room)
        if n > room or room < 1:
            raise bad_request(f"this model's maximum context length is {lim.max_seq_len} tokens, but {prompt_len + n} "
                              f"were requested ({prompt_len} in the {what}, {n} in the completion): lower max_tokens "
                              f"to {room} or less", "max_tokens", "context_length_exceeded")
        return n
