"""The tokenizer alone (no torch) and the remote embedder (a real Infinity server)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REALDATA
from transforms.chunking import ChunkingConfig, chunk_document
from transforms.embedding import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
AWS_TARBALL = REALDATA / "docs_qa" / "aws_documentation_qa" / "aws_docs_14_guides_doc_source.tar.gz"


def _aws_pages(n: int) -> list[tuple[str, str]]:
    out = []
    with tarfile.open(AWS_TARBALL) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".md"):
                out.append((member.name, tar.extractfile(member).read().decode("utf-8", "replace")))
                if len(out) == n:
                    break
    return out


def test_tokenizer_alone_counts_and_chunks_exactly_like_the_loaded_model(embedder):
    tokenizer = load_tokenizer()
    assert tokenizer.max_seq_length == embedder.model.max_seq_length == 256
    assert tokenizer.max_text_tokens == 254
    pages = _aws_pages(25)
    hf = embedder.model.tokenizer  # the model's own (transformers) tokenizer
    for _name, text in pages:
        for piece in (text, text[:300], "Как загрузить сайт в бакет?", ""):
            assert tokenizer.count_tokens(piece) == len(
                hf(piece, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    config = ChunkingConfig(max_tokens=254, overlap_tokens=32)

    def hf_count(t):
        return len(hf(t, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    for name, text in pages:
        ours = chunk_document(name, text, fmt="markdown", config=config,
                              counter=tokenizer.count_tokens)
        theirs = chunk_document(name, text, fmt="markdown", config=config, counter=hf_count)
        assert [c.id for c in ours] == [c.id for c in theirs]


def test_sync_and_query_path_with_a_remote_backend_never_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from flows.settings import Settings\n"
        "import flows.sync, flows.retrieve, flows.cli\n"
        "s = Settings(data_dir=sys.argv[1], embedding={'backend': 'openai',"
        " 'base_url': 'http://127.0.0.1:9'})\n"
        "from flows.sync import Pipeline\n"
        "p = Pipeline(s)\n"
        "assert p.chunking.max_tokens == 254\n"
        "assert p.tokenizer.count_tokens('hello world') == 2\n"
        "e = p.embedder\n"
        "assert type(e).__name__ == 'RemoteEmbedder', e\n"
        "from flows.retrieve import hybrid_weights\n"
        "hybrid_weights(s, 'How do I rotate keys?')\n"
        "p.close()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'sentence_transformers', 'transformers'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_openai_backend_needs_a_base_url(tmp_path):
    from flows.settings import Settings

    with pytest.raises(ValueError, match="base_url"):
        Settings(data_dir=tmp_path, embedding={"backend": "openai"})


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory) -> Path:
    """A models cache holding the packaged model's ONNX export, made on first use."""
    from transforms.embedding import EmbedderSpec
    from transforms.onnx_embedding import OnnxEmbedder, load_query_encoder

    cache = tmp_path_factory.mktemp("models")
    encoder = load_query_encoder(EmbedderSpec(), cache)
    assert isinstance(encoder, OnnxEmbedder)
    assert len(list(cache.glob("*.onnx"))) == 1
    return cache


def test_onnx_query_encoder_gives_the_models_own_vectors(embedder, onnx_models):
    from transforms.embedding import EmbedderSpec
    from transforms.onnx_embedding import load_query_encoder

    onnx = load_query_encoder(EmbedderSpec(), onnx_models)
    long_text = " ".join(text for _name, text in _aws_pages(3))  # thousands of tokens
    texts = ["How do I rotate access keys?", "Как настроить репликацию бакета?",
             long_text, "x", "a " * 300]
    for kind in ("query", "passage"):
        ours = onnx.encode(texts, kind=kind)
        theirs = embedder.encode(texts, kind=kind)
        assert ours.shape == theirs.shape == (len(texts), 384)
        assert float(abs(ours - theirs).max()) < 1e-5
    assert onnx.encode([]).shape == (0, 384)


def test_a_model_with_a_dense_layer_keeps_the_torch_path(tmp_path):
    from transforms.embedding import EmbedderSpec
    from transforms.onnx_embedding import export_path

    model = tmp_path / "my-model"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (model / "modules.json").write_text(json.dumps(modules))
    assert export_path(EmbedderSpec(model=str(model)), tmp_path / "cache") is not None
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    assert export_path(EmbedderSpec(model=str(model)), tmp_path / "cache") is None
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    modules.pop()
    (model / "modules.json").write_text(json.dumps(modules))
    assert export_path(EmbedderSpec(model=str(model)), tmp_path / "cache") is None


def test_query_path_with_the_onnx_export_never_imports_torch(tmp_path, onnx_models):
    code = (
        "import sys\n"
        "from flows.settings import Settings\n"
        "import flows.retrieve, flows.cli\n"
        "s = Settings(data_dir=sys.argv[1], embedding={'onnx_cache': sys.argv[2]})\n"
        "from flows.retrieve import hybrid_weights, query_encoder\n"
        "e = query_encoder(s)\n"
        "assert type(e).__name__ == 'OnnxEmbedder', e\n"
        "assert e.encode(['How do I rotate keys?'], kind='query').shape == (1, 384)\n"
        "hybrid_weights(s, 'How do I rotate keys?')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'sentence_transformers', 'transformers', 'scipy', 'git'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(onnx_models)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_sync_that_loads_the_model_leaves_the_export_queries_use(make_repo, make_settings,
                                                                   tmp_path):
    from flows.retrieve import query_encoder, retrieve
    from tests.test_sync import sync

    repo = make_repo({"docs/keys.md": "# Keys\n\nRotate access keys every 90 days.\n",
                      "docs/buckets.md": "# Buckets\n\nA bucket holds objects.\n"})
    cache = tmp_path / "onnx"
    settings = make_settings(repo, embedding={"onnx_cache": cache})
    assert sync(settings)["chunks_embedded"] > 0
    assert len(list(cache.glob("*.onnx"))) == 1
    assert type(query_encoder(settings)).__name__ == "OnnxEmbedder"
    onnx = retrieve(settings, "how often should keys be rotated", k=2, mode="dense")
    torch_settings = make_settings(repo, embedding={"onnx_cache": cache, "onnx_queries": False})
    assert type(query_encoder(torch_settings)).__name__ == "Embedder"
    torch = retrieve(torch_settings, "how often should keys be rotated", k=2, mode="dense")
    assert [c.chunk_id for c in onnx] == [c.chunk_id for c in torch]
    assert onnx[0].doc_id == "src0:docs/keys.md"
    assert abs(onnx[0].score - torch[0].score) < 1e-5


def _plain_count(tokenizer_json: Path, text: str) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    return len(tok.encode(text, add_special_tokens=False).ids)


def test_remembered_word_counts_equal_whole_text_counts():
    """count_tokens sums remembered per-word counts for the BERT tokenizer: the sum must
    equal one encode of the whole text, whatever the whitespace, accents, CJK or control
    characters, and asking twice (from the memory) gives the same answer."""
    from transforms.embedding import resolve_model

    tokenizer = load_tokenizer()
    assert tokenizer._word_additive  # the default model takes the per-word path
    reference = Path(resolve_model("all-MiniLM-L6-v2")[1]) / "tokenizer.json"
    odd = ["a\tb\r\nc  d", "caf\u00e9 na\u0308ive \u0301x", "x\u00a0y\u2003z", "\u6f22\u5b57abc",
           "ctrl\x1cchar\x00s", "[SEP] [MASK]x", "w" * 150 + " short", " lead trail ", "\n\n",
           "Как загрузить сайт в бакет?", "foo.bar_baz(qux) -> 42!"]
    texts = odd + [t for _, page in _aws_pages(5) for t in (page, page[:777], page[1234:2345])]
    for text in texts:
        expected = _plain_count(reference, text)
        assert tokenizer.count_tokens(text) == expected, text[:80]
        assert tokenizer.count_tokens(text) == expected, text[:80]


def test_a_tokenizer_where_spaces_belong_to_tokens_counts_whole_texts(tmp_path):
    """A SentencePiece-style (Metaspace) tokenizer is not additive over words: it is
    detected, and its counts (remembered by whole text) equal one plain encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [page for _, page in _aws_pages(3)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300,
                                                        special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    from transforms.embedding import ModelTokenizer

    tokenizer = ModelTokenizer(str(tmp_path))
    assert not tokenizer._word_additive
    for text in ["hello world", "hello  world\nagain", corpus[0][:500], corpus[1]]:
        expected = _plain_count(tmp_path / "tokenizer.json", text)
        assert tokenizer.count_tokens(text) == expected
        assert tokenizer.count_tokens(text) == expected
