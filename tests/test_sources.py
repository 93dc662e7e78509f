import json

import datasets
import pytest
from conftest import wikitext_lines

from nblib.data import localfiles, sources
from nblib.setup import config


def data_config(spec, column="text"):
    return config.DataConfig(dataset=str(spec), dataset_config="", text_column=column, tokenizer="bpe:300")


def test_wikitext_text_file_is_split_by_article_with_titles_marked(wikitext_file):
    splits = sources.load(data_config(wikitext_file), seed=0)
    assert list(splits) == ["train", "validation", "test"]
    for split in splits.values():
        rows = split[:]
        starts = [t for t, s in zip(rows["text"], rows["doc_start"]) if s]
        assert starts and all(t.startswith(" = Article") for t in starts)
        first = next(i for i, t in enumerate(rows["text"]) if t.strip())
        assert rows["doc_start"][first]  # each split begins with a whole article
    total = sum(len(s) for s in splits.values())
    assert total == len(wikitext_lines(60))
    assert 0 < len(splits["validation"]) < len(splits["train"])


def test_split_is_seeded(wikitext_file):
    a = sources.load(data_config(wikitext_file), seed=1)["test"][:]["text"]
    b = sources.load(data_config(wikitext_file), seed=1)["test"][:]["text"]
    c = sources.load(data_config(wikitext_file), seed=2)["test"][:]["text"]
    assert a == b and a != c


def test_save_to_disk_dataset_with_own_splits_keeps_them(tmp_path):
    rows = wikitext_lines(5)
    dsd = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": rows, "id": list(range(len(rows)))})
                                for name in ("train", "validation", "test")})
    dsd.save_to_disk(str(tmp_path / "wiki"))
    splits = sources.load(data_config(tmp_path / "wiki"), seed=0)
    assert [len(s) for s in splits.values()] == [len(rows)] * 3
    assert splits["train"].column_names == ["text", "doc_start"]


def test_parquet_with_hub_style_valid_split_name_and_other_column(tmp_path):
    for name in ("train", "valid", "test"):
        datasets.Dataset.from_dict({"body": [f"document {i} of {name}" for i in range(10)]}).to_parquet(
            str(tmp_path / f"{name}.parquet"))
    splits = sources.load(data_config(tmp_path / "*.parquet", column="body"), seed=0)
    assert splits["validation"][0]["text"] == "document 0 of valid"
    assert all(splits["train"][:]["doc_start"])  # one record, one document


def test_jsonl_without_splits_is_carved_90_5_5(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(200)))
    splits = sources.load(data_config(path), seed=0)
    assert [len(s) for s in splits.values()] == [180, 10, 10]


def test_missing_text_column_is_a_clear_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "x"}))
    with pytest.raises(ValueError, match=r"text_column='text': not a column .*'content'"):
        sources.load(data_config(path), seed=0)


def test_plain_text_paragraphs_are_documents(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text("\n\n".join(f"SPEAKER {i}:\nline one\nline two" for i in range(40)))
    splits = sources.load(data_config(path), seed=0)
    train = splits["train"][:]
    assert sum(train["doc_start"]) == 36 and all(t.endswith("\n") for t in train["text"])


def test_builtin_corpus_is_python_documentation():
    docs = sources.python_docs()
    assert sum(map(len, docs)) > 1_000_000
    assert any("Return" in d for d in docs)


def test_a_text_column_of_numbers_is_a_clear_error_naming_the_text_columns(tmp_path):
    datasets.Dataset.from_dict({"label": [1, 2, 3], "body": ["a", "b", "c"]}).to_parquet(
        str(tmp_path / "train.parquet"))
    with pytest.raises(ValueError, match=r"text_column='label': .* holds int64 values there, not text "
                                         r"\(its text columns: \['body'\]\)"):
        sources.load(data_config(tmp_path / "train.parquet", column="label"), seed=0)


def test_files_are_checked_before_loading_a_cut_character_and_a_blank_file(tmp_path):
    cut = tmp_path / "cut.txt"
    cut.write_bytes(("é" * 600_000).encode()[:-1])  # the last character cut in half, past a 1 MB chunk
    with pytest.raises(ValueError, match=r"cut.txt is not UTF-8 text: the byte 0xc3 at offset 1,199,998"):
        localfiles.check_files(data_config(cut))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(ValueError, match=r"blank.jsonl is empty \(1 bytes, no text\)"):
        localfiles.check_files(data_config(blank))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "fine"}) + "\n{\"text\": \"cut\n")
    localfiles.check_files(data_config(broken))  # valid UTF-8 ...
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not a JSON object on one line"):
        localfiles.check_records(data_config(broken))  # ... but not JSON lines


def test_a_configuration_the_hub_dataset_lacks_is_named_with_the_fix(tmp_path, monkeypatch):
    """The Hub's own answer (a local dataset folder stands in for a Hub id): the configuration is
    named, not blamed on the network."""
    (tmp_path / "train.jsonl").write_text('{"text": "a story"}\n')
    monkeypatch.setattr(sources, "is_local_dataset", lambda spec: False)
    cfg = config.DataConfig(dataset=str(tmp_path), dataset_config="wikitext-103-raw-v1", text_column="text",
                            tokenizer="bpe:300")
    with pytest.raises(ValueError, match=r"dataset_config='wikitext-103-raw-v1': not a configuration of "
                                         r"dataset=.*Available: \['default'\].*or \"\" for none"):
        sources.load(cfg, seed=0)
