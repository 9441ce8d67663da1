"""Corpus resolution, splits, identity and batches."""
import bz2
import hashlib
import io
import json
import lzma
import math
import zipfile
import zlib

import numpy as np
import pytest
import torch

from conftest import run_cli
from train import data as data_mod
from train import datastats
from train.config import ConfigError, DataConfig
from train.data import SAMPLE_BYTES, BatchPrefetcher, RandomWindows, load_corpus, random_batch, split_bounds
from train.datastats import corpus_stats

SAMPLE_SHA256 = "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"


def test_enwik8_split_is_90m_5m_5m():
    assert split_bounds(100_000_000, True) == {"train": (0, 90_000_000), "val": (90_000_000, 95_000_000),
                                               "test": (95_000_000, 100_000_000)}


def test_other_files_split_90_5_5_by_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    c = load_corpus(DataConfig(source=str(path)))
    assert c.bounds == {"train": (0, 9216), "val": (9216, 9728), "test": (9728, 10240)}
    assert np.array_equal(np.concatenate([c.split(s) for s in ("train", "val", "test")]), np.fromfile(path, np.uint8))
    assert c.data.dtype == np.uint8 and isinstance(c.data, np.memmap)


def test_identity_names_the_whole_file(tmp_path):
    path = tmp_path / "text.txt"
    payload = b"hello world, " * 1000
    path.write_bytes(payload)
    ident = load_corpus(DataConfig(source=str(path))).identity
    assert ident == {"name": "text.txt", "path": str(path), "bytes": len(payload),
                     "sha256": hashlib.sha256(payload).hexdigest()}


def test_sample_is_the_gensim_wikipedia_xml(tmp_path):
    c = load_corpus(DataConfig(source="sample", data_dir=str(tmp_path)))
    assert c.identity["name"] == "sample"
    assert c.identity["bytes"] == SAMPLE_BYTES and c.identity["sha256"] == SAMPLE_SHA256
    assert bytes(c.data[:10]) == b"<mediawiki"
    assert c.bounds["val"] == (int(SAMPLE_BYTES * 0.9), int(SAMPLE_BYTES * 0.9) + int(SAMPLE_BYTES * 0.05))


def test_enwik8_offline_falls_back_to_sample_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "ENWIK8_URL", "http://127.0.0.1:9/enwik8.zip")  # nothing listens there
    c = load_corpus(DataConfig(source="enwik8", data_dir=str(tmp_path), download_timeout=5))
    assert c.identity["name"] == "sample"
    err = capsys.readouterr().err
    assert "WARNING" in err and "NOT comparable" in err


def test_enwik8_offline_without_fallback_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "ENWIK8_URL", "http://127.0.0.1:9/enwik8.zip")  # nothing listens there
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(source="enwik8", data_dir=str(tmp_path), download_timeout=5, fallback=False))
    message = str(e.value)
    assert "could not download enwik8" in message and f"put enwik8.zip or enwik8 into {tmp_path}/" in message
    assert "\n" not in message and not (tmp_path / "enwiki-sample.xml").exists()


def test_an_enwik8_download_is_kept_only_when_its_size_and_sha256_match(tmp_path, monkeypatch):
    """The download path with a fake server: a file of the wrong sha256 (of the right size, too) is deleted and the
    corpus refused; the file that matches both is kept and unpacked."""
    fake = b"<mediawiki> a fake enwik8 " * 40
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("enwik8", fake)
    served = buf.getvalue()
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served))
    monkeypatch.setattr(data_mod, "split_bounds", lambda n, is_enwik8: {"train": (0, 900), "val": (900, 950),
                                                                          "test": (950, n)})
    cfg = DataConfig(source="enwik8", data_dir=str(tmp_path), fallback=False)
    for size in (data_mod.ENWIK8_ZIP_BYTES, len(served)):  # the official size, then the fake's own (sha256 still off)
        monkeypatch.setattr(data_mod, "ENWIK8_ZIP_BYTES", size)
        with pytest.raises(ConfigError, match="downloaded enwik8.zip failed its checksum"):
            load_corpus(cfg)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the zip nor its .part is left
    monkeypatch.setattr(data_mod, "ENWIK8_ZIP_SHA256", hashlib.sha256(served).hexdigest())
    monkeypatch.setattr(data_mod, "ENWIK8_BYTES", len(fake))
    c = load_corpus(cfg)
    assert bytes(c.data) == fake and (tmp_path / "enwik8.zip").read_bytes() == served


def test_enwik8_zip_is_verified_and_unpacked(tmp_path, monkeypatch):
    fake = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("enwik8", fake)
    (tmp_path / "enwik8.zip").write_bytes(buf.getvalue())
    monkeypatch.setattr(data_mod, "ENWIK8_BYTES", len(fake))
    with pytest.raises(ConfigError, match="not the official enwik8.zip"):
        load_corpus(DataConfig(source="enwik8", data_dir=str(tmp_path)))
    monkeypatch.setattr(data_mod, "ENWIK8_ZIP_SHA256", hashlib.sha256(buf.getvalue()).hexdigest())
    monkeypatch.setattr(data_mod, "split_bounds", lambda n, is_enwik8: {"train": (0, 900), "val": (900, 950),
                                                                       "test": (950, 1000)})
    c = load_corpus(DataConfig(source="enwik8", data_dir=str(tmp_path)))
    assert c.identity["name"] == "enwik8" and bytes(c.data) == fake
    assert (tmp_path / "enwik8").read_bytes() == fake


def test_missing_and_too_short_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="data file not found"):
        load_corpus(DataConfig(source=str(tmp_path / "nope.txt")))
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 500)
    with pytest.raises(ConfigError, match="too short"):
        load_corpus(DataConfig(source=str(short)), min_split_bytes=33)


def test_random_batch_targets_are_inputs_shifted_and_shards_partition_the_global_batch():
    split = np.frombuffer(bytes(range(256)) * 8, dtype=np.uint8)
    x, y = random_batch(split, 6, 16, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x + 1) % 256, y)
    parts = [random_batch(split, 6, 16, torch.Generator().manual_seed(3), (r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_random_batch_reaches_both_ends_of_the_split():
    split = np.arange(40, dtype=np.uint8)
    x, y = random_batch(split, 4000, 8, torch.Generator().manual_seed(0))
    assert int(x[:, 0].min()) == 0 and int(y[:, -1].max()) == 39


def test_prefetched_batches_are_the_generators_stream_and_its_state_resumes_it():
    split = np.arange(5000, dtype=np.uint8)
    plain = torch.Generator().manual_seed(3)
    want = [random_batch(split, 6, 17, plain, (1, 2)) for _ in range(7)]
    batches = BatchPrefetcher(RandomWindows(split, 6, 17, torch.Generator().manual_seed(3), (1, 2)),
                              torch.device("cpu"), depth=3)
    try:
        got = [batches.next()[:2] for _ in range(4)]
        state = batches.state  # after 4 batches handed over, whatever was drawn ahead
    finally:
        batches.close()
    resumed = BatchPrefetcher(RandomWindows(split, 6, 17, torch.Generator().set_state(state), (1, 2)),
                              torch.device("cpu"))
    try:
        got += [resumed.next()[:2] for _ in range(3)]
    finally:
        resumed.close()
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_an_error_in_the_batch_thread_reaches_the_training_thread():
    batches = BatchPrefetcher(RandomWindows(np.arange(10, dtype=np.uint8), 2, 64, torch.Generator(), (0, 1)),
                              torch.device("cpu"))
    try:
        with pytest.raises(RuntimeError):  # windows of 64 bytes from a 10-byte split: randint's range is empty
            batches.next()
    finally:
        batches.close()


def test_dataset_statistics_of_a_known_file(tmp_path):
    path = tmp_path / "pages.xml"
    payload = b"<page>xy</page>" * 100 + b"!"  # 1,501 bytes: 100 pages of 15 bytes and one byte seen once
    path.write_bytes(payload)
    stats = corpus_stats(load_corpus(DataConfig(source=str(path))))
    whole = stats["whole"]
    assert whole["bytes"] == 1501 and whole["distinct"] == 10
    counts = [200] * 6 + [100] * 3 + [1]  # < p a g e > twice a page; x y / once; ! once in the file
    assert math.isclose(whole["order0_bpc"], -sum(c / 1501 * math.log2(c / 1501) for c in counts), rel_tol=1e-12)
    assert whole["pages"] == 100 and whole["mean_bytes"] == whole["median_bytes"] == whole["p90_bytes"] == 15
    compressed = {"zlib": zlib.compress(payload, 9), "bz2": bz2.compress(payload, 9),
                  "lzma": lzma.compress(payload, preset=6)}
    assert {c: whole[f"{c}_bpc"] for c in compressed} == {c: 8 * len(b) / 1501 for c, b in compressed.items()}
    assert stats["train"]["bytes"] + stats["val"]["bytes"] + stats["test"]["bytes"] == 1501
    (tmp_path / "out").mkdir()  # an existing folder is written into
    r = run_cli("--stats", f"--data.source={path}", f"--out_dir={tmp_path / 'out'}", module="train.data")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 6 and len({row.count("|") for row in rows}) == 1  # header, separator, 4 parts
    assert rows[2].split(" | ")[:4] == ["| whole", "1,501", "10", f"{whole['order0_bpc']:.3f}"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["whole"]["distinct"] == 10
    assert (tmp_path / "out" / "byte_histogram.png").stat().st_size > 5000
    assert run_cli(module="train.data").returncode == 2  # nothing asked


def test_dataset_statistics_of_a_missing_enwik8_are_an_error_not_the_sample(tmp_path, monkeypatch, capsys):
    """The statistics describe the corpus asked for: no fallback to the sample when enwik8 cannot be had."""
    monkeypatch.setattr(data_mod, "ENWIK8_URL", "http://127.0.0.1:9/enwik8.zip")  # nothing listens there
    code = datastats.main(["--stats", "--data.source=enwik8", f"--data.data_dir={tmp_path}",
                           f"--out_dir={tmp_path / 'out'}"])
    assert code == 2 and "\nerror: could not download enwik8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
