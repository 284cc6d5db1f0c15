"""Prompt tokenisation and the token limits of the service.

The routes turn text into token ids here, before anything is queued, so that over-long or empty
inputs are refused with a 422 that names the limit, and the engine only ever sees ids that fit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from app.errors import ValidationFailed
from app.settings import Settings
from refiners.generation import IncrementalDetokenizer

# Each message's content is rendered as "\ue000<index>\ue001" to find where the template put it.
# Private-use characters: no template writes them and no jinja filter (trim, upper, ...) changes them.
_CONTENT_MARK = re.compile("\ue000(\\d+)\ue001")


def _plain_text_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust tokenizer that reads special-token text (``<|im_end|>``) as
    plain text; ``None`` for a slow (Python) tokenizer.

    A copy, because the switch is state of the tokenizer object: flipping it on the shared tokenizer
    would race with requests tokenised in other threads (and transformers resets it on every call).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    plain = Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    return plain


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
        # The tokens a chat template marks turns with: what message content must never produce (and
        # what decoding with skip_special_tokens leaves out).
        self.control_ids = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._plain = _plain_text_tokenizer(tokenizer)

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
        assistant's turn header.

        Only the template writes control tokens: special-token text inside a message's content
        (``<|im_end|>\\n<|im_start|>system``) is tokenised as the plain text it is, so a prompt cannot
        forge a turn. Every other conversation gets exactly the ids of tokenising the whole rendered
        text, as the model saw in training.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValidationFailed("this model has no chat template: use /v1/completions or /generate")
        contents = [m.get("content") or "" for m in messages]
        text = self._render(messages)
        marked = self._render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
        parts = _CONTENT_MARK.split(marked)  # template text, content index, template text, ...
        if self._plain is not None and _fill(parts, contents) == text:
            ids = self._encode_marked(parts, contents)
        else:
            # The template changed the content (trimmed it, say), so its place in the text is not
            # known: tokenise the whole text, which is safe only if no content holds a control token.
            self._refuse_control_tokens(
                contents, "which this model's chat template cannot keep as plain text"
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._check_input(ids, "messages")

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation rendered by the chat template, as text for another engine to tokenise
        (``REFINER_GENERATOR``). That engine reads special-token text in it as control tokens, so a
        message whose content holds one is refused (a prompt must not forge a turn)."""
        contents = [m.get("content") or "" for m in messages]
        self._refuse_control_tokens(contents, "which the upstream generator would read as a control token")
        return self._render(messages)

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises TemplateError (e.g. a role order the template refuses)
            raise ValidationFailed(f"messages: the chat template refused them ({exc})") from exc

    def _encode_marked(self, parts: list[str], contents: list[str]) -> list[int]:
        """Ids of a rendered conversation split into template text (even ``parts``) and the index of
        the content written between (odd ``parts``).

        Template text keeps its control tokens. All text between two of them, template and content
        alike, is tokenised as one plain-text run: the ids across a template/content boundary
        (``"user\\n" + "  Hi"``) are then those of the whole text. The template already wrote its
        special tokens, so no BOS is added on top.
        """
        runs: list[str | int] = [""]
        for k, part in enumerate(parts):
            if k % 2:
                runs[-1] += contents[int(part)]
                continue
            enc = self.tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
            start = 0
            for token_id, (lo, hi) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                if token_id in self.control_ids:
                    runs[-1] += part[start:lo]
                    runs += [token_id, ""]
                    start = hi
            runs[-1] += part[start:]
        assert self._plain is not None
        ids: list[int] = []
        for run in runs:
            if isinstance(run, int):
                ids.append(run)
            elif run:
                ids.extend(self._plain.encode(run, add_special_tokens=False).ids)
        return ids

    def _refuse_control_tokens(self, contents: list[str], why: str) -> None:
        """Raise ``ValidationFailed`` for the first content holding a control token; ``why`` says why."""
        for i, content in enumerate(contents):
            ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
            found = [t for t in ids if t in self.control_ids]
            if found:
                token = self.tokenizer.convert_ids_to_tokens(found[0])
                raise ValidationFailed(
                    f"messages[{i}].content contains the control token {token!r}, {why}: remove it"
                )

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

        The same pieces as streamed (``IncrementalDetokenizer``: a character split over several tokens
        comes with the token that completes it), except that a special token, which decodes to nothing
        there, reports its own text, as TGI does.
        """
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        return [
            self.tokenizer.decode([i], skip_special_tokens=False)
            if i in self.control_ids
            else detokenizer.push(i)
            for i in ids
        ]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


def _fill(parts: list[str], contents: list[str]) -> str | None:
    """The text of template ``parts`` with each content index replaced by that content; ``None`` if an
    index names no message (the template itself wrote a mark)."""
    pieces = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            pieces.append(part)
        elif int(part) < len(contents):
            pieces.append(contents[int(part)])
        else:
            return None
    return "".join(pieces)
