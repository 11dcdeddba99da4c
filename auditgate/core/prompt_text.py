"""The prompt text of one request (or client event) as policy reads it, worked out once per flow.

A list of texts (what the walker found, in order; the caller's object keys as one more text; a
marker per inline content the gateway cannot read), plus the joined text rules match and its
normalized form (``auditgate.masking.normalize``: NFKC, zero-width and other format characters
dropped, escapes decoded), so ``-----BEGIN PRIVATE<U+200B> KEY-----`` is the key it reads as.
"""

from __future__ import annotations

from functools import cached_property

UNREADABLE_MARKER = "[inline content the gateway cannot read: {}]"


class PromptTexts(list):
    """The texts of a request, in order (a list, for every reader that wants just that), and more:

    - ``keys``: the caller-chosen object keys (also the last text of the list, one per line);
    - ``unreadable``: a description (a media type, never content) of each inline content the gateway
      cannot read (also in the list as a marker, so a request carrying only that is still decided);
    - ``media``: the images and audio it passes without reading;
    - ``joined`` / ``normalized``: the text rules match, raw and normalized (computed once, when first read).
    """

    def __init__(self, texts=(), *, keys: tuple[str, ...] = (), unreadable: tuple[str, ...] = (),
                 media: tuple[str, ...] = ()) -> None:
        super().__init__(texts)
        if keys:
            self.append("\n".join(keys))
        self.extend(UNREADABLE_MARKER.format(what) for what in unreadable)
        self.keys, self.unreadable, self.media = keys, unreadable, media

    @cached_property
    def joined(self) -> str:
        return "\n\n".join(self)

    @cached_property
    def normalized(self) -> str:
        """The joined text normalized; the very same string object when normalizing changes nothing."""
        text = self.joined
        if text.isascii() and "%" not in text and "\\" not in text and "&" not in text:
            return text  # plain ASCII prose (the common case): no character, escape or reference to fold
        from auditgate.masking.normalize import normalize

        folded = normalize(text).text
        return text if folded == text else folded


def as_prompt_texts(texts: list[str]) -> PromptTexts:
    return texts if isinstance(texts, PromptTexts) else PromptTexts(texts)
