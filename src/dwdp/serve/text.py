"""Token ids -> text for the HTTP layer: the checkpoint's tokenizer, and incremental
detokenisation that holds back what could still become a stop string."""

from __future__ import annotations


def load_tokenizer(model_dir: str):
    """The checkpoint's Hugging Face tokenizer, or None (then prompts must be token ids)."""
    import os
    import sys

    if not (os.path.isdir(model_dir) and any(os.path.exists(os.path.join(model_dir, f))
                                             for f in ("tokenizer.json", "tokenizer_config.json"))):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # token ids still work
        print(f"warning: could not load the tokenizer in {model_dir} ({e}); prompts must be token ids",
              file=sys.stderr)
        return None


class Detokenizer:
    """Token ids -> text. Without a tokenizer each token is spelled ``<id>``, so ``text``,
    ``stop`` and logprob tokens still mean something."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return "".join(f"<{t}>" for t in ids)
        return self.tok.decode(ids, skip_special_tokens=True)

    def token(self, t: int) -> str:
        if self.tok is None:
            return f"<{t}>"
        return self.tok.decode([t])


class TextStream:
    """Incremental text of a growing token list, with stop sequences: ``add`` returns the
    text that is safe to send (held back while it could be the start of a stop string, or
    ends in an incomplete UTF-8 character) and whether a stop sequence was reached (the
    text then ends before it, as OpenAI does). With ``min_tokens`` (vLLM's), stop strings
    count only from the text of the tokens that reach min_tokens on."""

    def __init__(self, detok: Detokenizer, stops: list[str], min_tokens: int = 0):
        self.detok, self.stops, self.min_tokens = detok, stops, min_tokens
        self.floor = 0 if min_tokens <= 1 else None  # where stop strings may start (None: not yet)
        self.ids: list[int] = []
        self.prefix = 0  # vLLM-style window: decode ids[prefix:] and subtract ids[prefix:read]
        self.read = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        if self.floor is None and len(self.ids) + len(tokens) >= self.min_tokens:
            self.floor = len(self.text)  # stops may start in the text of the tokens that reach min_tokens
        self.ids += tokens
        if self.detok.tok is None:
            self.text += self.detok.decode(tokens)
        else:
            before = self.detok.decode(self.ids[self.prefix:self.read])
            after = self.detok.decode(self.ids[self.prefix:])
            if after.endswith("\ufffd"):  # an incomplete character: wait for the next token
                return self._emit(final=False)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        if self.detok.tok is not None and self.read < len(self.ids):
            self.text += self.detok.decode(self.ids[self.prefix:])[len(self.detok.decode(self.ids[self.prefix:self.read])):]
            self.read = len(self.ids)
        return self._emit(final=True)

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(len(self.text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def _emit(self, final: bool) -> str:
        if self.stops and not self.stopped and self.floor is not None:
            start = max(0, self.sent - max(map(len, self.stops)), self.floor)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if self.stops and not (final or self.stopped):
            end = max(self.sent, end - self._partial_stop())
        out, self.sent = self.text[self.sent:end], end
        return out
