"""A character-level CLIP tokenizer: CLIP's byte-level BPE vocabulary without merges.

Every prompt tokenizes (one token per character, "</w>" marking a word's last
character) and different prompts give different ids, with nothing to download. The
embedded toy prior's text encoder is trained on this vocabulary; the tiny test models
and the benchmark's SD-2.1-shaped models (whose cost does not depend on the ids) use
it too. `write_tokenizer` writes a directory that transformers' `CLIPTokenizer`
loads.
"""

from __future__ import annotations

import json
import pathlib

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
  """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def vocab() -> dict[str, int]:
  """CLIP's vocabulary layout without merges: bytes, bytes + "</w>", then BOS, EOS
  (so BOS = size - 2, EOS = size - 1, as the text encoder configs state)."""
  symbols = _bytes_to_unicode()
  tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
  return {t: i for i, t in enumerate(tokens)}


def vocab_size() -> int:
  return len(vocab())


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_tokenizer(folder: str | pathlib.Path, *, max_length: int) -> None:
  """A CLIPTokenizer directory (vocab.json, merges.txt, special tokens, config) for
  `vocab()`, padding with EOS to `max_length` tokens."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  _write_json(folder / "vocab.json", vocab())
  (folder / "merges.txt").write_text("#version: 0.2\n")
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  _write_json(folder / "special_tokens_map.json", special)
  _write_json(folder / "tokenizer_config.json",
              {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special})
