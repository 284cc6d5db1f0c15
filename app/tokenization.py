"""Prompt tokenisation and the token limits of the service.

The routes turn text into token ids here, before anything is queued, so that over-long or empty
inputs are refused with a 422 that names the limit, and the engine only ever sees ids that fit.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from app.errors import ValidationFailed
from app.settings import Settings


class PromptTokenizer:
    """Encode prompts and outputs with the model's tokenizer and enforce the token limits.

    Args:
        tokenizer: the served model's tokenizer.
        settings: supplies ``max_input_tokens``, ``max_new_tokens`` (cap), ``max_total_tokens`` and
            ``default_max_new_tokens``.
        max_position_embeddings: the model's context length; the total limit never exceeds it.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, settings: Settings, max_position_embeddings: int
    ) -> None:
        self.tokenizer = tokenizer
        self.max_total_tokens = min(settings.max_total_tokens, max_position_embeddings)
        self.max_input_tokens = min(settings.max_input_tokens, self.max_total_tokens - 1)
        self.max_new_tokens = settings.max_new_tokens
        self.default_max_new_tokens = settings.default_max_new_tokens
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def encode(self, text: str, truncate: int | None = None, field: str = "inputs") -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, as TGI does).

        ``truncate`` keeps only the last ``truncate`` tokens. Raises ``ValidationFailed`` for an input
        with no tokens or more than ``max_input_tokens``.
        """
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        return self._check_input(ids, field)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ending with the
        assistant's turn header."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValidationFailed("this model has no chat template: use /v1/completions or /generate")
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises TemplateError (e.g. a role order the template refuses)
            raise ValidationFailed(f"messages: the chat template refused them ({exc})") from exc
        # The template already wrote the special tokens (e.g. <|im_start|>): do not add a BOS on top.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._check_input(ids, "messages")

    def encode_output(self, text: str) -> list[int]:
        """Token ids of a given output (``POST /refine``): no special tokens, as generated text has none."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValidationFailed("output has no tokens: send a non-empty output to refine")
        if len(ids) > self.max_new_tokens:
            raise ValidationFailed(
                f"output has {len(ids)} tokens; the limit is {self.max_new_tokens} (max_new_tokens): "
                "send a shorter output"
            )
        return ids

    def _check_input(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise ValidationFailed(f"{field} has no tokens: send a non-empty prompt")
        if len(ids) > self.max_input_tokens:
            raise ValidationFailed(
                f"{field} has {len(ids)} tokens; the limit is {self.max_input_tokens} (max_input_tokens): "
                "shorten it or set parameters.truncate"
            )
        return ids

    def resolve_max_new_tokens(
        self, requested: int | None, n_input: int, field: str = "max_new_tokens"
    ) -> int:
        """The number of tokens to generate: the request's, else the default, within both caps."""
        if requested is not None and requested > self.max_new_tokens:
            raise ValidationFailed(
                f"{field} must be <= {self.max_new_tokens}, got {requested}: ask for fewer tokens"
            )
        budget = self.max_total_tokens - n_input
        if requested is None:
            return max(1, min(self.default_max_new_tokens, budget))
        if requested > budget:
            raise ValidationFailed(
                f"inputs ({n_input} tokens) + {field} ({requested}) must be <= {self.max_total_tokens} "
                f"(max_total_tokens): ask for at most {budget} new tokens"
            )
        return requested

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The text each token adds, special tokens included (``<|im_end|>``).

        Decoding ids one at a time breaks multi-byte characters split across tokens, so each token's
        text is the difference between the decoded prefixes ending after and before it.
        """
        texts: list[str] = []
        previous = ""
        for i in range(len(ids)):
            current = self.tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
            if current.startswith(previous) and not current.endswith("\ufffd"):
                texts.append(current[len(previous) :])
                previous = current
            elif current.endswith("\ufffd"):
                texts.append("")  # an incomplete character: its text arrives with the next token
            else:
                texts.append(self.tokenizer.decode(ids[i : i + 1], skip_special_tokens=False))
                previous = current
        return texts

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids
