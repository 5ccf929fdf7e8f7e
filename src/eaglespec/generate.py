"""The decode loop: propose, verify, accept, compact the cache, update the drafter.

One loop serves every drafter; plain decoding is the `NoDrafter` case, so the baseline of every
speedup runs through the very same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from eaglespec.drafter import Drafter, NoDrafter
from eaglespec.backends.base import TargetModel
from eaglespec.verify import SampleNoise, SamplingParams, sample_next, verify

Messages = Sequence[dict]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate; validated on construction."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings, cut from the text
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        self.sampling  # validates temperature, top_p, top_k
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


@dataclass
class GenerationStats:
    """Per-call statistics. tau = new tokens / target forwards (prefill included), so plain
    decoding has exactly 1.0."""

    new_tokens: int = 0
    target_forwards: int = 0
    elapsed_s: float = 0.0
    first_token_s: float | None = None  # from the call to the first token: the prompt and one sample
    accept_lengths: list[int] = field(default_factory=list)  # tokens added per decode-step forward
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per decode-step forward, root included

    @property
    def mean_accept_len(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def mean_tree_size(self) -> float:
        return sum(self.tree_sizes) / len(self.tree_sizes) if self.tree_sizes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(new_tokens=self.new_tokens, target_forwards=self.target_forwards,
                    mean_accept_len=round(self.mean_accept_len, 4), mean_tree_size=round(self.mean_tree_size, 3),
                    tokens_per_s=round(self.tokens_per_s, 3),
                    elapsed_s=round(self.elapsed_s, 4),
                    first_token_s=None if self.first_token_s is None else round(self.first_token_s, 4))


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class Generator:
    """Speculative (or plain) generation on a target with a drafter."""

    def __init__(self, target: TargetModel, drafter: Drafter | None = None) -> None:
        self.target = target
        self.drafter = drafter or NoDrafter()
        self.tokenizer = target.tokenizer
        self.last_stats = GenerationStats()

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, prompt: str | Messages, chat: bool = True) -> torch.Tensor:
        """Token ids [n] of a prompt: messages always go through the chat template; a string
        does too when the tokenizer has one and `chat` is set (a single user turn)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            if chat and getattr(tok, "chat_template", None):
                prompt = [{"role": "user", "content": prompt}]
            else:
                return torch.tensor(tok(prompt)["input_ids"], dtype=torch.long, device=self.target.device)
        if not prompt:
            raise ValueError("the message list is empty")
        for m in prompt:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content': {m!r}")
        ids = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return torch.tensor(ids, dtype=torch.long, device=self.target.device)

    # -- token level -------------------------------------------------------------------------

    def generate_ids(self, input_ids: torch.Tensor, config: GenerationConfig) -> Iterator[list[int]]:
        """Yield new token ids in accepted chunks; `self.last_stats` is live while iterating."""
        try:
            yield from self._steps(input_ids, config)
        finally:
            self.drafter.end()  # also where the caller stopped reading: it may keep what it learnt

    def _steps(self, input_ids: torch.Tensor, config: GenerationConfig) -> Iterator[list[int]]:
        target, drafter = self.target, self.drafter
        n = input_ids.shape[0]
        if n == 0:
            raise ValueError("the prompt is empty")
        need = n + config.max_new_tokens + drafter.max_tree_size
        if need > target.max_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_new_tokens ({config.max_new_tokens}) + draft tree "
                f"({drafter.max_tree_size}) = {need} exceeds the cache length {target.max_len}; "
                "shorten the prompt, lower max_new_tokens or raise --max-len"
            )
        params = config.sampling
        eos = self._eos_ids(config)
        # the sample at each position depends on (seed, position) alone: any tree gives plain's text
        noise = None if params.greedy else SampleNoise(config.seed, target.device)
        stats = self.last_stats = GenerationStats()
        start = time.perf_counter()
        with torch.inference_mode():
            drafter.begin()
            out = target.prefill(input_ids, feature_rows=drafter.prompt_features)
            root = sample_next(out.logits[-1], params, noise, position=n)
            drafter.observe(torch.cat([input_ids[1:], root]), out.features)
            stats.target_forwards = 1
            chunk = [int(root)]  # host sync: the token is emitted
            stats.first_token_s = time.perf_counter() - start
            while True:
                chunk = self._clip(chunk, eos, config.max_new_tokens - stats.new_tokens)
                stats.new_tokens += len(chunk)
                stats.elapsed_s = time.perf_counter() - start
                yield chunk
                if stats.new_tokens >= config.max_new_tokens or (chunk and chunk[-1] in eos):
                    break
                # 1. propose a tree rooted at the last committed token
                tree = drafter.propose(root)
                # 2. verify it in one target forward (positions follow the tree depths)
                positions = target.cache.length + tree.depths
                res = target.forward(tree.tokens, positions, tree.mask)
                stats.target_forwards += 1
                stats.tree_sizes.append(tree.tokens.shape[0])
                # 3. accept the longest agreeing path, plus a bonus token
                verdict = verify(tree, res.logits, params, noise, position=target.cache.length + 1)
                # 4. move the accepted nodes' keys into place
                target.cache.compact(verdict.nodes)
                # 5. tell the drafter what was committed
                drafter.observe(verdict.tokens, res.features[verdict.nodes])
                root = verdict.tokens[-1:]
                chunk = verdict.tokens.tolist()  # host sync: once per step
                stats.accept_lengths.append(len(chunk))
        stats.elapsed_s = time.perf_counter() - start

    def _eos_ids(self, config: GenerationConfig) -> set[int]:
        if config.ignore_eos:
            return set()
        ids = set(self.target.eos_token_ids)
        for e in (getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None,):
            if isinstance(e, int):
                ids.add(e)
            elif e:
                ids.update(e)
        return ids

    @staticmethod
    def _clip(chunk: list[int], eos: set[int], room: int) -> list[int]:
        """Cut a chunk after the first EOS and to the room left under max_new_tokens."""
        chunk = chunk[:room]
        for i, t in enumerate(chunk):
            if t in eos:
                return chunk[: i + 1]
        return chunk

    # -- text level ----------------------------------------------------------------------------

    def stream(self, prompt: str | Messages | torch.Tensor, config: GenerationConfig, chat: bool = True) -> Iterator[str]:
        """Yield text pieces as they are accepted; stop strings are cut (held back until decided)."""
        ids = prompt if isinstance(prompt, torch.Tensor) else self.encode(prompt, chat)
        text_of = Detokenizer(self.tokenizer)
        emitted = 0
        hold = max((len(s) for s in config.stop), default=1) - 1
        gen = self.generate_ids(ids, config)
        try:
            for chunk in gen:
                text = text_of.add(chunk)
                cut = _find_stop(text, config.stop, max(emitted - hold, 0))
                if cut is not None:
                    if cut > emitted:
                        yield text[emitted:cut]
                    self.last_token_ids = text_of.ids
                    return
                safe = len(text) - hold
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            text = text_of.finish()
            cut = _find_stop(text, config.stop, max(emitted - hold, 0))
            if cut is not None:
                text = text[:cut]
            if len(text) > emitted:
                yield text[emitted:]
            self.last_token_ids = text_of.ids
        finally:
            gen.close()

    def generate(self, prompt: str | Messages | torch.Tensor, config: GenerationConfig, chat: bool = True) -> GenerationResult:
        text = "".join(self.stream(prompt, config, chat))
        return GenerationResult(text=text, token_ids=list(self.last_token_ids), stats=self.last_stats)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class Detokenizer:
    """The text of a growing list of token ids, decoding a few tokens per addition instead of the
    whole list (which costs O(n^2) over an answer), the way TGI and vLLM detokenize streams: the
    text of the ids from `prefix` on, less the text of those before `read`, is what the newest
    ids added. Text stays back while it ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = 0  # ids before this index are settled text
        self.read = 0  # ids before this index are in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        """What the ids from `read` on add to the text: the window's decode less its settled part."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, ids: list[int]) -> str:
        """Append ids; return all the text settled so far."""
        self.ids.extend(ids)
        new = self._new_text()
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def finish(self) -> str:
        """All the text, the held-back end included: the decode of every id, which the settled
        text agrees with for the tokenizers tried; if one decodes windows otherwise, the settled
        text (already streamed) plus the window's remainder."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            return full
        log.warning("incremental detokenization disagreed with the full decode; the streamed text stays")
        return self.text + self._new_text()
